//! Adagrad (Duchi et al. 2011), the optimizer of the paper's section 4.1, over candle
//! `Var`s (candle 0.11 has none).
//!
//! Per parameter: `G ← G + g²`, `θ ← θ − lr · g / (√G + ε)`, with `G` starting at
//! `initial_accumulator` (0.1, TensorFlow's default, which the authors' code used).
//!
//! The update is two in-place passes per parameter (`G`, then `θ`): on the CPU,
//! and on CUDA where its nodes run (`inplace.cu`). Elsewhere it is candle's tensor
//! ops, which allocate a tensor for each of seven steps. On the CPU both compute
//! the same f32 operations in the same order, so they give the same bits; on the
//! GPU the kernel fuses some multiply-adds into one rounding.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;
use crate::inplace::Pass;

/// Adagrad state: one accumulator per parameter.
#[derive(Debug)]
pub struct Adagrad {
    params: Vec<(String, Var)>,
    accum: Vec<Tensor>,
    /// Learning rate of the next step.
    pub lr: f64,
    eps: f64,
}

impl Adagrad {
    /// TensorFlow's defaults besides the learning rate.
    pub const INITIAL_ACCUMULATOR: f64 = 0.1;
    /// Added to `√G` for stability.
    pub const EPS: f64 = 1e-7;

    /// Optimises `params` (named, for saving the state) with accumulators starting
    /// at [`Adagrad::INITIAL_ACCUMULATOR`].
    pub fn new(params: Vec<(String, Var)>, lr: f64) -> Result<Self> {
        Self::with_initial_accumulator(params, lr, Self::INITIAL_ACCUMULATOR)
    }

    /// Like [`Adagrad::new`] with accumulators starting at `initial` (PyTorch uses 0,
    /// which makes the first step `lr · sign(g)`).
    pub fn with_initial_accumulator(
        params: Vec<(String, Var)>,
        lr: f64,
        initial: f64,
    ) -> Result<Self> {
        let accum = params
            .iter()
            .map(|(_, v)| v.ones_like().and_then(|t| t.affine(initial, 0.0)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Adagrad {
            params,
            accum,
            lr,
            eps: Self::EPS,
        })
    }

    /// Applies one update from `grads`; parameters without a gradient are untouched.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(grads, true)
    }

    /// [`Adagrad::step`], through the in-place passes when `in_place` and the
    /// parameters are on the CPU (or on CUDA where its nodes run), else through
    /// candle's tensor ops.
    fn step_with(&mut self, grads: &GradStore, in_place: bool) -> Result<()> {
        for ((_, var), acc) in self.params.iter().zip(self.accum.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            // Gradients built from tracked tensors track the step's graph themselves;
            // state kept from them would hold every step's activations alive.
            let g = &g.detach();
            if in_place && (var.device().is_cpu() || crate::ops::cuda_nodes(var.as_tensor())) {
                let g = &g.contiguous()?;
                let (lr, eps) = (self.lr as f32, self.eps as f32);
                Pass::new("adagrad G", |a, g, _| a + g * g)
                    .cuda("adagrad_accumulate", [0.0; 4])
                    .run(acc, g, g)?;
                // candle's ops in the same order: `(g / (√G·1 + ε))·lr + 0`.
                let theta = move |t: f32, g: f32, a: f32| t - (g / (a.sqrt() + eps) * lr + 0.0);
                Pass::new("adagrad θ", theta)
                    .cuda("adagrad_update", [lr, eps, 0.0, 0.0])
                    .run(var.as_tensor(), g, acc)?;
            } else {
                *acc = (&*acc + g.sqr()?)?;
                let update = (g / (acc.sqrt()? + self.eps)?)?;
                var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            }
        }
        Ok(())
    }

    /// The accumulators by parameter name, for checkpoints. The update writes
    /// them in place: copy a tensor to keep its value past the next step.
    pub fn state(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params
            .iter()
            .map(|(n, _)| n.as_str())
            .zip(self.accum.iter())
    }

