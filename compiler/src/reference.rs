//! The reference `modc verify` holds packages to: the checkpoint evaluated directly,
//! in plain Rust, as the trainer evaluates it. BatchNorm stays unfolded
//! (`γ·(y − μ)/√(σ² + ε) + β`), and each task's modulation is applied where the
//! network applies it: after blocks N..=5 and after fc (paper eq. 1–3, ReLU on the
//! vectors, or the channel-wise projection), then `branch:K`'s head or CSN's mask,
//! then L2 normalisation.
//!
//! It shares nothing with the folds and the ONNX emitter but the checkpoint's
//! tensor names, so a mistake in either shows as a difference. It needs neither
//! candle nor the trainer (the design keeps the compiler to `models` and
//! tract-onnx); the tests check it against the trainer's forward pass for every
//! variant. Convolutions are im2col and one matrix product each, with tract's
//! `ndarray`, so the paper spec takes a fraction of a second per image.

use std::path::Path;

use modkit_models::{BATCH_NORM_EPS, Checkpoint, Modulation, StageShape, Variant, names};
use tract_onnx::prelude::tract_ndarray::{ArrayView1, ArrayView2};

use crate::tract_run::Array;
use crate::{Error, Result};

/// Feature maps of one image, `[C, H, W]`; fc's output is `[E, 1, 1]`.
#[derive(Debug, Clone)]
struct Maps {
    c: usize,
    h: usize,
    w: usize,
    data: Vec<f32>,
}

impl Maps {
    fn spatial(&self) -> usize {
        self.h * self.w
    }

    fn relu(mut self) -> Self {
        self.data.iter_mut().for_each(|v| *v = v.max(0.0));
        self
    }
}

/// One task's network in `ckpt`: its backbone's prefix and its row of the per-task
/// tensors.
struct TaskNet<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    task: usize,
}

fn shape_error(what: &str, why: String) -> Error {
    Error::Graph {
        graph: "reference".into(),
        msg: format!("{what}: {why}"),
    }
}

