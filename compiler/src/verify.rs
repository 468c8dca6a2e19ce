//! `modc verify`: runs every graph of a package with tract on deterministic images
//! (faces from the built-in generator) and compares the embeddings with the
//! trainer's forward pass in candle, per task.

use candle_core::Device;
use modkit_models::{Checkpoint, Package};
use modkit_trainer::data::synth;
use modkit_trainer::net::network_from_checkpoint;

use crate::emit::features_shape;
use crate::tract_run::{Array, run};
use crate::{Error, Result};

/// One task's comparison.
#[derive(Debug, Clone)]
pub struct TaskCheck {
    pub task: String,
    /// `folded` or `switch`.
    pub route: &'static str,
    pub max_abs_error: f32,
}

/// The network input for `n` generated faces, `[n, 3, S, S]`.
pub fn sample_images(pkg: &Package, n: usize) -> Array {
    let s = pkg.spec.input_size;
    let mut data = Vec::with_capacity(n * 3 * s * s);
    for i in 0..n {
        let face = synth::face(2024, i as u64, s);
        for c in 0..3 {
            data.extend((0..s * s).map(|p| pkg.preprocess.apply(c, face.pixels[p * 3 + c])));
        }
    }
    (vec![n, 3, s, s], data)
}

/// Embeddings of `images` for package task `task` through tract: the trunk once,
/// then the task's folded tail or the switch tail with its vectors.
pub fn tract_embed(pkg: &Package, images: &Array, task: usize) -> Result<(Array, &'static str)> {
    let features = run("trunk", &pkg.trunk, std::slice::from_ref(images))?;
    let name = &pkg.tasks[task];
    if let Some(tail) = pkg.tails.folded(name) {
        return Ok((run("folded tail", tail, &[features])?, "folded"));
    }
    let switch = pkg.tails.switch.as_ref().ok_or_else(|| Error::Graph {
        graph: "switch tail".into(),
        msg: format!("task {name:?} has neither a folded nor a switch tail"),
    })?;
    if pkg.variant.task_numbers(&pkg.spec).is_empty() {
        return Ok((run("shared tail", switch, &[features])?, "switch"));
    }
    // One image at a time: the switch tail takes one feature map and B task vectors.
    let (c, hw) = features_shape(&pkg.spec);
    let per = c * hw * hw;
    let n = images.0[0];
    let mut out = Vec::new();
    let mut dim = 0;
    for i in 0..n {
        let mut inputs = vec![(
            vec![1, c, hw, hw],
            features.1[i * per..(i + 1) * per].to_vec(),
        )];
        for v in &pkg.task_vectors[task] {
            inputs.push((vec![1, v.len()], v.clone()));
        }
        let (shape, e) = run("switch tail", switch, &inputs)?;
        dim = shape[1];
        out.extend(e);
    }
    Ok(((vec![n, dim], out), "switch"))
}

/// The largest `|a − b|`, NaN when either side holds a NaN (`f32::max` would
/// drop it and let a broken graph pass).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, |m, d| {
            if d.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

/// Compares every task of `pkg` with `ckpt` on `n` images.
pub fn verify(pkg: &Package, ckpt: &Checkpoint, n: usize) -> Result<Vec<TaskCheck>> {
    if n == 0 {
        return Err(Error::Request(
            "no images to compare on: pass --images 1 or more".into(),
        ));
    }
    if ckpt.header.spec != pkg.spec || ckpt.header.variant != pkg.variant {
        return Err(Error::Graph {
            graph: "package".into(),
            msg: format!(
                "was compiled from another network ({} {}) than the checkpoint ({} {})",
                pkg.spec.name, pkg.variant, ckpt.header.spec.name, ckpt.header.variant
            ),
        });
    }
    let device = Device::Cpu;
    let (_vm, net) = network_from_checkpoint(ckpt, &device)?;
    let images = sample_images(pkg, n);
    let x = candle_core::Tensor::from_slice(&images.1, images.0.as_slice(), &device)?;
    let mut out = Vec::new();
    for (t, name) in pkg.tasks.iter().enumerate() {
        let ct = ckpt
            .header
            .tasks
            .iter()
            .position(|x| x == name)
            .ok_or_else(|| {
                Error::Request(format!(
                    "the package's task {name:?} is not among the checkpoint's ({}): verify against the checkpoint it was compiled from",
                    ckpt.header.tasks.join(", ")
                ))
            })?;
        let reference = net
            .forward_grouped(&x, &[(ct, n)], false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let ((_, got), route) = tract_embed(pkg, &images, t)?;
        if got.len() != reference.len() {
            return Err(Error::Graph {
                graph: route.into(),
                msg: format!(
                    "task {name:?} gave {} values for {n} images where the checkpoint gives {}: compile the package again",
                    got.len(),
                    reference.len()
                ),
            });
        }
        let max_abs_error = max_abs_diff(&reference, &got);
        out.push(TaskCheck {
            task: name.clone(),
            route,
            max_abs_error,
        });
    }
    Ok(out)
}