    /// Restores an accumulator saved by [`Adagrad::state`].
    pub fn set_state(&mut self, name: &str, value: &Tensor) -> Result<()> {
        if let Some(i) = self.params.iter().position(|(n, _)| n == name) {
            let want = self.accum[i].shape().clone();
            // A copy of its own: the update writes it in place.
            let value = value.reshape(want)?.to_device(self.accum[i].device())?;
            self.accum[i] = value.copy()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn two_steps_match_hand_computation() {
        let dev = Device::Cpu;
        let v = Var::new(&[1.0f32, -2.0], &dev).expect("var");
        let mut opt = Adagrad::new(vec![("w".into(), v.clone())], 0.5).expect("opt");
        // loss = Σ w² / 2 → g = w.
        for _ in 0..2 {
            let loss =
                (v.as_tensor().sqr().expect("sqr").sum_all().expect("sum") * 0.5).expect("half");
            opt.step(&loss.backward().expect("bwd")).expect("step");
        }
        // By hand, for w0 = 1: G1 = 0.1 + 1 = 1.1, w1 = 1 − 0.5·1/√1.1;
        // G2 = 1.1 + w1², w2 = w1 − 0.5·w1/√G2. Likewise for −2.
        let hand = |w0: f64| {
            let g1 = 0.1 + w0 * w0;
            let w1 = w0 - 0.5 * w0 / (g1.sqrt() + 1e-7);
            let g2 = g1 + w1 * w1;
            w1 - 0.5 * w1 / (g2.sqrt() + 1e-7)
        };
        let got = v.as_tensor().to_vec1::<f32>().expect("vec");
        for (g, w0) in got.iter().zip([1.0, -2.0]) {
            let want = hand(w0) as f32;
            assert!((g - want).abs() < 1e-6, "got {g}, want {want}");
        }
    }

    /// The in-place CPU passes give the tensor ops' bits, on a parameter small
    /// enough for one thread and one split into rayon tasks, over a few steps.
    #[test]
    fn in_place_passes_match_tensor_ops_bit_for_bit() {
        use crate::inplace::test_util::{bits, grads, params};
        let (a, b) = (params(), params());
        let mut fused = Adagrad::new(a.clone(), 0.01).expect("opt");
        let mut plain = Adagrad::new(b.clone(), 0.01).expect("opt");
        let weights = |p: &[(String, Var)]| bits(p.iter().map(|(_, v)| v.as_tensor()));
        let state = |o: &Adagrad| bits(o.state().map(|(_, t)| t));
        for step in 0..3 {
            fused.step_with(&grads(&a), true).expect("fused");
            plain.step_with(&grads(&b), false).expect("plain");
            assert_eq!(weights(&a), weights(&b), "weights after step {step}");
            assert_eq!(
                state(&fused),
                state(&plain),
                "accumulators after step {step}"
            );
        }
        assert_ne!(weights(&a), weights(&params()), "the steps changed nothing");
    }

    /// On a GPU (`scripts/gpu/bench.sh`), the passes' kernels agree with candle's
    /// tensor ops there to a few units in the last place.
    #[cfg(feature = "cuda")]
    #[test]
    fn in_place_kernels_match_tensor_ops_on_the_gpu() {
        use crate::inplace::test_util::{assert_close, grads, params_on, values};
        let Some(dev) = crate::ops::cudnn::test_gpu("adagrad in-place kernels") else {
            return;
        };
        let (a, b) = (params_on(&dev), params_on(&dev));
        assert!(
            crate::ops::cuda_nodes(a[0].1.as_tensor()),
            "the CUDA nodes are off (MODTRAIN_CUDNN=0?): the kernels would go untested"
        );
        let mut fused = Adagrad::new(a.clone(), 0.01).expect("opt");
        let mut plain = Adagrad::new(b.clone(), 0.01).expect("opt");
        let weights = |p: &[(String, Var)]| values(p.iter().map(|(_, v)| v.as_tensor()));
        let state = |o: &Adagrad| values(o.state().map(|(_, t)| t));
        for step in 0..3 {
            fused.step_with(&grads(&a), true).expect("fused");
            plain.step_with(&grads(&b), false).expect("plain");
            assert_close(&weights(&a), &weights(&b), &format!("weights, step {step}"));
            assert_close(
                &state(&fused),
                &state(&plain),
                &format!("accumulators, step {step}"),
            );
        }
    }
}
