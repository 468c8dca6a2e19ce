//! The checkpoint's tensor names: the one documented place the schema lives.
//!
//! The trainer builds its candle variables under exactly these paths, the compiler
//! reads them, and any safetensors reader (PyTorch included) sees them as they are.
//!
//! | tensor | shape | notes |
//! |---|---|---|
//! | `{p}conv1.weight` | `[w0, in, 3, 3]` | |
//! | `{p}conv1.bias` | `[w0]` | only without BatchNorm |
//! | `{p}conv1.bn.{weight,bias,running_mean,running_var}` | `[w0]` | only with BatchNorm |
//! | `{p}block{k}.{conv,res1,res2}.*` | as conv1 | `conv` is the 3×3 valid conv before the pool, `res1`/`res2` the residual convs |
//! | `{p}fc.weight` | `[emb, C·H·W]` | rows are outputs (candle/PyTorch `Linear`) |
//! | `{p}fc.bias` / `{p}fc.bn.*` | `[emb]` | bias without BatchNorm, BN with it |
//! | `modulation.{block4,block5,fc}` | `[T, C]` (vector) or `[T, C, C]` (projection) | raw parameters; the network applies ReLU before scaling; row `t` is task `t` of the header's task list |
//! | `branch.weight`, `branch.bias` | `[T, K, emb]`, `[T, K]` | `branch:K` variant |
//! | `csn.masks` | `[T, emb]` | `csn` variant; ReLU applied like modulation |
//! | `optimizer.adagrad.{name}` | as `{name}` | Adagrad accumulators, for `--resume`; ignored by the compiler |
//!
//! `{p}` is empty except for the `independent` variant, where each task has its own
//! network under `task.{task}.`.

use crate::{Modulation, NetSpec, Variant};

/// Prefix of the Adagrad accumulator tensors.
pub const OPTIMIZER_PREFIX: &str = "optimizer.adagrad.";
/// Per-task branch weights of `branch:K`.
pub const BRANCH_WEIGHT: &str = "branch.weight";
/// Per-task branch biases of `branch:K`.
pub const BRANCH_BIAS: &str = "branch.bias";
/// Per-task embedding masks of `csn`.
pub const CSN_MASKS: &str = "csn.masks";

/// The name of a conv layer: `conv1`, `block{k}.conv`, `block{k}.res1`, `block{k}.res2`.
pub fn block_layers(block: usize) -> [String; 3] {
    ["conv", "res1", "res2"].map(|l| format!("block{block}.{l}"))
}

/// The modulation tensor of a stage (`block4`, `fc`, ...).
pub fn modulation(stage: &str) -> String {
    format!("modulation.{stage}")
}

/// The prefix of task `task`'s network in the `independent` variant.
pub fn independent_prefix(task: &str) -> String {
    format!("task.{task}.")
}

/// Whether every task trains tensor `name` of `variant`: the shared parameters
/// whose per-task gradients the Update Compliance Ratio compares. Not the
/// modulation vectors, branches and masks (one row per task), and nothing of
/// `independent`, whose tasks share no parameter.
pub fn shared_by_tasks(variant: &Variant, name: &str) -> bool {
    *variant != Variant::Independent
        && !name.starts_with("modulation.")
        && name != BRANCH_WEIGHT
        && name != BRANCH_BIAS
        && name != CSN_MASKS
}

/// One tensor of the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    /// False for BatchNorm running statistics (buffers, not parameters).
    pub trainable: bool,
}

fn entry(name: String, shape: Vec<usize>, trainable: bool) -> TensorEntry {
    TensorEntry {
        name,
        shape,
        trainable,
    }
}

fn push_layer(out: &mut Vec<TensorEntry>, name: &str, weight: Vec<usize>, bn: bool) {
    let c = weight[0];
    out.push(entry(format!("{name}.weight"), weight, true));
    if bn {
        out.push(entry(format!("{name}.bn.weight"), vec![c], true));
        out.push(entry(format!("{name}.bn.bias"), vec![c], true));
        out.push(entry(format!("{name}.bn.running_mean"), vec![c], false));
        out.push(entry(format!("{name}.bn.running_var"), vec![c], false));
    } else {
        out.push(entry(format!("{name}.bias"), vec![c], true));
    }
}