impl TaskNet<'_> {
    fn tensor(&self, name: &str) -> Result<&[f32]> {
        Ok(&self.ckpt.tensor(name)?.data)
    }

    /// Row `self.task` of per-task tensor `name` (`[T, …]`).
    fn task_row(&self, name: &str) -> Result<&[f32]> {
        let t = self.ckpt.tensor(name)?;
        let per = t.data.len() / t.shape[0].max(1);
        t.data
            .get(self.task * per..(self.task + 1) * per)
            .ok_or_else(|| shape_error(name, format!("has no row for task {}", self.task)))
    }

    /// BatchNorm in evaluation form, or the layer's bias, on `[O, spatial]` values.
    fn affine(&self, layer: &str, y: &mut [f32], spatial: usize) -> Result<()> {
        let p = format!("{}{layer}", self.prefix);
        if self.ckpt.header.spec.batch_norm {
            let g = self.tensor(&format!("{p}.bn.weight"))?;
            let b = self.tensor(&format!("{p}.bn.bias"))?;
            let m = self.tensor(&format!("{p}.bn.running_mean"))?;
            let v = self.tensor(&format!("{p}.bn.running_var"))?;
            for (c, row) in y.chunks_mut(spatial).enumerate() {
                let d = (v[c] + BATCH_NORM_EPS as f32).sqrt();
                row.iter_mut()
                    .for_each(|x| *x = (*x - m[c]) / d * g[c] + b[c]);
            }
        } else {
            let b = self.tensor(&format!("{p}.bias"))?;
            for (c, row) in y.chunks_mut(spatial).enumerate() {
                row.iter_mut().for_each(|x| *x += b[c]);
            }
        }
        Ok(())
    }

    /// 3×3 convolution, stride 1, zero padding `pad`, then its BatchNorm or bias.
    fn conv(&self, x: &Maps, layer: &str, pad: usize) -> Result<Maps> {
        let name = format!("{}{layer}.weight", self.prefix);
        let w = self.ckpt.tensor(&name)?;
        let (o, k) = (w.shape[0], 3);
        if w.shape[1..] != [x.c, k, k] {
            return Err(shape_error(
                &name,
                format!("shape {:?} does not take {} channels", w.shape, x.c),
            ));
        }
        let (ho, wo) = ((x.h + 2 * pad + 1) - k, (x.w + 2 * pad + 1) - k);
        let plane = ho * wo;
        // im2col: row (c, ky, kx) holds input pixel (oy + ky − pad, ox + kx − pad).
        let mut cols = vec![0f32; x.c * k * k * plane];
        for c in 0..x.c {
            let src = &x.data[c * x.h * x.w..(c + 1) * x.h * x.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut cols[((c * k + ky) * k + kx) * plane..][..plane];
                    for oy in 0..ho {
                        let Some(iy) = (oy + ky).checked_sub(pad).filter(|&iy| iy < x.h) else {
                            continue;
                        };
                        for ox in 0..wo {
                            if let Some(ix) = (ox + kx).checked_sub(pad).filter(|&ix| ix < x.w) {
                                row[oy * wo + ox] = src[iy * x.w + ix];
                            }
                        }
                    }
                }
            }
        }
        let wm = ArrayView2::from_shape((o, x.c * k * k), &w.data)
            .map_err(|e| shape_error(&name, e.to_string()))?;
        let cm = ArrayView2::from_shape((x.c * k * k, plane), &cols)
            .map_err(|e| shape_error(&name, e.to_string()))?;
        let mut data: Vec<f32> = wm.dot(&cm).iter().copied().collect();
        self.affine(layer, &mut data, plane)?;
        Ok(Maps {
            c: o,
            h: ho,
            w: wo,
            data,
        })
    }

    /// Stage `k`: 1 = conv1 with its ReLU; 2..=5 = `Conv → ReLU → MaxPool(2, 2)`,
    /// then `ReLU(y + Conv(ReLU(Conv(y))))`.
    fn stage(&self, k: usize, x: &Maps) -> Result<Maps> {
        if k == 1 {
            return Ok(self.conv(x, "conv1", 0)?.relu());
        }
        let c = self.conv(x, &format!("block{k}.conv"), 0)?.relu();
        let y = max_pool(&c);
        let r = self.conv(&y, &format!("block{k}.res1"), 1)?.relu();
        let mut r = self.conv(&r, &format!("block{k}.res2"), 1)?;
        r.data.iter_mut().zip(&y.data).for_each(|(r, y)| *r += y);
        Ok(r.relu())
    }

    /// fc, with its BatchNorm or bias: `[E, 1, 1]`.
    fn fc(&self, x: &Maps) -> Result<Maps> {
        let name = format!("{}fc.weight", self.prefix);
        let w = self.ckpt.tensor(&name)?;
        let wm = ArrayView2::from_shape((w.shape[0], x.data.len()), &w.data)
            .map_err(|e| shape_error(&name, e.to_string()))?;
        let mut data: Vec<f32> = wm.dot(&ArrayView1::from(&x.data)).to_vec();
        self.affine("fc", &mut data, 1)?;
        Ok(Maps {
            c: w.shape[0],
            h: 1,
            w: 1,
            data,
        })
    }

    /// The task's modulation of `stage`'s output.
    fn modulate(&self, x: Maps, stage: Option<&StageShape>) -> Result<Maps> {
        let Some(stage) = stage else { return Ok(x) };
        let m = self.task_row(&names::modulation(stage.name))?;
        let sp = x.spatial();
        Ok(match self.ckpt.header.spec.modulation {
            Modulation::Vector => {
                let mut x = x;
                for (row, v) in x.data.chunks_mut(sp).zip(m) {
                    let s = v.max(0.0);
                    row.iter_mut().for_each(|x| *x *= s);
                }
                x
            }
            Modulation::Projection => {
                let p = ArrayView2::from_shape((x.c, x.c), m)
                    .map_err(|e| shape_error(stage.name, e.to_string()))?;
                let xm = ArrayView2::from_shape((x.c, sp), &x.data)
                    .map_err(|e| shape_error(stage.name, e.to_string()))?;
                Maps {
                    data: p.dot(&xm).iter().copied().collect(),
                    ..x
                }
            }
        })
    }

    /// One image `[C, S, S]` → its embedding for the task.
    fn embed(&self, image: Maps) -> Result<Vec<f32>> {
        let h = &self.ckpt.header;
        let spec = &h.spec;
        let stages = if h.variant.is_modulated() {
            spec.modulated_stages()
        } else {
            Vec::new()
        };
        let mut stages = stages.iter();
        let mut x = image;
        for k in 1..=spec.first_modulated {
            x = self.stage(k, &x)?;
        }
        x = self.modulate(x, stages.next())?;
        for k in spec.first_modulated + 1..=5 {
            x = self.stage(k, &x)?;
            x = self.modulate(x, stages.next())?;
        }
        let e = self.modulate(self.fc(&x)?, stages.next())?;
        let mut e = e.data;
        if let Variant::Branch { k } = h.variant {
            let w = self.task_row(names::BRANCH_WEIGHT)?;
            let b = self.task_row(names::BRANCH_BIAS)?;
            e = (0..k)
                .map(|r| {
                    b[r] + w[r * e.len()..(r + 1) * e.len()]
                        .iter()
                        .zip(&e)
                        .map(|(w, x)| w * x)
                        .sum::<f32>()
                })
                .collect();
        }
        if h.variant == Variant::Csn {
            let mask = self.task_row(names::CSN_MASKS)?;
            e.iter_mut().zip(mask).for_each(|(x, m)| *x *= m.max(0.0));
        }
        let norm = (e.iter().map(|x| x * x).sum::<f32>() + 1e-12).sqrt();
        Ok(e.into_iter().map(|x| x / norm).collect())
    }
}

