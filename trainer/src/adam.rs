//! Adam (Kingma and Ba, 2015) over candle `Var`s: an alternative to the paper's
//! Adagrad ([`crate::adagrad`]), whose step size does not shrink with small
//! gradients (Adagrad's starting accumulator of 0.1 divides a gradient of 10⁻³ by
//! ~0.3), which suits the short CPU runs this crate makes.
//!
//! Per parameter, with one step count `t` for all parameters:
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `θ ← θ − lr · m̂ / (√v̂ + ε)` with the bias corrections `m̂ = m / (1−β₁ᵗ)` and
//! `v̂ = v / (1−β₂ᵗ)`. No weight decay. `m` and `v` start at 0.
//!
//! The update is three in-place passes per parameter (`m`, `v`, then `θ`): on the
//! CPU, and on CUDA where its nodes run (`inplace.cu`). Elsewhere it is candle's
//! tensor ops. On the CPU both compute the same f32 operations in the same order,
//! so they give the same bits; on the GPU the kernels fuse some multiply-adds into
//! one rounding.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;
use crate::inplace::Pass;

/// Adam state: two moments per parameter and the step count.
#[derive(Debug)]
pub struct Adam {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken so far (`t` of the last update).
    steps: u64,
    /// Learning rate of the next step.
    pub lr: f64,
}

impl Adam {
    /// Decay of the first moment.
    pub const BETA1: f64 = 0.9;
    /// Decay of the second moment.
    pub const BETA2: f64 = 0.999;
    /// Added to `√v̂` for stability.
    pub const EPS: f64 = 1e-8;

    /// Optimises `params` (named, for saving the state) with zero moments.
    pub fn new(params: Vec<(String, Var)>, lr: f64) -> Result<Self> {
        let zeros = || {
            params
                .iter()
                .map(|(_, v)| v.zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(Adam {
            m: zeros()?,
            v: zeros()?,
            params,
            steps: 0,
            lr,
        })
    }

    /// Applies one update from `grads`; parameters without a gradient are untouched
    /// (their moments do not decay), but the shared step count advances.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(grads, true)
    }

    /// [`Adam::step`], through the in-place passes when `in_place` and the
    /// parameters are on the CPU (or on CUDA where its nodes run), else through
    /// candle's tensor ops.
    fn step_with(&mut self, grads: &GradStore, in_place: bool) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let bc1 = 1.0 - Self::BETA1.powi(t);
        let bc2 = 1.0 - Self::BETA2.powi(t);
        for (((_, var), m), v) in self
            .params
            .iter()
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            let Some(g) = grads.get(var) else { continue };
            // Gradients built from tracked tensors track the step's graph themselves;
            // state kept from them would hold every step's activations alive.
            let g = &g.detach();
            if in_place && (var.device().is_cpu() || crate::ops::cuda_nodes(var.as_tensor())) {
                let g = &g.contiguous()?;
                // candle's ops in the same order: `x * c` and `x / c` are
                // `x·c + 0` and `x·(1/c) + 0`, `x + ε` is `x·1 + ε`.
                let f = |x: f64| x as f32;
                let (b1, c1, b2, c2) = (
                    f(Self::BETA1),
                    f(1.0 - Self::BETA1),
                    f(Self::BETA2),
                    f(1.0 - Self::BETA2),
                );
                let (ibc1, ibc2, eps, lr) = (f(1.0 / bc1), f(1.0 / bc2), f(Self::EPS), f(self.lr));
                Pass::new("adam m", move |m, g, _| (m * b1 + 0.0) + (g * c1 + 0.0))
                    .cuda("adam_m", [b1, c1, 0.0, 0.0])
                    .run(m, g, g)?;
                Pass::new("adam v", move |v, g, _| (v * b2 + 0.0) + (g * g * c2 + 0.0))
                    .cuda("adam_v", [b2, c2, 0.0, 0.0])
                    .run(v, g, g)?;
                let theta = move |t: f32, m: f32, v: f32| {
                    let (mh, vh) = (m * ibc1 + 0.0, v * ibc2 + 0.0);
                    t - (mh / (vh.sqrt() + eps) * lr + 0.0)
                };
                Pass::new("adam θ", theta)
                    .cuda("adam_update", [ibc1, ibc2, eps, lr])
                    .run(var.as_tensor(), m, v)?;
            } else {
                *m = ((&*m * Self::BETA1)? + (g * (1.0 - Self::BETA1))?)?;
                *v = ((&*v * Self::BETA2)? + (g.sqr()? * (1.0 - Self::BETA2))?)?;
                let m_hat = (&*m / bc1)?;
                let v_hat = (&*v / bc2)?;
                let update = (m_hat / (v_hat.sqrt()? + Self::EPS)?)?;
                var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            }
        }
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Restores the step count saved from [`Adam::steps`].
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// `(parameter name, m, v)` for every parameter, for checkpoints. The CPU update
    /// writes them in place: copy a tensor to keep its value past the next step.
    pub fn moments(&self) -> impl Iterator<Item = (&str, &Tensor, &Tensor)> {
        self.params
            .iter()
            .zip(self.m.iter().zip(&self.v))
            .map(|((n, _), (m, v))| (n.as_str(), m, v))
    }

