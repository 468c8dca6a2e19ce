//! Triplet accuracy (paper section 4.1): a test triplet is a success when the anchor
//! is closer to the positive than to the negative in the task's embedding.
//!
//! The trunk runs once per image for all tasks (as the runtime does); only the tail
//! runs per task.

use std::collections::BTreeSet;

use candle_core::{Device, Tensor};
use modkit_models::Preprocess;
use rayon::prelude::*;

use crate::Result;
use crate::data::Dataset;
use crate::net::Network;
use crate::triplets::Triplet;

/// Images per forward pass during evaluation. A stage's largest tensor is 64 ×
/// that of one image (333 MB at paper@150's second block); 256 made a tiny-spec
/// evaluation no faster and its resident memory 2.6× larger.
const EVAL_BATCH: usize = 64;

/// `[B, 3, S, S]` network input for images `idx`.
///
/// Each channel's 256 possible values are normalised once ([`Preprocess::apply`],
/// so the result is the same to the bit), and the images are filled in parallel:
/// two divisions per value on one thread were 2% of a tiny-spec training step.
pub fn batch_images(
    ds: &Dataset,
    idx: &[usize],
    pre: &Preprocess,
    device: &Device,
) -> Result<Tensor> {
    let s = ds.image_size;
    let plane = s * s;
    let table: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|byte| pre.apply(c, byte as u8)));
    let mut out = vec![0f32; idx.len() * 3 * plane];
    out.par_chunks_mut(3 * plane)
        .zip(idx)
        .for_each(|(dst, &i)| {
            let img = ds.image(i);
            for (c, (dst, table)) in dst.chunks_exact_mut(plane).zip(&table).enumerate() {
                for (d, px) in dst.iter_mut().zip(img.chunks_exact(3)) {
                    *d = table[usize::from(px[c])];
                }
            }
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_images_normalises_each_channel_into_planes() {
        let ds = Dataset::synthetic(5, 6, 1);
        let pre = Preprocess {
            mean: [0.1, 0.5, 0.9],
            std: [0.2, 0.3, 0.4],
            ..Preprocess::default()
        };
        let idx = [3, 0, 3, 4];
        let x = batch_images(&ds, &idx, &pre, &Device::Cpu).expect("batch");
        assert_eq!(x.dims(), [4, 3, 6, 6]);
        let x = x
            .flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .expect("values");
        for (b, &i) in idx.iter().enumerate() {
            for c in 0..3 {
                for p in 0..36 {
                    let want = pre.apply(c, ds.image(i)[p * 3 + c]);
                    assert_eq!(
                        x[(b * 3 + c) * 36 + p],
                        want,
                        "image {i}, channel {c}, pixel {p}"
                    );
                }
            }
        }
    }
}
