//! Triplet accuracy (paper section 4.1): a test triplet is a success when the anchor
//! is closer to the positive than to the negative in the task's embedding.
//!
//! The trunk runs once per image for all tasks (as the runtime does); only the tail
//! runs per task.

use std::collections::BTreeSet;

use candle_core::{Device, Tensor};
use modkit_models::Preprocess;

use crate::Result;
use crate::data::Dataset;
use crate::net::Network;
use crate::triplets::Triplet;

/// Images per forward pass during evaluation.
const EVAL_BATCH: usize = 256;

/// `[B, 3, S, S]` network input for images `idx`.
pub fn batch_images(
    ds: &Dataset,
    idx: &[usize],
    pre: &Preprocess,
    device: &Device,
) -> Result<Tensor> {
    let s = ds.image_size;
    let plane = s * s;
    let mut out = vec![0f32; idx.len() * 3 * plane];
    for (b, &i) in idx.iter().enumerate() {
        let img = ds.image(i);
        let dst = &mut out[b * 3 * plane..(b + 1) * 3 * plane];
        for p in 0..plane {
            for c in 0..3 {
                dst[c * plane + p] = pre.apply(c, img[p * 3 + c]);
            }
        }
    }
    Ok(Tensor::from_vec(out, (idx.len(), 3, s, s), device)?)
}

/// Embeddings of `images` for `task`, one row per image, in order.
fn embed(
    net: &Network,
    ds: &Dataset,
    images: &[usize],
    task: usize,
    trunk_cache: Option<(&Tensor, &[usize])>,
    pre: &Preprocess,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let mut rows = Vec::with_capacity(images.len());
    for chunk in images.chunks(EVAL_BATCH) {
        let feats = match trunk_cache {
            Some((feats, order)) => {
                let pos: Vec<u32> = chunk
                    .iter()
                    .map(|i| order.binary_search(i).map(|p| p as u32).unwrap_or(0))
                    .collect();
                feats.index_select(&Tensor::new(pos, device)?, 0)?
            }
            None => net.trunk(&batch_images(ds, chunk, pre, device)?, task, false)?,
        };
        let ids = Tensor::new(vec![task as u32; chunk.len()], device)?;
        rows.extend(net.tail(&feats, &ids, task, false)?.to_vec2::<f32>()?);
    }
    Ok(rows)
}

fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Per-task triplet accuracy of `net` on `triplets[t]` for task `t`.
pub fn triplet_accuracy(
    net: &Network,
    ds: &Dataset,
    triplets: &[Vec<Triplet>],
    pre: &Preprocess,
    device: &Device,
) -> Result<Vec<f64>> {
    let all: Vec<usize> = triplets
        .iter()
        .flatten()
        .flat_map(|t| [t.anchor, t.positive, t.negative])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let cache = if net.has_shared_trunk() {
        let parts = all
            .chunks(EVAL_BATCH)
            .map(|c| net.trunk(&batch_images(ds, c, pre, device)?, 0, false))
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&parts, 0)?)
    } else {
        None
    };
    triplets
        .iter()
        .enumerate()
        .map(|(task, ts)| {
            let images: Vec<usize> = ts
                .iter()
                .flat_map(|t| [t.anchor, t.positive, t.negative])
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let emb = embed(
                net,
                ds,
                &images,
                task,
                cache.as_ref().map(|c| (c, all.as_slice())),
                pre,
                device,
            )?;
            let row = |i: usize| &emb[images.binary_search(&i).unwrap_or(0)];
            let ok = ts
                .iter()
                .filter(|t| {
                    dist2(row(t.anchor), row(t.positive)) < dist2(row(t.anchor), row(t.negative))
                })
                .count();
            Ok(ok as f64 / ts.len().max(1) as f64)
        })
        .collect()
}
