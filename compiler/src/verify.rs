//! `modc verify`: runs every graph of a package with tract on deterministic test
//! images and compares the embeddings, per task, with the checkpoint evaluated
//! directly ([`crate::reference`]: BatchNorm and modulation unfolded, no ONNX).

use modkit_models::{Checkpoint, Package};

use crate::emit::features_shape;
use crate::reference;
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

/// The network input for `n` deterministic test images, `[n, 3, S, S]`, through
/// the package's normalisation: a colour gradient, a few discs and a fine ripple,
/// different for every index. Pictures rather than noise, so that neighbouring
/// pixels correlate and the convolutions see edges and flat regions.
pub fn sample_images(pkg: &Package, n: usize) -> Array {
    let s = pkg.spec.input_size;
    let mut data = Vec::with_capacity(n * 3 * s * s);
    for i in 0..n {
        let rgb = test_pattern(i as u64, s);
        for c in 0..3 {
            data.extend(rgb.iter().map(|px| pkg.preprocess.apply(c, px[c])));
        }
    }
    (vec![n, 3, s, s], data)
}

/// SplitMix64: a few lines of well-known, seedable randomness.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Test image `index`, `side`², row-major RGB.
fn test_pattern(index: u64, side: usize) -> Vec<[u8; 3]> {
    let mut state = 0x6d6f_646b_6974 ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut unit = || (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
    let mut colour = || [unit(), unit(), unit()];
    let (from, to) = (colour(), colour());
    let angle = unit() * std::f32::consts::TAU;
    let (ca, sa) = (angle.cos(), angle.sin());
    let ripple = (unit() * 0.5 + 0.2, unit() * 0.5 + 0.2, unit() * 6.0);
    let discs: Vec<([f32; 2], f32, [f32; 3])> = (0..4)
        .map(|_| {
            let (cx, cy, r) = (unit(), unit(), 0.08 + 0.25 * unit());
            ([cx, cy], r, [unit(), unit(), unit()])
        })
        .collect();
    let side_f = side as f32;
    (0..side * side)
        .map(|p| {
            let (x, y) = ((p % side) as f32 / side_f, (p / side) as f32 / side_f);
            let t = ((x - 0.5) * ca + (y - 0.5) * sa + 0.5).clamp(0.0, 1.0);
            let mut c: [f32; 3] = std::array::from_fn(|k| from[k] + (to[k] - from[k]) * t);
            for ([cx, cy], r, dc) in &discs {
                if (x - cx).powi(2) + (y - cy).powi(2) < r * r {
                    c = *dc;
                }
            }
            let wave = 0.08
                * (ripple.0 * (p % side) as f32 + ripple.1 * (p / side) as f32 + ripple.2).sin();
            c.map(|v| ((v + wave).clamp(0.0, 1.0) * 255.0).round() as u8)
        })
        .collect()
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

/// The most images [`verify`] compares on: it runs every graph on all of them in one
/// batch, ~0.7 MB per image at the tiny spec, far more at the paper's.
pub const MAX_IMAGES: usize = 64;

/// Compares every task of `pkg` with `ckpt` on `n` images.
pub fn verify(pkg: &Package, ckpt: &Checkpoint, n: usize) -> Result<Vec<TaskCheck>> {
    if n == 0 {
        return Err(Error::Request(
            "no images to compare on: pass --images 1 or more".into(),
        ));
    }
    if n > MAX_IMAGES {
        return Err(Error::Request(format!(
            "--images {n}: every graph runs on all of them at once, so at most {MAX_IMAGES} (a handful already shows a wrong fold)"
        )));
    }
    if ckpt.header.spec != pkg.spec || ckpt.header.variant != pkg.variant {
        return Err(Error::Graph {
            graph: "package".into(),
            msg: format!(
                "was compiled from another network than the checkpoint: {} against {}",
                describe(&pkg.spec, &pkg.variant),
                describe(&ckpt.header.spec, &ckpt.header.variant)
            ),
        });
    }
    // Both sides below are fed the package's input, so the graphs alone cannot
    // show a package that squares or normalises images otherwise than training did
    // (a version-1 package, which reads as cropping, of a `zappos:` run).
    if ckpt.header.preprocess != pkg.preprocess {
        let show = |p: &modkit_models::Preprocess| {
            format!("{:?} with mean {:?}, std {:?}", p.fit, p.mean, p.std)
        };
        return Err(Error::Graph {
            graph: "package".into(),
            msg: format!(
                "prepares images as {}, the checkpoint trained on {}: compile it again with `modc compile`",
                show(&pkg.preprocess),
                show(&ckpt.header.preprocess)
            ),
        });
    }
    let images = sample_images(pkg, n);
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
        let (_, reference) = reference::embed(ckpt, &images, ct)?;
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

/// A network in one line, every field that tells two apart: `tiny modulated,
/// 3×48×48, widths [8, 16, 32, 32, 32], embedding 32, modulated from block 4
/// (vector), BatchNorm`.
fn describe(spec: &modkit_models::NetSpec, variant: &modkit_models::Variant) -> String {
    format!(
        "{} {variant}, {}×{}×{}, widths {:?}, embedding {}, modulated from block {} ({}), {}",
        spec.name,
        spec.in_channels,
        spec.input_size,
        spec.input_size,
        spec.widths,
        spec.embedding,
        spec.first_modulated,
        format!("{:?}", spec.modulation).to_lowercase(),
        if spec.batch_norm {
            "BatchNorm"
        } else {
            "no BatchNorm"
        }
    )
}
