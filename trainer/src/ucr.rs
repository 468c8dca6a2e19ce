//! The Update Compliance Ratio (UCR, paper section 3.1, eq. 2, Tables 1 and 4): how
//! often two tasks pull the shared parameters the same way.
//!
//! For a minibatch, `∇θ_t` is the gradient of task `t`'s part of the loss (its
//! triplets, [`crate::mining::BatchLoss::per_task`]) with respect to the parameters
//! every task shares: the convolutions, BatchNorm and fc of `modulated`, `shared`,
//! `branch:K` and `csn` ([`modkit_models::names::shared_by_tasks`]), not the
//! modulation vectors, branches or masks. Tasks `t` and `u` comply on that
//! minibatch when `⟨∇θ_t, ∇θ_u⟩ > 0`, and interfere destructively when it is
//! negative. UCR(t, u) is the fraction of the measured minibatches on which they
//! comply.
//!
//! A task whose triplets all satisfy the margin has no loss and so no gradient:
//! the inner product is exactly 0 and says nothing about the pair, so such
//! minibatches are left out of that pair's count (the paper does not say what it
//! did; counting them as conflicts would drag every UCR down as training
//! converges).
//!
//! Measuring costs one extra backward pass per task on the measured minibatch
//! (`modtrain train --ucr-every N`). The step's own gradient and update are those
//! of an unmeasured step: measuring does not change training.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::Result;

/// UCR counts of one epoch, for every pair of tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct UcrCounter {
    tasks: usize,
    batches: usize,
    /// `[t·T + u]`: minibatches with `⟨∇θ_t, ∇θ_u⟩ > 0`.
    positive: Vec<usize>,
    /// `[t·T + u]`: minibatches with `⟨∇θ_t, ∇θ_u⟩ ≠ 0`.
    counted: Vec<usize>,
}

impl UcrCounter {
    /// No minibatch measured yet, over `tasks` tasks.
    pub fn new(tasks: usize) -> Self {
        UcrCounter {
            tasks,
            batches: 0,
            positive: vec![0; tasks * tasks],
            counted: vec![0; tasks * tasks],
        }
    }

    /// Adds one minibatch from the Gram matrix of its per-task gradients
    /// (`gram[t][u] = ⟨∇θ_t, ∇θ_u⟩`).
    pub fn add(&mut self, gram: &[Vec<f32>]) {
        debug_assert_eq!(gram.len(), self.tasks);
        self.batches += 1;
        for (t, row) in gram.iter().enumerate() {
            for (u, &dot) in row.iter().enumerate() {
                if dot != 0.0 && dot.is_finite() {
                    self.counted[t * self.tasks + u] += 1;
                    self.positive[t * self.tasks + u] += (dot > 0.0) as usize;
                }
            }
        }
    }

    /// Minibatches measured.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// UCR of tasks `t ≠ u`, or `None` when no measured minibatch gave both a
    /// gradient.
    pub fn ratio(&self, t: usize, u: usize) -> Option<f64> {
        let i = t * self.tasks + u;
        (t != u && self.counted[i] > 0).then(|| self.positive[i] as f64 / self.counted[i] as f64)
    }

    /// The epoch's log entry: every pair's ratio, and over all pairs the fraction
    /// of counted (minibatch, pair) cases that comply, so that a pair counted on a
    /// few minibatches weighs little; `tasks` names the tasks in order.
    pub fn log(&self, tasks: &[String]) -> UcrLog {
        debug_assert_eq!(tasks.len(), self.tasks);
        let ratio: Vec<Vec<Option<f64>>> = (0..self.tasks)
            .map(|t| (0..self.tasks).map(|u| self.ratio(t, u)).collect())
            .collect();
        let pairs =
            (0..self.tasks).flat_map(|t| (t + 1..self.tasks).map(move |u| t * self.tasks + u));
        let (positive, counted) = pairs.fold((0, 0), |(p, c), i| {
            (p + self.positive[i], c + self.counted[i])
        });
        UcrLog {
            tasks: tasks.to_vec(),
            batches: self.batches,
            mean: (counted > 0).then(|| positive as f64 / counted as f64),
            ratio,
            counted: self
                .counted
                .chunks(self.tasks.max(1))
                .map(|r| r.to_vec())
                .collect(),
        }
    }
}

/// One epoch's UCR, as logged in `OUT.metrics.jsonl` and the checkpoint's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UcrLog {
    /// The tasks, in the order of `ratio`'s rows and columns.
    pub tasks: Vec<String>,
    /// Minibatches measured.
    pub batches: usize,
    /// Over all pairs: complying (minibatch, pair) cases ÷ counted ones.
    pub mean: Option<f64>,
    /// `ratio[t][u]`, tasks in the run's order; symmetric, `null` on the diagonal
    /// and where no measured minibatch gave both tasks a gradient.
    pub ratio: Vec<Vec<Option<f64>>>,
    /// `counted[t][u]`: the minibatches behind `ratio[t][u]`, those where both
    /// tasks had a gradient (logs from before it was recorded read as empty).
    #[serde(default)]
    pub counted: Vec<Vec<usize>>,
}