    /// Restores the first moment of parameter `name`; unknown names are ignored.
    pub fn set_first_moment(&mut self, name: &str, value: &Tensor) -> Result<()> {
        if let Some(i) = self.params.iter().position(|(n, _)| n == name) {
            self.m[i] = restore(&self.m[i], value)?;
        }
        Ok(())
    }

    /// Restores the second moment of parameter `name`; unknown names are ignored.
    pub fn set_second_moment(&mut self, name: &str, value: &Tensor) -> Result<()> {
        if let Some(i) = self.params.iter().position(|(n, _)| n == name) {
            self.v[i] = restore(&self.v[i], value)?;
        }
        Ok(())
    }
}

/// A copy of `value` in the shape and on the device of `like` (a copy of its own:
/// the update writes it in place).
fn restore(like: &Tensor, value: &Tensor) -> Result<Tensor> {
    Ok(value
        .reshape(like.shape())?
        .to_device(like.device())?
        .copy()?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn two_steps_match_hand_computation() {
        let dev = Device::Cpu;
        let v = Var::new(&[1.0f32, -2.0, 0.0], &dev).expect("var");
        let mut opt = Adam::new(vec![("w".into(), v.clone())], 0.1).expect("opt");
        // loss = Σ w² / 2 → g = w.
        for _ in 0..2 {
            let loss =
                (v.as_tensor().sqr().expect("sqr").sum_all().expect("sum") * 0.5).expect("half");
            opt.step(&loss.backward().expect("bwd")).expect("step");
        }
        assert_eq!(opt.steps(), 2);
        // By hand, for w0 = 1: m1 = 0.1, v1 = 0.001, m̂ = 1, v̂ = 1, so
        // w1 = 1 − 0.1·1/(1 + 1e-8) ≈ 0.9 (the first Adam step is lr·sign(g)).
        // Then g = w1: m2 = 0.9·0.1 + 0.1·w1, v2 = 0.999·0.001 + 0.001·w1²,
        // m̂ = m2/(1 − 0.81), v̂ = v2/(1 − 0.998001), w2 = w1 − 0.1·m̂/(√v̂ + 1e-8).
        let hand = |w0: f64| {
            let (b1, b2, eps, lr) = (0.9, 0.999, 1e-8, 0.1);
            let (m1, v1) = ((1.0 - b1) * w0, (1.0 - b2) * w0 * w0);
            let (mh, vh) = (m1 / (1.0 - b1), v1 / (1.0 - b2));
            let w1 = w0 - lr * mh / (f64::sqrt(vh) + eps);
            let (m2, v2) = (b1 * m1 + (1.0 - b1) * w1, b2 * v1 + (1.0 - b2) * w1 * w1);
            let (mh, vh) = (m2 / (1.0 - b1 * b1), v2 / (1.0 - b2 * b2));
            w1 - lr * mh / (f64::sqrt(vh) + eps)
        };
        let got = v.as_tensor().to_vec1::<f32>().expect("vec");
        // w0 = 1: w1 = 0.9, w2 ≈ 0.8; w0 = 0 stays 0 (zero gradient, zero moments).
        assert!((hand(1.0) - 0.8).abs() < 0.01, "hand {}", hand(1.0));
        for (g, w0) in got.iter().zip([1.0, -2.0, 0.0]) {
            let want = hand(w0) as f32;
            assert!((g - want).abs() < 1e-6, "w0 {w0}: got {g}, want {want}");
        }
    }

    #[test]
    fn restored_state_continues_identically() {
        let dev = Device::Cpu;
        let run = |opt: &mut Adam, v: &Var| {
            let loss =
                (v.as_tensor().sqr().expect("sqr").sum_all().expect("sum") * 0.5).expect("half");
            opt.step(&loss.backward().expect("bwd")).expect("step");
        };
        let a = Var::new(&[0.5f32, -1.5], &dev).expect("var");
        let mut oa = Adam::new(vec![("w".into(), a.clone())], 0.05).expect("opt");
        run(&mut oa, &a);
        let b = Var::new(a.as_tensor().to_vec1::<f32>().expect("v"), &dev).expect("var");
        let mut ob = Adam::new(vec![("w".into(), b.clone())], 0.05).expect("opt");
        let (_, m, v) = oa.moments().next().expect("state");
        let (m, v) = (m.clone(), v.clone());
        ob.set_first_moment("w", &m).expect("m");
        ob.set_second_moment("w", &v).expect("v");
        ob.set_steps(oa.steps());
        run(&mut oa, &a);
        run(&mut ob, &b);
        assert_eq!(
            a.as_tensor().to_vec1::<f32>().expect("a"),
            b.as_tensor().to_vec1::<f32>().expect("b")
        );
    }

    /// The in-place CPU passes give the tensor ops' bits, on a parameter small
    /// enough for one thread and one split into rayon tasks, over a few steps.
    #[test]
    fn in_place_passes_match_tensor_ops_bit_for_bit() {
        use crate::inplace::test_util::{bits, grads, params};
        let (a, b) = (params(), params());
        let mut fused = Adam::new(a.clone(), 0.01).expect("opt");
        let mut plain = Adam::new(b.clone(), 0.01).expect("opt");
        let weights = |p: &[(String, Var)]| bits(p.iter().map(|(_, v)| v.as_tensor()));
        let moments = |o: &Adam| bits(o.moments().flat_map(|(_, m, v)| [m, v]));
        for step in 0..3 {
            fused.step_with(&grads(&a), true).expect("fused");
            plain.step_with(&grads(&b), false).expect("plain");
            assert_eq!(weights(&a), weights(&b), "weights after step {step}");
            assert_eq!(
                moments(&fused),
                moments(&plain),
                "moments after step {step}"
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
        let Some(dev) = crate::ops::cudnn::test_gpu("adam in-place kernels") else {
            return;
        };
        let (a, b) = (params_on(&dev), params_on(&dev));
        assert!(
            crate::ops::cuda_nodes(a[0].1.as_tensor()),
            "the CUDA nodes are off (MODTRAIN_CUDNN=0?): the kernels would go untested"
        );
        let mut fused = Adam::new(a.clone(), 0.01).expect("opt");
        let mut plain = Adam::new(b.clone(), 0.01).expect("opt");
        let weights = |p: &[(String, Var)]| values(p.iter().map(|(_, v)| v.as_tensor()));
        let moments = |o: &Adam| values(o.moments().flat_map(|(_, m, v)| [m, v]));
        for step in 0..3 {
            fused.step_with(&grads(&a), true).expect("fused");
            plain.step_with(&grads(&b), false).expect("plain");
            assert_close(&weights(&a), &weights(&b), &format!("weights, step {step}"));
            assert_close(
                &moments(&fused),
                &moments(&plain),
                &format!("moments, step {step}"),
            );
        }
    }
}
