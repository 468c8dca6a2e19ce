//! Folds one task's modulation into the linear layer next to each module, once per
//! task (paper section 3.2; exact, because every module sits directly before a conv
//! or before/after fc):
//!
//! * a module on a block's output scales the *input* channels of the next conv
//!   (or of fc, over each channel's `H·W` columns): `W' = W·M`;
//! * the module after fc scales its *outputs*: `W' = M·W`, `b' = M·b`.
//!
//! `M` is `diag(ReLU(w))` for the channel-wise vector and the task's C×C matrix for
//! the channel-wise projection.

use modkit_models::{Modulation, NetSpec};

use crate::fold_batch_norm::{Affine, PlainNet};

/// One module's map for one task: a scale vector or a row-major C×C matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelMap {
    Scale(Vec<f32>),
    Matrix(Vec<f32>),
}

impl ChannelMap {
    /// The map of `raw` checkpoint values: ReLU'd vector, or the matrix as is.
    pub fn from_raw(kind: Modulation, raw: &[f32]) -> Self {
        match kind {
            Modulation::Vector => ChannelMap::Scale(raw.iter().map(|v| v.max(0.0)).collect()),
            Modulation::Projection => ChannelMap::Matrix(raw.to_vec()),
        }
    }
}

/// `W'[o, j, s] = Σ_i W[o, i, s]·M[i, j]` where each input channel spans `spatial`
/// consecutive weights.
fn fold_inputs(layer: &mut Affine, map: &ChannelMap, spatial: usize) {
    let (o, fan_in) = (layer.outputs(), layer.fan_in());
    let c = fan_in / spatial;
    match map {
        ChannelMap::Scale(s) => {
            for row in layer.weight.chunks_mut(fan_in) {
                for (ch, w) in row.chunks_mut(spatial).enumerate() {
                    w.iter_mut().for_each(|x| *x *= s[ch]);
                }
            }
        }
        ChannelMap::Matrix(m) => {
            let mut out = vec![0f32; layer.weight.len()];
            for oo in 0..o {
                let row = &layer.weight[oo * fan_in..(oo + 1) * fan_in];
                let dst = &mut out[oo * fan_in..(oo + 1) * fan_in];
                for i in 0..c {
                    for j in 0..c {
                        let mij = m[i * c + j];
                        for s in 0..spatial {
                            dst[j * spatial + s] += row[i * spatial + s] * mij;
                        }
                    }
                }
            }
            layer.weight = out;
        }
    }
}

/// `W' = M·W`, `b' = M·b`.
pub(crate) fn fold_outputs(layer: &mut Affine, map: &ChannelMap) {
    let (o, fan_in) = (layer.outputs(), layer.fan_in());
    match map {
        ChannelMap::Scale(s) => {
            for (r, row) in layer.weight.chunks_mut(fan_in).enumerate() {
                row.iter_mut().for_each(|x| *x *= s[r]);
            }
            layer.bias.iter_mut().zip(s).for_each(|(b, s)| *b *= s);
        }
        ChannelMap::Matrix(m) => {
            let mut w = vec![0f32; layer.weight.len()];
            let mut b = vec![0f32; o];
            for i in 0..o {
                for k in 0..o {
                    let mik = m[i * o + k];
                    b[i] += mik * layer.bias[k];
                    for x in 0..fan_in {
                        w[i * fan_in + x] += mik * layer.weight[k * fan_in + x];
                    }
                }
            }
            layer.weight = w;
            layer.bias = b;
        }
    }
}

/// The tail layers of `net` with one task's `maps` (one per modulated stage, blocks
/// N..=5 then fc) folded in.
pub fn fold_task_scales(spec: &NetSpec, net: &PlainNet, maps: &[ChannelMap]) -> PlainNet {
    let mut out = net.clone();
    let stages = spec.modulated_stages();
    let last_block = spec.stages()[4].clone();
    for (stage, map) in stages.iter().zip(maps) {
        if stage.name == "fc" {
            if let Some(fc) = out.layers.get_mut("fc") {
                fold_outputs(fc, map);
            }
            continue;
        }
        let k: usize = stage.name.trim_start_matches("block").parse().unwrap_or(5);
        if k < 5 {
            if let Some(conv) = out.layers.get_mut(&format!("block{}.conv", k + 1)) {
                fold_inputs(conv, map, 9);
            }
        } else if let Some(fc) = out.layers.get_mut("fc") {
            fold_inputs(fc, map, last_block.size * last_block.size);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(o: usize, i: usize, spatial: usize) -> Affine {
        let n = o * i * spatial;
        Affine {
            dims: vec![o, i * spatial],
            weight: (0..n).map(|x| (x as f32 * 0.37).sin()).collect(),
            bias: (0..o).map(|x| x as f32 * 0.1 - 0.2).collect(),
        }
    }

    /// y = W·(M·x) computed directly vs with the folded weights.
    #[test]
    fn input_fold_matches_modulate_then_apply() {
        let (o, c, sp) = (3, 4, 2);
        let base = layer(o, c, sp);
        let x: Vec<f32> = (0..c * sp).map(|v| (v as f32 * 0.7).cos()).collect();
        let apply = |l: &Affine, x: &[f32]| -> Vec<f32> {
            (0..o)
                .map(|r| {
                    l.bias[r]
                        + (0..c * sp)
                            .map(|k| l.weight[r * c * sp + k] * x[k])
                            .sum::<f32>()
                })
                .collect()
        };
        let scale: Vec<f32> = vec![0.5, 0.0, 2.0, 1.5];
        let matrix: Vec<f32> = (0..c * c)
            .map(|v| ((v * 7 % 5) as f32 - 2.0) * 0.3)
            .collect();
        for map in [
            ChannelMap::Scale(scale.clone()),
            ChannelMap::Matrix(matrix.clone()),
        ] {
            let mx: Vec<f32> = (0..c * sp)
                .map(|k| {
                    let (ch, s) = (k / sp, k % sp);
                    match &map {
                        ChannelMap::Scale(v) => x[k] * v[ch],
                        ChannelMap::Matrix(m) => {
                            (0..c).map(|j| m[ch * c + j] * x[j * sp + s]).sum()
                        }
                    }
                })
                .collect();
            let mut folded = base.clone();
            fold_inputs(&mut folded, &map, sp);
            for (a, b) in apply(&base, &mx).iter().zip(apply(&folded, &x)) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn output_fold_matches_apply_then_modulate() {
        let (o, i) = (3, 5);
        let base = layer(o, i, 1);
        let x: Vec<f32> = (0..i).map(|v| v as f32 - 1.5).collect();
        let apply = |l: &Affine| -> Vec<f32> {
            (0..o)
                .map(|r| l.bias[r] + (0..i).map(|k| l.weight[r * i + k] * x[k]).sum::<f32>())
                .collect()
        };
        let y = apply(&base);
        let m: Vec<f32> = (0..o * o).map(|v| (v as f32 * 1.3).sin()).collect();
        let want: Vec<f32> = (0..o)
            .map(|r| (0..o).map(|k| m[r * o + k] * y[k]).sum())
            .collect();
        let mut folded = base.clone();
        fold_outputs(&mut folded, &ChannelMap::Matrix(m));
        for (a, b) in want.iter().zip(apply(&folded)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn relu_is_applied_to_raw_vectors() {
        assert_eq!(
            ChannelMap::from_raw(Modulation::Vector, &[-1.0, 0.5]),
            ChannelMap::Scale(vec![0.0, 0.5])
        );
    }
}