/// 2×2 max-pool, stride 2, odd edges dropped.
fn max_pool(x: &Maps) -> Maps {
    let (h, w) = (x.h / 2, x.w / 2);
    let mut data = Vec::with_capacity(x.c * h * w);
    for plane in x.data.chunks(x.h * x.w) {
        for y in 0..h {
            for xx in 0..w {
                let at = |dy: usize, dx: usize| plane[(2 * y + dy) * x.w + 2 * xx + dx];
                data.push(at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1)));
            }
        }
    }
    Maps { c: x.c, h, w, data }
}

/// Embeddings `[N, E]` of `images` (`[N, C, S, S]`, normalised) for checkpoint task
/// `task`, as the trainer's evaluation computes them.
pub fn embed(ckpt: &Checkpoint, images: &Array, task: usize) -> Result<Array> {
    ckpt.validate(Path::new("the checkpoint"))?;
    let h = &ckpt.header;
    let name = h.tasks.get(task).ok_or_else(|| {
        Error::Request(format!(
            "task {task} is out of range: the checkpoint has {} tasks",
            h.tasks.len()
        ))
    })?;
    let s = h.spec.input_size;
    let per = h.spec.in_channels * s * s;
    if images.0.len() != 4 || images.0[1..] != [h.spec.in_channels, s, s] {
        return Err(Error::Request(format!(
            "images of shape {:?} do not fit the network's input [N, {}, {s}, {s}]",
            images.0, h.spec.in_channels
        )));
    }
    let net = TaskNet {
        ckpt,
        prefix: if h.variant == Variant::Independent {
            names::independent_prefix(name)
        } else {
            String::new()
        },
        task,
    };
    let mut out = Vec::new();
    for image in images.1.chunks(per) {
        out.extend(net.embed(Maps {
            c: h.spec.in_channels,
            h: s,
            w: s,
            data: image.to_vec(),
        })?);
    }
    let dim = out.len() / images.0[0].max(1);
    Ok((vec![images.0[0], dim], out))
}
