//! Which triplets of a minibatch the loss sees (`--mining`).
//!
//! * `sampled` (the paper's, section 4.1): exactly the sampled triplets, `k` per
//!   task, [`sampled_loss`].
//! * `batch-all` (Hermans et al., "In Defense of the Triplet Loss", 2017): the same
//!   minibatch, but inside each task's block of `3k` images every valid triplet
//!   (anchor and positive share the task's label, the negative does not) counts,
//!   about `(3k)³/4` instead of `k`. The loss is the mean over the triplets that
//!   still violate the margin, so satisfied ones do not dilute it. Same images, same
//!   forward cost, far more signal per step.

use std::fmt;
use std::str::FromStr;

use candle_core::{D, DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::MISSING;
use crate::{Error, Result};

/// How a minibatch's embeddings become triplets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mining {
    /// The sampled triplets only (the paper).
    #[default]
    Sampled,
    /// Every valid triplet within each task's block.
    BatchAll,
    /// Each task's block anchors against every image of the minibatch.
    Pooled,
}

impl fmt::Display for Mining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mining::Sampled => "sampled",
            Mining::BatchAll => "batch-all",
            Mining::Pooled => "pooled",
        })
    }
}

impl FromStr for Mining {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sampled" => Ok(Mining::Sampled),
            "batch-all" => Ok(Mining::BatchAll),
            "pooled" => Ok(Mining::Pooled),
            _ => Err(Error::UnknownMining { value: s.into() }),
        }
    }
}

/// A minibatch's triplet loss, and each task's part of it.
#[derive(Debug, Clone)]
pub struct BatchLoss {
    /// The scalar the step minimises.
    pub loss: Tensor,
    /// Fraction of the loss's triplets already satisfied (`d⁺ < d⁻`).
    pub satisfied: f64,
    /// The hinge terms, task first: `loss = scale · Σ hinge`.
    hinge: Tensor,
    scale: f64,
    /// `[T]`: each task's own normaliser, `1 / k` for the sampled triplets and
    /// `1 / #{violating}` within the task for the others.
    task_scale: Vec<f32>,
}

impl BatchLoss {
    /// `[T]`: task `t`'s part of the loss (its hinge terms under the loss's own
    /// normalisation), so that the parts sum to [`BatchLoss::loss`] and the
    /// gradient of part `t` is task `t`'s share of the step's gradient (the
    /// Update Compliance Ratio, [`crate::ucr`]). A graph of its own beside the
    /// loss's: the step does not pay for it unless it is asked for.
    pub fn per_task(&self) -> Result<Tensor> {
        Ok(self
            .hinge
            .flatten_from(1)?
            .sum(1)?
            .affine(self.scale, 0.0)?)
    }

    /// Σₜ of task `t`'s loss as if its triplets were the whole minibatch: the
    /// objective of `T` networks trained apart (`--variant independent`), each
    /// getting the gradient its task alone gives it. [`BatchLoss::loss`] would
    /// give each a `1/T` share, which Adagrad, not invariant to the gradient's
    /// scale, turns into steps up to `T` times shorter.
    pub fn tasks_apart(&self) -> Result<Tensor> {
        let sums = self.hinge.flatten_from(1)?.sum(1)?;
        let scale = Tensor::from_slice(&self.task_scale, sums.shape(), sums.device())?;
        Ok((sums * scale)?.sum_all()?)
    }
}

/// Squared-L2 triplet loss `mean [‖a−p‖² − ‖a−n‖² + α]₊` over an embedding batch
/// laid out as `T` task blocks of `[k anchors, k positives, k negatives]`: exactly
/// the sampled triplets (the paper's).
pub fn sampled_loss(emb: &Tensor, tasks: usize, k: usize, margin: f64) -> Result<BatchLoss> {
    let d = emb.dim(1)?;
    let e = emb.reshape((tasks, 3, k, d))?;
    let (a, p, n) = (e.narrow(1, 0, 1)?, e.narrow(1, 1, 1)?, e.narrow(1, 2, 1)?);
    let dp = (&a - &p)?.sqr()?.sum(D::Minus1)?;
    let dn = (&a - &n)?.sqr()?.sum(D::Minus1)?;
    let ok = dp
        .lt(&dn)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let hinge = ((dp - dn)? + margin)?.relu()?;
    Ok(BatchLoss {
        loss: hinge.mean_all()?,
        satisfied: ok / (tasks * k) as f64,
        hinge,
        scale: 1.0 / (tasks * k) as f64,
        task_scale: vec![1.0 / k as f32; tasks],
    })
}