/// The tensors of one plain network (no task-specific parts) under `prefix`.
pub fn base_network(spec: &NetSpec, prefix: &str) -> Vec<TensorEntry> {
    let mut out = Vec::new();
    let w = spec.widths;
    let bn = spec.batch_norm;
    push_layer(
        &mut out,
        &format!("{prefix}conv1"),
        vec![w[0], spec.in_channels, 3, 3],
        bn,
    );
    for k in 2..=5 {
        let (cin, c) = (w[k - 2], w[k - 1]);
        let [conv, res1, res2] = block_layers(k);
        push_layer(&mut out, &format!("{prefix}{conv}"), vec![c, cin, 3, 3], bn);
        push_layer(&mut out, &format!("{prefix}{res1}"), vec![c, c, 3, 3], bn);
        push_layer(&mut out, &format!("{prefix}{res2}"), vec![c, c, 3, 3], bn);
    }
    push_layer(
        &mut out,
        &format!("{prefix}fc"),
        vec![spec.embedding, spec.fc_inputs()],
        bn,
    );
    out
}

/// Every tensor a checkpoint of `spec` and `variant` over `tasks` holds (optimizer
/// state aside), in a stable order.
pub fn schema(spec: &NetSpec, variant: &Variant, tasks: &[String]) -> Vec<TensorEntry> {
    let t = tasks.len();
    match variant {
        Variant::Independent => tasks
            .iter()
            .flat_map(|task| base_network(spec, &independent_prefix(task)))
            .collect(),
        Variant::Shared => base_network(spec, ""),
        Variant::Modulated | Variant::OnlyMask => {
            let mut out = base_network(spec, "");
            for s in spec.modulated_stages() {
                let shape = match spec.modulation {
                    Modulation::Vector => vec![t, s.channels],
                    Modulation::Projection => vec![t, s.channels, s.channels],
                };
                out.push(entry(modulation(s.name), shape, true));
            }
            out
        }
        Variant::Branch { k } => {
            let mut out = base_network(spec, "");
            out.push(entry(
                BRANCH_WEIGHT.into(),
                vec![t, *k, spec.embedding],
                true,
            ));
            out.push(entry(BRANCH_BIAS.into(), vec![t, *k], true));
            out
        }
        Variant::Csn => {
            let mut out = base_network(spec, "");
            out.push(entry(CSN_MASKS.into(), vec![t, spec.embedding], true));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable() {
        let names: Vec<_> = schema(&NetSpec::tiny(), &Variant::Modulated, &["a".into()])
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names[0], "conv1.weight");
        assert_eq!(names[1], "conv1.bn.weight");
        assert!(names.contains(&"block3.res2.bn.running_var".to_string()));
        assert!(names.contains(&"fc.weight".to_string()));
        assert_eq!(
            names[names.len() - 3..],
            ["modulation.block4", "modulation.block5", "modulation.fc"]
        );
    }

    #[test]
    fn shared_tensors_are_the_base_network() {
        let tasks = ["a".to_string(), "b".to_string()];
        let spec = NetSpec::tiny();
        let base: Vec<_> = base_network(&spec, "")
            .into_iter()
            .map(|e| e.name)
            .collect();
        for variant in [
            Variant::Modulated,
            Variant::Shared,
            Variant::Branch { k: 4 },
            Variant::Csn,
        ] {
            let shared: Vec<_> = schema(&spec, &variant, &tasks)
                .into_iter()
                .filter(|e| shared_by_tasks(&variant, &e.name))
                .map(|e| e.name)
                .collect();
            assert_eq!(shared, base, "{variant}");
        }
        assert!(
            schema(&spec, &Variant::Independent, &tasks)
                .iter()
                .all(|e| !shared_by_tasks(&Variant::Independent, &e.name))
        );
    }
}
