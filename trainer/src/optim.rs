//! The optimizer of a run, chosen by `--optimizer`: the paper's [`Adagrad`]
//! (section 4.1, the default) or [`Adam`], and where their state lives in a
//! checkpoint, so `--resume` continues bit-exactly.
//!
//! | tensor | shape | |
//! |---|---|---|
//! | `optimizer.adagrad.{name}` | as `{name}` | Adagrad accumulator ([`names::OPTIMIZER_PREFIX`]) |
//! | `optimizer.adam.m.{name}` | as `{name}` | Adam first moment |
//! | `optimizer.adam.v.{name}` | as `{name}` | Adam second moment |
//! | `optimizer.adam.step` | `[1]` | Adam's step count (exact in f32 up to 2²⁴ steps) |
//!
//! `{name}` is a trainable tensor of [`names::schema`]. Readers of the weights (the
//! compiler) ignore every `optimizer.` tensor.

use std::fmt;
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use modkit_models::names;
use serde::{Deserialize, Serialize};

use crate::adagrad::Adagrad;
use crate::adam::Adam;
use crate::{Error, Result};

/// Prefix of Adam's first moments.
pub const ADAM_M_PREFIX: &str = "optimizer.adam.m.";
/// Prefix of Adam's second moments.
pub const ADAM_V_PREFIX: &str = "optimizer.adam.v.";
/// Adam's step count.
pub const ADAM_STEP: &str = "optimizer.adam.step";

/// Which optimizer trains the network; stored in the run's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// The paper's (and the authors' TensorFlow code's) choice.
    #[default]
    Adagrad,
    /// Adam with β = (0.9, 0.999), ε = 1e-8, bias-corrected.
    Adam,
}

impl OptimizerKind {
    /// The learning rate used when none is given: the paper's 0.01 for Adagrad,
    /// Kingma and Ba's 0.001 for Adam.
    pub fn default_lr(self) -> f64 {
        match self {
            OptimizerKind::Adagrad => 0.01,
            OptimizerKind::Adam => 0.001,
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::Adagrad => "adagrad",
            OptimizerKind::Adam => "adam",
        })
    }
}

impl FromStr for OptimizerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adagrad" => Ok(OptimizerKind::Adagrad),
            "adam" => Ok(OptimizerKind::Adam),
            _ => Err(Error::UnknownOptimizer { value: s.into() }),
        }
    }
}

/// A configured optimizer over the trainable variables.
#[derive(Debug)]
pub enum Optimizer {
    Adagrad(Adagrad),
    Adam(Adam),
}