/// Batch-all triplet loss over `T` task blocks of `n` L2-normalised embeddings
/// (`emb` is `[T·n, d]`, `labels[t·n + i]` the task-`t` class of row `i` of block
/// `t`, [`crate::data::MISSING`] where unknown): `Σ [d(a,p) − d(a,q) + α]₊ / #{violating}` over every valid `(a, p, q)`
/// inside a block. Also returns the fraction of valid triplets with `d(a,p) < d(a,q)`.
pub fn batch_all_loss(
    emb: &Tensor,
    labels: &[u16],
    tasks: usize,
    n: usize,
    margin: f64,
) -> Result<BatchLoss> {
    let dist = distances(emb, tasks, n)?;
    let anchors: Vec<usize> = (0..tasks).flat_map(|_| 0..n).collect();
    all_valid(&dist, &anchors, labels, margin)
}

/// Like [`batch_all_loss`], but every task sees every image of the minibatch:
/// `emb` is `[T·n, d]` with row `t·n + i` image `i` embedded for task `t`, and
/// `labels[t·n + i]` its task-`t` label. Task `t`'s anchors are its own block,
/// images `t·block .. (t+1)·block` (class-balanced by the sampler); positives and
/// negatives come from all `n` images.
pub fn pooled_loss(
    emb: &Tensor,
    labels: &[u16],
    tasks: usize,
    n: usize,
    block: usize,
    margin: f64,
) -> Result<BatchLoss> {
    let dist = distances(emb, tasks, n)?;
    let rows: Vec<u32> = (0..tasks)
        .flat_map(|t| (0..block).map(move |a| (t * n + t * block + a) as u32))
        .collect();
    let rows = Tensor::new(rows, emb.device())?;
    let dist = dist
        .reshape((tasks * n, n))?
        .index_select(&rows, 0)?
        .reshape((tasks, block, n))?;
    let anchors: Vec<usize> = (0..tasks)
        .flat_map(|t| (0..block).map(move |a| t * block + a))
        .collect();
    all_valid(&dist, &anchors, labels, margin)
}

/// `[T, n, n]` squared distances within each task's `n` unit vectors of `emb`.
fn distances(emb: &Tensor, tasks: usize, n: usize) -> Result<Tensor> {
    let e = emb.reshape((tasks, n, emb.dim(1)?))?;
    // 2 − 2·cos, clamped at 0 against rounding.
    Ok(e.matmul(&e.t()?)?.affine(-2.0, 2.0)?.relu()?)
}

