//! Folds every BatchNorm into the conv or fc before it, once per network:
//! `W' = diag(γ/√(σ²+ε))·W`, `b' = β − μ·γ/√(σ²+ε)` (or `b' = b` without BN).
//!
//! The result is a [`PlainNet`]: every layer a plain affine map, which is what the
//! ONNX graphs hold.

use std::collections::BTreeMap;

use modkit_models::{BATCH_NORM_EPS, Checkpoint, names};

use crate::Result;

/// An affine layer: conv weights `[O, I, 3, 3]` or fc weights `[O, I]`, bias `[O]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    pub dims: Vec<usize>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Affine {
    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.dims[0]
    }

    /// Weights per output channel.
    pub fn fan_in(&self) -> usize {
        self.weight.len() / self.dims[0]
    }
}

/// Layers by name: `conv1`, `block{k}.{conv,res1,res2}`, `fc`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainNet {
    pub layers: BTreeMap<String, Affine>,
}

/// All layer names of a network, in order.
pub fn layer_names() -> Vec<String> {
    let mut out = vec!["conv1".to_string()];
    for k in 2..=5 {
        out.extend(names::block_layers(k));
    }
    out.push("fc".into());
    out
}

/// Reads the layers under `prefix` of `ckpt` and folds their BatchNorms.
pub fn fold_batch_norm(ckpt: &Checkpoint, prefix: &str) -> Result<PlainNet> {
    let bn = ckpt.header.spec.batch_norm;
    let mut layers = BTreeMap::new();
    for name in layer_names() {
        let p = format!("{prefix}{name}");
        let w = ckpt.tensor(&format!("{p}.weight"))?;
        let o = w.shape[0];
        let per = w.data.len() / o;
        let (scale, bias): (Vec<f32>, Vec<f32>) = if bn {
            let g = &ckpt.tensor(&format!("{p}.bn.weight"))?.data;
            let b = &ckpt.tensor(&format!("{p}.bn.bias"))?.data;
            let m = &ckpt.tensor(&format!("{p}.bn.running_mean"))?.data;
            let v = &ckpt.tensor(&format!("{p}.bn.running_var"))?.data;
            (0..o)
                .map(|c| {
                    let s = g[c] / (v[c] + BATCH_NORM_EPS as f32).sqrt();
                    (s, b[c] - m[c] * s)
                })
                .unzip()
        } else {
            (
                vec![1.0; o],
                ckpt.tensor(&format!("{p}.bias"))?.data.clone(),
            )
        };
        let weight = w
            .data
            .chunks(per)
            .zip(&scale)
            .flat_map(|(row, s)| row.iter().map(move |x| x * s))
            .collect();
        layers.insert(
            name,
            Affine {
                dims: w.shape.clone(),
                weight,
                bias,
            },
        );
    }
    Ok(PlainNet { layers })
}