impl Optimizer {
    /// A fresh optimizer of `kind` over `params`; `adagrad_initial` is Adagrad's
    /// starting accumulator (unused by Adam).
    pub fn new(
        kind: OptimizerKind,
        params: Vec<(String, Var)>,
        lr: f64,
        adagrad_initial: f64,
    ) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::Adagrad => Optimizer::Adagrad(Adagrad::with_initial_accumulator(
                params,
                lr,
                adagrad_initial,
            )?),
            OptimizerKind::Adam => Optimizer::Adam(Adam::new(params, lr)?),
        })
    }

    /// Applies one update from `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Optimizer::Adagrad(o) => o.step(grads),
            Optimizer::Adam(o) => o.step(grads),
        }
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Adagrad(o) => o.lr,
            Optimizer::Adam(o) => o.lr,
        }
    }

    /// Sets the learning rate of the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optimizer::Adagrad(o) => o.lr = lr,
            Optimizer::Adam(o) => o.lr = lr,
        }
    }

    /// The state as checkpoint tensors, named as in the module docs.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match self {
            Optimizer::Adagrad(o) => o
                .state()
                // Copies: the update writes the accumulators in place.
                .map(|(n, acc)| Ok((format!("{}{n}", names::OPTIMIZER_PREFIX), acc.copy()?)))
                .collect::<Result<_>>()?,
            Optimizer::Adam(o) => {
                let mut out = Vec::new();
                for (n, m, v) in o.moments() {
                    out.push((format!("{ADAM_M_PREFIX}{n}"), m.copy()?));
                    out.push((format!("{ADAM_V_PREFIX}{n}"), v.copy()?));
                }
                let device = o.moments().next().map(|(_, m, _)| m.device().clone());
                let device = device.unwrap_or(candle_core::Device::Cpu);
                out.push((
                    ADAM_STEP.to_string(),
                    Tensor::new(&[o.steps() as f32], &device)?,
                ));
                out
            }
        })
    }

    /// Restores one tensor written by [`Optimizer::state`]. Returns false when
    /// `name` is not optimizer state (a weight); the state of another optimizer
    /// is skipped (returns true).
    pub fn load_state(&mut self, name: &str, value: &Tensor) -> Result<bool> {
        if !name.starts_with("optimizer.") {
            return Ok(false);
        }
        match self {
            Optimizer::Adagrad(o) => {
                if let Some(param) = name.strip_prefix(names::OPTIMIZER_PREFIX) {
                    o.set_state(param, value)?;
                }
            }
            Optimizer::Adam(o) => {
                if let Some(param) = name.strip_prefix(ADAM_M_PREFIX) {
                    o.set_first_moment(param, value)?;
                } else if let Some(param) = name.strip_prefix(ADAM_V_PREFIX) {
                    o.set_second_moment(param, value)?;
                } else if name == ADAM_STEP {
                    let steps = value.flatten_all()?.to_vec1::<f32>()?;
                    o.set_steps(steps.first().copied().unwrap_or(0.0) as u64);
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn kind_parses_prints_and_defaults_to_adagrad() {
        for kind in [OptimizerKind::Adagrad, OptimizerKind::Adam] {
            assert_eq!(
                kind.to_string().parse::<OptimizerKind>().expect("parse"),
                kind
            );
        }
        assert_eq!(
            "Adam".parse::<OptimizerKind>().expect("case"),
            OptimizerKind::Adam
        );
        let err = "sgd".parse::<OptimizerKind>().unwrap_err().to_string();
        assert!(
            err.contains("\"sgd\"") && err.contains("adagrad or adam"),
            "{err}"
        );
        assert_eq!(OptimizerKind::default(), OptimizerKind::Adagrad);
        assert_eq!(
            serde_json::to_string(&OptimizerKind::Adam).expect("json"),
            "\"adam\""
        );
    }

    #[test]
    fn state_does_not_keep_the_graph() {
        for kind in [OptimizerKind::Adagrad, OptimizerKind::Adam] {
            // The gradient of Σ w² is 2·w: built from the variable, it tracks the
            // graph, as candle's own backward ops produce them (on CUDA, all of them).
            let v = Var::new(&[1.0f32, -2.0], &Device::Cpu).expect("var");
            let mut opt =
                Optimizer::new(kind, vec![("w".into(), v.clone())], 0.1, 0.1).expect("opt");
            let grads = v
                .as_tensor()
                .sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            assert!(grads.get(&v).expect("g").track_op());
            opt.step(&grads).expect("step");
            for (name, t) in opt.state().expect("state") {
                assert!(!t.track_op(), "{kind}: {name} holds the step's graph");
            }
        }
    }

    /// The vendored candle-core stores the first gradient that reaches a tensor
    /// instead of adding it into zeros (`third_party/README.md`). A tensor used twice
    /// must still get the sum, and what the optimizers read must be contiguous even
    /// when the gradient arrives as a strided view.
    #[test]
    fn backprop_sums_fan_in_and_stores_contiguous_gradients() {
        let dev = Device::Cpu;
        let w = Var::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).expect("w");
        let v = Var::new(&[1f32, -2.], &dev).expect("v");
        // Through a transpose, w's gradient arrives as a transposed view: 2·w.
        let once = w.t().and_then(|t| t.sqr()).and_then(|t| t.sum_all());
        // v feeds both sides of the add: 3 + 1.
        let twice = (v.as_tensor() * 3.0)
            .and_then(|t| t + v.as_tensor())
            .and_then(|t| t.sum_all());
        let grads = (once.expect("once") + twice.expect("twice"))
            .and_then(|l| l.backward())
            .expect("bwd");
        let gw = grads.get(&w).expect("∂w");
        assert!(gw.is_contiguous());
        assert_eq!(
            gw.to_vec2::<f32>().expect("∂w"),
            [[2., 4., 6.], [8., 10., 12.]]
        );
        let gv = grads.get(&v).expect("∂v");
        assert_eq!(gv.to_vec1::<f32>().expect("∂v"), [4., 4.]);
    }

    #[test]
    fn adam_state_names_round_trip() {
        let dev = Device::Cpu;
        let v = Var::new(&[1.0f32, 2.0], &dev).expect("var");
        let mut opt = Optimizer::new(OptimizerKind::Adam, vec![("w".into(), v.clone())], 0.1, 0.1)
            .expect("opt");
        let loss = v.as_tensor().sqr().and_then(|t| t.sum_all()).expect("loss");
        opt.step(&loss.backward().expect("bwd")).expect("step");
        let state = opt.state().expect("state");
        let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "optimizer.adam.m.w",
                "optimizer.adam.v.w",
                "optimizer.adam.step"
            ]
        );

        let mut fresh =
            Optimizer::new(OptimizerKind::Adam, vec![("w".into(), v.clone())], 0.1, 0.1)
                .expect("opt");
        for (n, t) in &state {
            assert!(fresh.load_state(n, t).expect("load"), "{n}");
        }
        assert!(!fresh.load_state("w", &state[0].1).expect("weight"));
        // Adagrad state in an Adam run is optimizer state, skipped.
        assert!(
            fresh
                .load_state("optimizer.adagrad.w", &state[0].1)
                .expect("other")
        );
        let flat = |s: Vec<(String, Tensor)>| -> Vec<Vec<f32>> {
            s.iter()
                .map(|(_, t)| t.to_vec1::<f32>().expect("v"))
                .collect()
        };
        assert_eq!(flat(fresh.state().expect("s")), flat(state));
    }

    /// The CPU updates write the optimizers' state in place: a saved state must not
    /// change with later steps, nor a loaded one change the tensor it came from.
    #[test]
    fn saved_state_is_a_snapshot() {
        let dev = Device::Cpu;
        for kind in [OptimizerKind::Adagrad, OptimizerKind::Adam] {
            let v = Var::new(&[1.0f32, -2.0], &dev).expect("var");
            let params = || vec![("w".to_string(), v.clone())];
            let mut opt = Optimizer::new(kind, params(), 0.1, 0.1).expect("opt");
            let step = |opt: &mut Optimizer| {
                let loss = v.as_tensor().sqr().and_then(|t| t.sum_all()).expect("loss");
                opt.step(&loss.backward().expect("bwd")).expect("step");
            };
            step(&mut opt);
            let state = opt.state().expect("state");
            let values = |s: &[(String, Tensor)]| -> Vec<Vec<f32>> {
                s.iter()
                    .map(|(_, t)| t.to_vec1::<f32>().expect("v"))
                    .collect()
            };
            let saved = values(&state);
            step(&mut opt);
            assert_eq!(
                values(&state),
                saved,
                "{kind}: a later step changed the saved state"
            );
            assert_ne!(
                values(&opt.state().expect("state")),
                saved,
                "{kind}: state unchanged"
            );

            let mut fresh = Optimizer::new(kind, params(), 0.1, 0.1).expect("opt");
            for (n, t) in &state {
                assert!(fresh.load_state(n, t).expect("load"), "{n}");
            }
            step(&mut fresh);
            assert_eq!(
                values(&state),
                saved,
                "{kind}: a step changed the tensor it loaded"
            );
        }
    }
}
