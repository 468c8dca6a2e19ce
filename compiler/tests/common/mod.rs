//! Checkpoints for compiler tests, made straight from the schema.

use std::collections::BTreeMap;

use modkit_models::{Checkpoint, CheckpointHeader, NetSpec, Variant, names};

/// A checkpoint with pseudo-random weights, BN statistics and task vectors (some
/// negative, so ReLU matters), straight from the schema.
pub fn checkpoint(spec: &NetSpec, variant: Variant, tasks: &[&str]) -> Checkpoint {
    let tasks: Vec<String> = tasks.iter().map(|s| s.to_string()).collect();
    let mut tensors = BTreeMap::new();
    for (i, e) in names::schema(spec, &variant, &tasks)
        .into_iter()
        .enumerate()
    {
        let n: usize = e.shape.iter().product();
        let fan_in: usize = e.shape[1..].iter().product::<usize>().max(1);
        let data = (0..n)
            .map(|j| {
                let u = ((i * 7919 + j * 104_729) % 1000) as f32 / 1000.0; // [0, 1)
                if e.name.ends_with("running_var") {
                    0.5 + u
                } else if e.name.ends_with("bn.weight") {
                    // Scales near 1, so the image still shapes the embedding after
                    // 13 layers (with scales in ±0.5 the biases drowned it).
                    0.8 + 0.4 * u
                } else if e.name.starts_with("modulation.") || e.name == names::CSN_MASKS {
                    2.0 * u - 0.3
                } else if e.name.ends_with("weight") && e.shape.len() > 1 {
                    // He-uniform: variance 2 / fan-in, as ReLU networks are initialised.
                    (2.0 * u - 1.0) * (6.0 / fan_in as f32).sqrt()
                } else {
                    u - 0.5
                }
            })
            .collect();
        tensors.insert(
            e.name,
            modkit_models::TensorData {
                shape: e.shape,
                data,
            },
        );
    }
    Checkpoint {
        header: CheckpointHeader {
            spec: spec.clone(),
            variant,
            tasks,
            preprocess: Default::default(),
            epoch: 1,
            train_config: serde_json::json!({}),
            metrics: serde_json::json!({}),
        },
        tensors,
    }
}

pub fn small() -> NetSpec {
    let mut s = NetSpec::tiny();
    s.widths = [4, 8, 8, 8, 8];
    s.embedding = 8;
    s
}