/// The mean violating hinge over every valid triplet, from `dist[t, a, i]` (anchor
/// `a` of task `t` to candidate `i`), `anchors[t·A + a]` (the candidate that is
/// anchor `a` itself) and `labels[t·n + i]`; and the fraction satisfied.
fn all_valid(dist: &Tensor, anchors: &[usize], labels: &[u16], margin: f64) -> Result<BatchLoss> {
    let (tasks, na, n) = dist.dims3()?;
    // diff[t, a, p, q] = d(a, p) − d(a, q).
    let diff = dist.unsqueeze(3)?.broadcast_sub(&dist.unsqueeze(2)?)?;
    let mut mask = vec![0f32; tasks * na * n * n];
    for t in 0..tasks {
        let y = &labels[t * n..(t + 1) * n];
        for a in 0..na {
            let self_idx = anchors[t * na + a];
            let ya = y[self_idx];
            if ya == MISSING {
                continue;
            }
            for p in 0..n {
                if p == self_idx || y[p] != ya {
                    continue;
                }
                let row = ((t * na + a) * n + p) * n;
                for (q, &yq) in y.iter().enumerate() {
                    if yq != ya && yq != MISSING {
                        mask[row + q] = 1.0;
                    }
                }
            }
        }
    }
    let valid: f64 = mask.iter().map(|&m| m as f64).sum();
    let mask = Tensor::from_vec(mask, (tasks, na, n, n), dist.device())?;
    let hinge = ((&diff + margin)?.relu()? * &mask)?;
    let per_task: Vec<f32> = hinge
        .gt(0.0)?
        .to_dtype(DType::F32)?
        .flatten_from(1)?
        .sum(1)?
        .to_vec1()?;
    let violating = per_task.iter().map(|&v| v as f64).sum::<f64>();
    let loss = (hinge.sum_all()? / violating.max(1.0))?;
    let ok = (diff.lt(0.0)?.to_dtype(DType::F32)? * &mask)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok(BatchLoss {
        loss,
        satisfied: ok / valid.max(1.0),
        hinge,
        scale: 1.0 / violating.max(1.0),
        task_scale: per_task.iter().map(|&v| 1.0 / v.max(1.0)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn mining_parses_and_prints() {
        for m in [Mining::Sampled, Mining::BatchAll, Mining::Pooled] {
            assert_eq!(m.to_string().parse::<Mining>().expect("parse"), m);
            assert_eq!(
                serde_json::to_value(m).expect("json"),
                serde_json::Value::from(m.to_string())
            );
        }
        let err = "hard".parse::<Mining>().unwrap_err().to_string();
        assert!(
            err.contains("\"hard\"") && err.contains("batch-all"),
            "{err}"
        );
    }

    #[test]
    fn sampled_by_hand() {
        // Task 0, one triplet: a = (1,0), p = (0,1), n = (1,0): d⁺ = 2, d⁻ = 0, hinge
        // 2.2. Task 1: a = p = (1,0), n = (0,1): satisfied, hinge 0.
        let e = Tensor::new(
            &[[1f32, 0.], [0., 1.], [1., 0.], [1., 0.], [1., 0.], [0., 1.]],
            &Device::Cpu,
        )
        .expect("t");
        let l = sampled_loss(&e, 2, 1, 0.2).expect("loss");
        assert!((l.loss.to_scalar::<f32>().expect("s") - 1.1).abs() < 1e-6);
        assert_eq!(l.satisfied, 0.5);
        let parts = l.per_task().expect("parts").to_vec1::<f32>().expect("v");
        assert!(
            (parts[0] - 1.1).abs() < 1e-6 && parts[1] == 0.0,
            "{parts:?}"
        );
        // Apart, task 0's one triplet is its whole loss.
        let apart = l
            .tasks_apart()
            .expect("apart")
            .to_scalar::<f32>()
            .expect("s");
        assert!((apart - 2.2).abs() < 1e-6, "{apart}");
    }

    #[test]
    fn batch_all_by_hand() {
        // One task, 3 unit vectors: rows 0 and 1 labelled true, row 2 false.
        // Valid triplets: (0,1,2) and (1,0,2). e0 = (1,0), e1 = (0,1), e2 = (1,0):
        // d01 = 2, d02 = 0, d12 = 2. (0,1,2): 2 − 0 + 0.2 = 2.2; (1,0,2): 2 − 2 + 0.2 = 0.2.
        let e = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 0.]], &Device::Cpu).expect("t");
        let BatchLoss {
            loss, satisfied, ..
        } = batch_all_loss(&e, &[1, 1, 0], 1, 3, 0.2).expect("loss");
        let loss = loss.to_scalar::<f32>().expect("s");
        assert!(
            (loss - 1.2).abs() < 1e-5,
            "loss {loss}, want (2.2 + 0.2) / 2"
        );
        assert_eq!(satisfied, 0.0);
        // Separated: e2 opposite to the pair: every triplet satisfied, loss 0.
        let e = Tensor::new(&[[1f32, 0.], [1., 0.], [-1., 0.]], &Device::Cpu).expect("t");
        let l = batch_all_loss(&e, &[1, 1, 0], 1, 3, 0.2).expect("loss");
        assert_eq!(l.loss.to_scalar::<f32>().expect("s"), 0.0);
        assert_eq!(l.satisfied, 1.0);
    }

    /// What the brute force finds: the loss, the fraction satisfied, each task's
    /// part of the loss, and the sum of each task's loss alone.
    type Expected = (f64, f64, Vec<f64>, f64);

    /// [`Expected`] by explicit loops: task `t`'s anchors are `anchors(t)`, its
    /// candidates rows `t·n .. (t+1)·n` of `e`.
    fn brute_force(
        e: &[Vec<f32>],
        labels: &[u16],
        tasks: usize,
        n: usize,
        anchors: impl Fn(usize) -> Vec<usize>,
        margin: f64,
    ) -> Expected {
        let d = |i: usize, j: usize| -> f64 {
            e[i].iter()
                .zip(&e[j])
                .map(|(x, y)| ((x - y) * (x - y)) as f64)
                .sum()
        };
        let (mut sums, mut violating, mut valid, mut ok) = (vec![0.0; tasks], 0, 0, 0);
        let mut task_violating = vec![0usize; tasks];
        for t in 0..tasks {
            let y = |i: usize| labels[t * n + i];
            for a in anchors(t).into_iter().filter(|&a| y(a) != MISSING) {
                for p in (0..n).filter(|&p| p != a && y(p) == y(a)) {
                    for q in (0..n).filter(|&q| y(q) != y(a) && y(q) != MISSING) {
                        let (dp, dq) = (d(t * n + a, t * n + p), d(t * n + a, t * n + q));
                        valid += 1;
                        ok += (dp < dq) as usize;
                        let h = dp - dq + margin;
                        if h > 0.0 {
                            sums[t] += h;
                            violating += 1;
                            task_violating[t] += 1;
                        }
                    }
                }
            }
        }
        let scale = 1.0 / violating.max(1) as f64;
        let parts: Vec<f64> = sums.iter().map(|s| s * scale).collect();
        let apart = sums
            .iter()
            .zip(&task_violating)
            .map(|(s, &v)| s / v.max(1) as f64)
            .sum();
        (parts.iter().sum(), ok as f64 / valid as f64, parts, apart)
    }

    #[test]
    fn batch_all_and_pooled_match_brute_force() {
        let (tasks, n, block) = (2, 6, 3);
        let e = Tensor::randn(0f32, 1.0, (tasks * n, 4), &Device::Cpu).expect("e");
        let e = crate::net::l2_normalize(&e).expect("norm");
        let rows = e.to_vec2::<f32>().expect("rows");
        // Three classes and some unknown labels.
        let labels: Vec<u16> = (0..tasks * n)
            .map(|i| {
                if i % 5 == 4 {
                    MISSING
                } else {
                    ((i * 7 + i / 5) % 3) as u16
                }
            })
            .collect();
        let check = |l: BatchLoss, (want, want_ok, want_parts, want_apart): Expected| {
            let apart = l
                .tasks_apart()
                .expect("apart")
                .to_scalar::<f32>()
                .expect("s") as f64;
            assert!(
                (apart - want_apart).abs() < 1e-5,
                "apart {apart}, want {want_apart}"
            );
            let loss = l.loss.to_scalar::<f32>().expect("s") as f64;
            assert!((loss - want).abs() < 1e-5, "loss {loss}, want {want}");
            let ok = l.satisfied;
            assert!((ok - want_ok).abs() < 1e-9, "ok {ok}, want {want_ok}");
            let parts = l.per_task().expect("parts").to_vec1::<f32>().expect("v");
            assert_eq!(parts.len(), tasks);
            for (p, w) in parts.iter().zip(&want_parts) {
                assert!(
                    (*p as f64 - w).abs() < 1e-5,
                    "parts {parts:?}, want {want_parts:?}"
                );
            }
        };
        check(
            batch_all_loss(&e, &labels, tasks, n, 0.3).expect("batch-all"),
            brute_force(&rows, &labels, tasks, n, |_| (0..n).collect(), 0.3),
        );
        check(
            pooled_loss(&e, &labels, tasks, n, block, 0.3).expect("pooled"),
            brute_force(
                &rows,
                &labels,
                tasks,
                n,
                |t| (t * block..(t + 1) * block).collect(),
                0.3,
            ),
        );
    }
}
