//! The task-relation regulariser of the paper's eq. 8 (section 3.3): prior
//! knowledge that task `i` is closer to task `j` than to task `k` (smile to open
//! mouth rather than to young), as a hinge on the distances between their
//! modulation:
//!
//! `L_a = max(0, ‖W_i − W_j‖² + β − ‖W_i − W_k‖²)`, weighted by `λ` and added to
//! the triplet loss (`modtrain train --task-relation i,j,k --relation-margin β
//! --relation-weight λ`).
//!
//! `W_t` is task `t`'s modulation as the network applies it, every modulated
//! layer's concatenated ([`crate::net::Network::task_vectors`]). The paper gives
//! no values for β and λ; the defaults, [`DEFAULT_MARGIN`] and [`DEFAULT_WEIGHT`],
//! keep the term small beside the triplet loss at the tiny spec. Only the
//! modulation vectors receive its gradient, so it does not change the Update
//! Compliance Ratio's per-task gradients on the shared parameters.

use candle_core::Tensor;

use crate::{Error, Result};

/// β when none is given.
pub const DEFAULT_MARGIN: f64 = 1.0;
/// λ when none is given.
pub const DEFAULT_WEIGHT: f64 = 0.01;

/// `Σ max(0, ‖W_i − W_j‖² + margin − ‖W_i − W_k‖²)` over `relations` (task
/// indices `[i, j, k]`) of the task vectors `w` (`[T, P]`): a scalar.
pub fn relation_loss(w: &Tensor, relations: &[[usize; 3]], margin: f64) -> Result<Tensor> {
    let dist = |a: usize, b: usize| -> candle_core::Result<Tensor> {
        (w.get(a)? - w.get(b)?)?.sqr()?.sum_all()
    };
    let mut terms = Vec::with_capacity(relations.len());
    for &[i, j, k] in relations {
        terms.push(((dist(i, j)? + margin)? - dist(i, k)?)?.relu()?);
    }
    Ok(Tensor::stack(&terms, 0)?.sum_all()?)
}

/// Task indices of `relations` (names, case-insensitive) among `tasks`: three
/// different tasks of the run each.
pub fn resolve(relations: &[[String; 3]], tasks: &[String]) -> Result<Vec<[usize; 3]>> {
    relations
        .iter()
        .map(|r| {
            let idx = r
                .clone()
                .map(|name| tasks.iter().position(|t| t.eq_ignore_ascii_case(&name)));
            match idx {
                [Some(i), Some(j), Some(k)] if i != j && j != k && i != k => Ok([i, j, k]),
                [Some(_), Some(_), Some(_)] => Err(Error::Config(format!(
                    "--task-relation {}: name three different tasks (i is closer to j than to k)",
                    r.join(",")
                ))),
                _ => Err(Error::Config(format!(
                    "--task-relation {}: each must be one of the run's tasks ({})",
                    r.join(","),
                    tasks.join(", ")
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hinge_by_hand() {
        // W_0 = (0, 0), W_1 = (1, 0), W_2 = (0, 2): d01 = 1, d02 = 4.
        let w = Tensor::new(&[[0f32, 0.], [1., 0.], [0., 2.]], &Device::Cpu).expect("w");
        let v = |r: &[[usize; 3]], m: f64| {
            relation_loss(&w, r, m)
                .and_then(|t| Ok(t.to_scalar::<f32>()?))
                .expect("loss")
        };
        assert_eq!(v(&[[0, 1, 2]], 0.5), 0.0, "1 + 0.5 < 4");
        assert_eq!(v(&[[0, 1, 2]], 3.5), 0.5);
        assert_eq!(v(&[[0, 2, 1]], 0.5), 3.5, "4 + 0.5 − 1");
        assert_eq!(v(&[[0, 1, 2], [0, 2, 1]], 0.5), 3.5);
    }

    #[test]
    fn names_resolve_or_say_what_exists() {
        let tasks = ["smiling", "mouth_slightly_open", "young"].map(String::from);
        let r = |a: &str, b: &str, c: &str| [a, b, c].map(String::from);
        assert_eq!(
            resolve(&[r("Smiling", "mouth_slightly_open", "young")], &tasks).expect("ok"),
            [[0, 1, 2]]
        );
        let err = resolve(&[r("smile", "young", "smiling")], &tasks)
            .unwrap_err()
            .to_string();
        assert!(err.contains("smiling, mouth_slightly_open, young"), "{err}");
        let err = resolve(&[r("young", "young", "smiling")], &tasks)
            .unwrap_err()
            .to_string();
        assert!(err.contains("three different tasks"), "{err}");
    }
}
