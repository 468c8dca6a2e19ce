//! Checkpoint → [`Package`]: fold BatchNorm, emit the trunk, then per task either a
//! folded tail or a route through the shared switch tail.

use modkit_models::{Checkpoint, Modulation, Package, Precision, Tails, Variant, names, tasks};

use crate::emit::{self, Head};
use crate::fold_batch_norm::{PlainNet, fold_batch_norm};
use crate::fold_task_scales::{ChannelMap, fold_outputs, fold_task_scales};
use crate::{Error, Result};

/// Which tasks get folded tails.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FoldTasks {
    /// None: every task runs through the switch tail (the default).
    #[default]
    None,
    /// Every task gets its own folded tail; no switch tail.
    All,
    /// These tasks get folded tails; the rest use the switch tail.
    Some(Vec<String>),
}

/// What `modc compile` was asked for.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// Keep only these tasks (default: all of the checkpoint's).
    pub tasks: Option<Vec<String>>,
    pub fold: FoldTasks,
    pub precision: Precision,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            tasks: None,
            fold: FoldTasks::None,
            precision: Precision::F32,
        }
    }
}

/// The modulation maps of task `t` (row `t` of every modulation tensor), one per
/// modulated stage; empty for variants without modulation.
pub fn task_maps(ckpt: &Checkpoint, t: usize) -> Result<Vec<ChannelMap>> {
    let h = &ckpt.header;
    if h.variant == Variant::Csn {
        // The mask scales fc's outputs, like the fc modulation module.
        let m = ckpt.tensor(names::CSN_MASKS)?;
        let e = h.spec.embedding;
        return Ok(vec![ChannelMap::from_raw(
            Modulation::Vector,
            &m.data[t * e..(t + 1) * e],
        )]);
    }
    if !h.variant.is_modulated() {
        return Ok(Vec::new());
    }
    h.spec
        .modulated_stages()
        .iter()
        .map(|s| {
            let m = ckpt.tensor(&names::modulation(s.name))?;
            let per = m.data.len() / m.shape[0];
            Ok(ChannelMap::from_raw(
                h.spec.modulation,
                &m.data[t * per..(t + 1) * per],
            ))
        })
        .collect()
}

/// Task `t`'s own numbers, the switch tail's inputs after the features
/// ([`Variant::task_numbers`]): its ReLU'd vectors or projections, CSN's mask, or
/// `branch:K`'s head weights and biases.
fn task_inputs(ckpt: &Checkpoint, t: usize) -> Result<Vec<Vec<f32>>> {
    if let Some(h) = branch_head(ckpt, t)? {
        return Ok(vec![h.weight, h.bias]);
    }
    Ok(task_maps(ckpt, t)?
        .into_iter()
        .map(|m| match m {
            ChannelMap::Scale(v) | ChannelMap::Matrix(v) => v,
        })
        .collect())
}

/// Task `t`'s `branch:K` head, for that variant.
fn branch_head(ckpt: &Checkpoint, t: usize) -> Result<Option<Head>> {
    let Variant::Branch { k } = ckpt.header.variant else {
        return Ok(None);
    };
    let w = ckpt.tensor(names::BRANCH_WEIGHT)?;
    let b = ckpt.tensor(names::BRANCH_BIAS)?;
    let per = k * ckpt.header.spec.embedding;
    Ok(Some(Head {
        weight: w.data[t * per..(t + 1) * per].to_vec(),
        bias: b.data[t * k..(t + 1) * k].to_vec(),
        k,
    }))
}

/// Task `t`'s network with everything task-specific folded in, and its head.
pub fn task_network(
    ckpt: &Checkpoint,
    base: &PlainNet,
    t: usize,
) -> Result<(PlainNet, Option<Head>)> {
    let h = &ckpt.header;
    if h.variant == Variant::Csn {
        let mut net = base.clone();
        if let (Some(fc), Some(mask)) = (net.layers.get_mut("fc"), task_maps(ckpt, t)?.first()) {
            fold_outputs(fc, mask);
        }
        return Ok((net, None));
    }
    let maps = task_maps(ckpt, t)?;
    let head = branch_head(ckpt, t)?;
    let net = if maps.is_empty() {
        base.clone()
    } else {
        fold_task_scales(&h.spec, base, &maps)
    };
    Ok((net, head))
}

/// Compiles a checkpoint into a package.
pub fn compile(ckpt: &Checkpoint, opts: &CompileOptions) -> Result<Package> {
    let h = &ckpt.header;
    let unsupported = |why: &str| Error::Unsupported {
        variant: h.variant.to_string(),
        why: why.into(),
    };
    if h.variant == Variant::Independent {
        return Err(unsupported(
            "it has one trunk per task, and a package shares one trunk; export single tasks with `modc export-onnx`",
        ));
    }
    // Loaded checkpoints are checked as they load; this one may have been built
    // in memory.
    if let Some(name) = ckpt.non_finite() {
        return Err(Error::Request(format!(
            "checkpoint tensor {name} holds NaN or infinity (training diverged); compile an earlier checkpoint"
        )));
    }
    let all: Vec<usize> = (0..h.tasks.len()).collect();
    let keep = match &opts.tasks {
        Some(list) => tasks::select(list, &h.tasks)?,
        None => all,
    };
    if h.spec.in_channels != 3 {
        return Err(unsupported(&format!(
            "its network takes {} input channels, and packages take RGB images; train with 3",
            h.spec.in_channels
        )));
    }
    let fold: Vec<usize> = match &opts.fold {
        FoldTasks::None => Vec::new(),
        FoldTasks::All => keep.clone(),
        FoldTasks::Some(list) => {
            let fold = tasks::select(list, &h.tasks)?;
            if let Some(&t) = fold.iter().find(|t| !keep.contains(t)) {
                return Err(Error::Request(format!(
                    "--fold-tasks names {:?}, which --tasks leaves out: add it to --tasks or drop it from --fold-tasks",
                    h.tasks[t]
                )));
            }
            fold
        }
    };
    let needs_switch = keep.iter().any(|t| !fold.contains(t));
    if needs_switch && h.variant.is_modulated() && h.spec.modulation == Modulation::Projection {
        return Err(unsupported(
            "the runtime switch takes channel vectors, not projection matrices; compile with `--fold-tasks all`",
        ));
    }
    let base = fold_batch_norm(ckpt, "")?;
    let (trunk, _) = emit::trunk(&h.spec, &base, opts.precision);
    let switch = if !needs_switch {
        None
    } else if h.variant == Variant::Shared {
        Some(emit::folded_tail(&h.spec, &base, None, opts.precision).0)
    } else if let Variant::Branch { k } = h.variant {
        Some(emit::branch_switch_tail(&h.spec, &base, k, opts.precision).0)
    } else {
        let stages = h.variant.task_scaled_stages(&h.spec);
        Some(emit::switch_tail(&h.spec, &base, &stages, opts.precision).0)
    };
    let mut folded = Vec::new();
    for &t in &fold {
        let (net, head) = task_network(ckpt, &base, t)?;
        folded.push((
            h.tasks[t].clone(),
            emit::folded_tail(&h.spec, &net, head.as_ref(), opts.precision).0,
        ));
    }
    let task_vectors = keep
        .iter()
        .map(|&t| task_inputs(ckpt, t))
        .collect::<Result<_>>()?;
    Ok(Package {
        spec: h.spec.clone(),
        variant: h.variant,
        tasks: keep.iter().map(|&t| h.tasks[t].clone()).collect(),
        preprocess: h.preprocess,
        precision: opts.precision,
        trunk,
        tails: Tails { switch, folded },
        task_vectors,
    })
}