/// `[T, P]`: row `t` is the gradient of task `t`'s part of the loss, `parts[t]`
/// (`parts` is `[T]`), with respect to the `shared` parameters, flattened and
/// concatenated in order. One backward pass per task through the minibatch's
/// graph, which stays as it was. The rows sum to the gradient of `parts.sum()`.
pub fn task_gradients(parts: &Tensor, shared: &[Var]) -> Result<Tensor> {
    let tasks = parts.dim(0)?;
    let mut rows = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let grads = parts.get(t)?.backward()?;
        let flat = shared
            .iter()
            .map(|v| match grads.get(v) {
                Some(g) => g.flatten_all(),
                // No path from this task's loss to the parameter: no gradient.
                None => Tensor::zeros(v.elem_count(), DType::F32, v.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        rows.push(Tensor::cat(&flat, 0)?);
    }
    Ok(Tensor::stack(&rows, 0)?)
}

/// `gram[t][u] = ⟨∇θ_t, ∇θ_u⟩` of [`task_gradients`].
pub fn gradient_gram(parts: &Tensor, shared: &[Var]) -> Result<Vec<Vec<f32>>> {
    let g = task_gradients(parts, shared)?;
    Ok(g.matmul(&g.t()?)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn counts_signs_and_leaves_out_missing_gradients() {
        let mut c = UcrCounter::new(3);
        // Tasks 0 and 1 comply, 0 and 2 conflict; task 2 has no gradient the
        // second time.
        c.add(&[
            vec![1.0, 0.5, -0.2],
            vec![0.5, 1.0, 0.1],
            vec![-0.2, 0.1, 1.0],
        ]);
        c.add(&[
            vec![1.0, -0.5, 0.0],
            vec![-0.5, 1.0, 0.0],
            vec![0.0, 0.0, 0.0],
        ]);
        assert_eq!(c.batches(), 2);
        assert_eq!(c.ratio(0, 1), Some(0.5));
        assert_eq!(c.ratio(1, 0), Some(0.5));
        assert_eq!(c.ratio(0, 2), Some(0.0));
        assert_eq!(c.ratio(1, 2), Some(1.0));
        assert_eq!(c.ratio(1, 1), None);
        let names = ["a", "b", "c"].map(String::from);
        let log = c.log(&names);
        assert_eq!(log.batches, 2);
        assert_eq!(log.mean, Some(0.5));
        // A third minibatch where only tasks 0 and 1 have a loss, and comply: the
        // mean pools the cases (3 of 5), it does not average the ratios (5/9).
        let mut c3 = c.clone();
        c3.add(&[
            vec![1.0, 0.3, 0.0],
            vec![0.3, 1.0, 0.0],
            vec![0.0, 0.0, 0.0],
        ]);
        assert_eq!(c3.log(&names).mean, Some(0.6));
        assert_eq!(log.ratio[2][1], Some(1.0));
        assert_eq!(log.ratio[0][0], None);
        assert_eq!(log.counted[0][1], 2);
        assert_eq!(log.counted[0][2], 1);
        let json = serde_json::to_string(&log).expect("json");
        assert_eq!(
            serde_json::from_str::<UcrLog>(&json).expect("back"),
            log,
            "{json}"
        );
        assert!(UcrCounter::new(1).log(&names[..1]).mean.is_none());
    }

    #[test]
    fn gram_of_per_task_gradients_by_hand() {
        // θ = (a, b) shared, m task-specific. Task 0: θ·(1, 2); task 1: θ·(−3, 1)
        // + m; task 2: m alone (no path to θ).
        let dev = Device::Cpu;
        let theta = Var::new(&[1f32, 1.0], &dev).expect("theta");
        let m = Var::new(&[2f32], &dev).expect("m");
        let x0 = Tensor::new(&[1f32, 2.0], &dev).expect("x0");
        let x1 = Tensor::new(&[-3f32, 1.0], &dev).expect("x1");
        let l0 = (theta.as_tensor() * &x0)
            .and_then(|t| t.sum_all())
            .expect("l0");
        let l1 = (theta.as_tensor() * &x1)
            .and_then(|t| t.sum_all())
            .and_then(|t| t + m.as_tensor().sum_all().expect("m"))
            .expect("l1");
        let l2 = m.as_tensor().sum_all().expect("l2");
        let parts = Tensor::stack(&[l0, l1, l2], 0).expect("parts");
        let gram = gradient_gram(&parts, &[theta]).expect("gram");
        // ∇θ_0 = (1, 2), ∇θ_1 = (−3, 1), ∇θ_2 = 0.
        assert_eq!(
            gram,
            vec![
                vec![5.0, -1.0, 0.0],
                vec![-1.0, 10.0, 0.0],
                vec![0.0, 0.0, 0.0]
            ]
        );
    }
}
