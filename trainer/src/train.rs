//! The training loop (paper sections 3.3 and 4.1): every minibatch holds the same
//! number of triplets from every task; squared-L2 triplet loss with margin α over
//! those triplets (or, with `--mining`, over every valid triplet the batch holds:
//! [`crate::mining`]); Adagrad (or Adam, `--optimizer adam`); evaluation, a
//! JSON-lines log line and an atomic checkpoint per epoch.
//!
//! With `ucr_every` set, every that-many-th minibatch also measures the Update
//! Compliance Ratio between the tasks ([`crate::ucr`]), logged per epoch.
//!
//! Files written next to the checkpoint `OUT.safetensors`:
//! `OUT.metrics.jsonl` (one line per epoch) and `OUT.triplets.json` (the fixed test
//! triplets, by file name).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use modkit_models::names;
use modkit_models::{Checkpoint, CheckpointHeader, NetSpec, Preprocess, TensorData, Variant};
use serde::{Deserialize, Serialize};

use crate::adagrad::Adagrad;
use crate::data::{Dataset, Split};
use crate::eval::{batch_images, triplet_accuracy};
use crate::mining::{BatchLoss, Mining, batch_all_loss, pooled_loss, sampled_loss};
use crate::net::{CSN_MASK_PENALTY, Network, init_varmap};
use crate::optim::{Optimizer, OptimizerKind};
use crate::relations::{self, relation_loss};
use crate::triplets::{self, TEST_STREAM, Triplet};
use crate::ucr::{UcrCounter, UcrLog, gradient_gram};
use crate::{Error, Result};

/// Everything that defines a training run; stored in the checkpoint header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub spec: NetSpec,
    pub variant: Variant,
    pub tasks: Vec<String>,
    /// Where the data comes from (`synth`, `celeba:DIR`).
    pub data: String,
    /// Images generated for `data = "synth"`.
    #[serde(default = "default_synth_images")]
    pub synth_images: usize,
    /// Images kept from a CelebA directory (all when `None`).
    #[serde(default)]
    pub limit: Option<usize>,
    /// For UT-Zappos50K, whether the run's splits were CSN's ([`Dataset::csn_splits`];
    /// runs from before it was recorded split by hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csn_splits: Option<bool>,
    pub epochs: usize,
    /// Training triplets per task per epoch (re-sampled every epoch).
    pub triplets_per_task: usize,
    /// Triplets per task in one minibatch (paper §4.2: 180 images for 20 tasks,
    /// 3 triplets each; 168 for 7 tasks, 8 each).
    pub batch_per_task: usize,
    /// Fixed test triplets per task.
    pub test_triplets_per_task: usize,
    pub lr: f64,
    /// Learning rate multiplier per epoch (1 = constant).
    pub lr_decay: f64,
    /// Triplet margin α.
    pub margin: f64,
    /// Which triplets of a minibatch the loss uses (runs from before it was
    /// recorded used the sampled ones).
    #[serde(default)]
    pub mining: Mining,
    /// The optimizer (runs from before it was recorded used Adagrad).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Adagrad's starting accumulator (TensorFlow 0.1, PyTorch 0).
    #[serde(default = "default_initial_accumulator")]
    pub adagrad_initial_accumulator: f64,
    pub seed: u64,
    pub preprocess: Preprocess,
    /// Measure the Update Compliance Ratio on every `ucr_every`-th minibatch of
    /// an epoch, from its first (0 = never; 1 = every minibatch, the paper's).
    #[serde(default)]
    pub ucr_every: usize,
    /// `only-mask`: the checkpoint whose shared weights (and BatchNorm statistics)
    /// the run starts from and keeps fixed; only the modulation vectors learn
    /// (the paper's "Only mask" baseline starts from the independent-branch model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Task triples `[i, j, k]` (names) for the task-relation regulariser of eq. 8:
    /// `i` is closer to `j` than to `k` ([`crate::relations`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relations: Vec<[String; 3]>,
    /// Its margin β.
    #[serde(default = "default_relation_margin")]
    pub relation_margin: f64,
    /// Its weight λ beside the triplet loss.
    #[serde(default = "default_relation_weight")]
    pub relation_weight: f64,
    /// The loss's version ([`OBJECTIVE`]); runs from before it was recorded read
    /// as 1.
    #[serde(default = "objective_v1")]
    pub objective: u32,
}

/// The loss's version: 2 since `independent` networks train on their own task's
/// loss and `csn` starts from disjoint masks and pays for them. A run begun under
/// another version of its variant's loss cannot be continued exactly.
pub const OBJECTIVE: u32 = 2;

fn objective_v1() -> u32 {
    1
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            spec: NetSpec::tiny(),
            variant: Variant::Modulated,
            tasks: modkit_models::tasks::CELEBA_20
                .iter()
                .map(|s| s.to_string())
                .collect(),
            data: "synth".into(),
            synth_images: default_synth_images(),
            limit: None,
            csn_splits: None,
            epochs: 4,
            triplets_per_task: 400,
            batch_per_task: 4,
            test_triplets_per_task: 500,
            lr: 0.01,
            lr_decay: 1.0,
            margin: 0.2,
            mining: Mining::Sampled,
            optimizer: OptimizerKind::Adagrad,
            adagrad_initial_accumulator: Adagrad::INITIAL_ACCUMULATOR,
            seed: 0,
            preprocess: Preprocess::default(),
            ucr_every: 0,
            init_from: None,
            relations: Vec::new(),
            relation_margin: relations::DEFAULT_MARGIN,
            relation_weight: relations::DEFAULT_WEIGHT,
            objective: OBJECTIVE,
        }
    }
}

impl TrainConfig {
    /// Checks what can be checked before loading data: the spec, and options that
    /// only some variants take.
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        match (self.variant, &self.init_from) {
            (Variant::OnlyMask, None) => {
                return Err(Error::Config(
                    "--variant only-mask learns only the modulation vectors on fixed shared weights: name their checkpoint with --init-from CKPT (the paper starts from a branch:K run)".into(),
                ));
            }
            (v, Some(path)) if v != Variant::OnlyMask => {
                return Err(Error::Config(format!(
                    "--init-from {path:?} is for --variant only-mask; {v} trains every weight from the seed"
                )));
            }
            _ => {}
        }
        if !self.relations.is_empty() && !self.variant.is_modulated() {
            return Err(Error::Config(format!(
                "--task-relation pulls modulation vectors together; {} has none: use --variant modulated or only-mask",
                self.variant
            )));
        }
        if !(self.relation_margin.is_finite()
            && self.relation_weight.is_finite()
            && self.relation_weight >= 0.0)
        {
            return Err(Error::Config(format!(
                "--relation-margin {} and --relation-weight {} must be finite, the weight ≥ 0",
                self.relation_margin, self.relation_weight
            )));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        for (flag, value, ok, want) in [
            (
                "--lr",
                self.lr,
                positive(self.lr),
                "a positive number such as 0.01",
            ),
            (
                "--lr-decay",
                self.lr_decay,
                positive(self.lr_decay),
                "a positive factor such as 0.9 (1 keeps the rate)",
            ),
            (
                "--margin",
                self.margin,
                non_negative(self.margin),
                "a margin ≥ 0 such as 0.2",
            ),
            (
                "--adagrad-init",
                self.adagrad_initial_accumulator,
                non_negative(self.adagrad_initial_accumulator),
                "an accumulator ≥ 0: 0.1 (TensorFlow) or 0 (PyTorch)",
            ),
        ] {
            if !ok {
                return Err(Error::Config(format!("{flag} {value}: give {want}")));
            }
        }
        if self.epochs == 0 {
            return Err(Error::Config(
                "--epochs 0 trains nothing and writes no checkpoint: give 1 or more".into(),
            ));
        }
        for (flag, n) in [
            ("--triplets-per-task", self.triplets_per_task),
            ("--test-triplets", self.test_triplets_per_task),
        ] {
            if n > MAX_TRIPLETS {
                return Err(Error::Config(format!(
                    "{flag} {n}: at most {MAX_TRIPLETS} per task fit in memory"
                )));
            }
        }
        // All tasks' lists together (an empty task list is filled from the data,
        // and checked again then).
        let tasks = self.tasks.len().max(1);
        let per_task = self.triplets_per_task + self.test_triplets_per_task;
        if per_task.saturating_mul(tasks) > MAX_TRIPLETS {
            return Err(Error::Config(format!(
                "--triplets-per-task {} and --test-triplets {} for {tasks} tasks are {} triplets, over the {MAX_TRIPLETS} that fit in memory: ask for fewer",
                self.triplets_per_task,
                self.test_triplets_per_task,
                per_task.saturating_mul(tasks)
            )));
        }
        if self.test_triplets_per_task == 0 {
            return Err(Error::Config(
                "--test-triplets 0 leaves nothing to evaluate each epoch on: give 1 or more (500 is the default)".into(),
            ));
        }
        // An empty task list is filled from the data later (`folder:DIR`).
        if self.ucr_every > 0 && (self.variant == Variant::Independent || self.tasks.len() == 1) {
            return Err(Error::Config(format!(
                "--ucr-every {} compares tasks on the parameters they share; {} with {} task(s) has none: drop --ucr-every or train a shared-trunk variant on 2+ tasks",
                self.ucr_every,
                self.variant,
                self.tasks.len()
            )));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Refuses a minibatch whose training step would not fit in `limit` bytes
    /// ([`step_bytes`]), on the CPU; the tasks are checked again once the data
    /// has named them. For runs that start: evaluating or resuming a run takes
    /// no new minibatch size, and a step on a GPU holds its tensors there.
    pub fn check_step_memory(&self, device: &Device, limit: u128) -> Result<()> {
        if !device.is_cpu() {
            return Ok(());
        }
        let tasks = self.tasks.len().max(1);
        // A step's images: a triplet's three per task.
        let images = self.batch_per_task.saturating_mul(3).saturating_mul(tasks);
        let bytes = step_bytes(&self.spec, images);
        if bytes > limit {
            let gib = |b: u128| b as f64 / f64::from(1u32 << 30);
            return Err(Error::Config(format!(
                "--batch-per-task {} for {tasks} tasks is {images} images a step, whose tensors would take about {:.1} GiB at {}×{}, more than this machine's {:.1} GiB: give a smaller --batch-per-task",
                self.batch_per_task,
                gib(bytes),
                self.spec.input_size,
                self.spec.input_size,
                gib(limit)
            )));
        }
        Ok(())
    }
}

fn default_relation_margin() -> f64 {
    relations::DEFAULT_MARGIN
}

fn default_relation_weight() -> f64 {
    relations::DEFAULT_WEIGHT
}

fn default_synth_images() -> usize {
    6000
}

fn default_initial_accumulator() -> f64 {
    Adagrad::INITIAL_ACCUMULATOR
}

/// One epoch's numbers, as logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    /// Fraction of training triplets already satisfied (d⁺ < d⁻) during the epoch
    /// (with `--mining batch-all` or `pooled`: of the valid triplets in each batch).
    pub train_accuracy: f64,
    pub test_accuracy: BTreeMap<String, f64>,
    pub mean_accuracy: f64,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_second: f64,
    /// Where the epoch's training steps spent their time (logs from before this
    /// was recorded read as zeros).
    #[serde(default)]
    pub step_seconds: StepTimes,
    /// The Update Compliance Ratio between the tasks over the epoch's measured
    /// minibatches, when `ucr_every` asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ucr: Option<UcrLog>,
    /// The mean task-relation loss (eq. 8, before its weight) over the epoch's
    /// steps, when `relations` asked for it; `loss` includes it weighted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation_loss: Option<f64>,
}

/// Where one training step's time went, in seconds (summed over steps when it
/// describes an epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    /// Assembling the input batch from the dataset's decoded images.
    pub data: f64,
    /// Forward pass and loss, up to reading the loss value.
    pub forward: f64,
    /// `loss.backward()`: every gradient.
    pub backward: f64,
    /// The optimizer's update of every variable.
    pub update: f64,
}

impl StepTimes {
    /// The whole step.
    pub fn total(&self) -> f64 {
        self.data + self.forward + self.backward + self.update
    }
}

impl std::ops::AddAssign for StepTimes {
    fn add_assign(&mut self, o: StepTimes) {
        self.data += o.data;
        self.forward += o.forward;
        self.backward += o.backward;
        self.update += o.update;
    }
}

/// The result of [`Trainer::run`].
#[derive(Debug, Clone)]
pub struct Report {
    pub epochs: Vec<EpochLog>,
    pub accuracy: Vec<(String, f64)>,
    pub mean_accuracy: f64,
}

/// A training run in progress.
pub struct Trainer {
    pub cfg: TrainConfig,
    device: Device,
    varmap: VarMap,
    net: Network,
    opt: Optimizer,
    attrs: Vec<usize>,
    test: Vec<Vec<Triplet>>,
    /// Epochs completed.
    pub epoch: usize,
    last_metrics: serde_json::Value,
    /// `OUT.metrics.jsonl`'s lines so far: none for a fresh run, the resumed
    /// run's first `epoch` for a resumed one. Rewritten whole after each epoch.
    log_lines: Vec<String>,
    /// Per-step timings of the last epoch trained.
    step_times: Vec<StepTimes>,
    /// The parameters every task shares, whose per-task gradients UCR compares.
    shared: Vec<Var>,
    /// UCR counts of the last epoch trained, when measured.
    ucr: Option<UcrCounter>,
    /// `cfg.relations` as task indices.
    relations: Vec<[usize; 3]>,
    /// The last epoch's mean relation loss (unweighted), when regularised.
    relation_loss: Option<f64>,
    /// The newest checkpoint of this run on disk (epoch, path): the one resumed
    /// from, then each one saved; what a stopped run leaves behind.
    last_saved: Option<(usize, PathBuf)>,
}

/// The most triplets a run may ask for, per task and over all tasks' training
/// and test lists: past this the lists alone would not fit in memory.
pub const MAX_TRIPLETS: usize = 100_000_000;

/// The most memory a training step's tensors may take, by [`step_bytes`]'s
/// estimate: the machine's memory (`MemTotal`), or where that is unknown the
/// bound datasets have ([`crate::data::MAX_PIXEL_BYTES`]).
pub fn max_step_bytes() -> u128 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u128>().ok())
    });
    total_kib.map_or(u128::from(crate::data::MAX_PIXEL_BYTES), |k| k << 10)
}

/// An estimate of the memory a training step on `images` images takes, high
/// rather than low: per image, its input and every stage's output, a block's
/// convolution output before its pool and the two residual stages' as well,
/// each held for the backward, given a gradient and a scratch copy (×3). With
/// 96 images: 0.91 GB at paper@64 and 5.3 GB at paper@150, where the process
/// peaks at 0.66 and 3.5–4.0 GB (`modtrain bench-step`, data and model
/// included).
pub fn step_bytes(spec: &NetSpec, images: usize) -> u128 {
    let stages = spec.stages();
    let per_image: u128 = stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let out = (s.channels * s.size * s.size) as u128;
            match i {
                // conv1, fc: one output.
                0 => out,
                _ if s.name == "fc" => out,
                // A block: the convolution's output before the 2×2 pool (twice
                // the side, less its border) and three at the pooled size.
                _ => {
                    let before = (2 * s.size + 2).pow(2) as u128 * s.channels as u128;
                    before + 3 * out
                }
            }
        })
        .sum::<u128>()
        + 3 * (spec.input_size as u128).pow(2);
    per_image * images as u128 * 4 * 3
}

/// `OUT.suffix` next to the checkpoint `OUT.safetensors`; a checkpoint named
/// otherwise keeps its whole name (`run.v1` → `run.v1.suffix`), so that two runs
/// differing only after a dot do not share their logs.
pub fn sibling(ckpt: &Path, suffix: &str) -> PathBuf {
    if ckpt.extension().is_some_and(|e| e == "safetensors") {
        return ckpt.with_extension(suffix);
    }
    let mut name = ckpt.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// The other checkpoint name with the same [`sibling`]s: `run` for
/// `run.safetensors`, `run.safetensors` for `run` (and `run.v1`): two runs saved
/// under those names would write one log.
pub fn sibling_partner(ckpt: &Path) -> PathBuf {
    if ckpt.extension().is_some_and(|e| e == "safetensors") {
        return ckpt.with_extension("");
    }
    let mut name = ckpt.as_os_str().to_owned();
    name.push(".safetensors");
    PathBuf::from(name)
}

/// [`sibling`] where it exists, else the name runs before session 23 gave a
/// checkpoint not named `.safetensors` (`run.v1` → `run.metrics.jsonl`), if that
/// exists: for reading old runs' logs.
pub fn existing_sibling(ckpt: &Path, suffix: &str) -> PathBuf {
    let path = sibling(ckpt, suffix);
    let legacy = ckpt.with_extension(suffix);
    if !path.exists() && legacy.exists() {
        return legacy;
    }
    path
}

/// What a saved run is used for, as [`check_splits`] words its advice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Evaluated, or resumed.
    Again,
    /// Started from (`--init-from`).
    Start,
}

impl Reuse {
    fn purpose(self) -> &'static str {
        match self {
            Reuse::Again => "to evaluate or resume it",
            Reuse::Start => "to start from it",
        }
    }
}

/// Refuses UT-Zappos50K data whose splits are not the ones the run at `path`
/// trained on: its test triplets would come from shoes it partly trained on
/// (CSN's test shoes are partly in the hash split's training set, and the
/// other way round). `config` is that run's recorded training config and `now`
/// the data's [`Dataset::csn_splits`], which [`DataSource::csn_splits`] knows
/// before the images load; a run on other data, or data other than
/// UT-Zappos50K now, is not checked.
///
/// [`DataSource::csn_splits`]: crate::data::DataSource::csn_splits
pub fn check_splits(
    path: &Path,
    config: &serde_json::Value,
    now: Option<bool>,
    reuse: Reuse,
) -> Result<()> {
    use crate::data::zappos::{CSN_FILENAMES, CSN_LISTS};
    let recorded = config
        .get("csn_splits")
        .and_then(serde_json::Value::as_bool);
    // Runs from before the record split UT-Zappos50K by hash.
    let on_zappos = config
        .get("data")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|d| d.starts_with("zappos:"));
    let then = recorded.or(on_zappos.then_some(false));
    let (Some(then), Some(now)) = (then, now) else {
        return Ok(());
    };
    let purpose = reuse.purpose();
    match (then, now) {
        (false, true) => Err(Error::Config(format!(
            "{path:?} was trained on UT-Zappos50K split by hash, but the data now has CSN's triplet lists ({CSN_LISTS}/), whose test shoes that run partly trained on: move {CSN_LISTS} away {purpose}, or train again on CSN's splits"
        ))),
        (true, false) => Err(Error::Config(format!(
            "{path:?} was trained on CSN's splits of UT-Zappos50K, but the data has no CSN triplet lists ({CSN_LISTS}/) now: put them back (with {CSN_FILENAMES}) {purpose}"
        ))),
        _ => Ok(()),
    }
}

impl Trainer {
    /// A fresh run: validates the config against the data, initialises the network
    /// from the seed and fixes the test triplets.
    pub fn new(cfg: TrainConfig, ds: &Dataset, device: Device) -> Result<Self> {
        cfg.validate()?;
        cfg.check_step_memory(&device, max_step_bytes())?;
        let init_from = cfg.init_from.clone();
        let mut t = Self::fresh(cfg, ds, device)?;
        if let Some(path) = init_from {
            let ckpt = Checkpoint::load(&path)?;
            let config = &ckpt.header.train_config;
            check_splits(&path, config, ds.csn_splits, Reuse::Start)?;
            t.load_shared(&path, &ckpt)?;
        }
        Ok(t)
    }

    /// [`Trainer::new`] without loading `init_from`: every variable from the seed.
    fn fresh(cfg: TrainConfig, ds: &Dataset, device: Device) -> Result<Self> {
        cfg.validate()?;
        if ds.image_size != cfg.spec.input_size {
            return Err(Error::ImageSize {
                found: ds.image_size,
                expected: cfg.spec.input_size,
            });
        }
        if cfg.tasks.is_empty()
            || cfg.batch_per_task == 0
            || cfg.triplets_per_task < cfg.batch_per_task
        {
            return Err(Error::Config(format!(
                "need at least one task and --triplets-per-task ({}) ≥ --batch-per-task ({}) > 0",
                cfg.triplets_per_task, cfg.batch_per_task
            )));
        }
        if cfg.mining == Mining::Pooled && cfg.variant == Variant::Independent {
            return Err(Error::Config(
                "--mining pooled shares one trunk between the tasks; with --variant independent use batch-all or sampled".into(),
            ));
        }
        if cfg.variant == Variant::Csn && cfg.tasks.len() > cfg.spec.embedding {
            return Err(Error::Config(format!(
                "--variant csn starts each task on its own block of the embedding, so {} tasks need --embedding {} or more (it is {}); or train fewer tasks",
                cfg.tasks.len(),
                cfg.tasks.len(),
                cfg.spec.embedding
            )));
        }
        let attrs = ds.task_indices(&cfg.tasks)?;
        // Canonical names: as the data spells them.
        let mut cfg = cfg;
        cfg.tasks = attrs.iter().map(|&a| ds.attributes[a].clone()).collect();
        // The data decides how images are squared; the runtime reads it back.
        cfg.preprocess.fit = ds.fit;
        cfg.csn_splits = ds.csn_splits;
        let test = triplets::sample(
            ds,
            Split::Test,
            &attrs,
            cfg.test_triplets_per_task,
            cfg.seed,
            TEST_STREAM,
        )?;
        // Fail now, not after an epoch, if a task cannot form training triplets.
        triplets::sample(ds, Split::Train, &attrs, 1, cfg.seed, 0)?;
        let varmap = init_varmap(&cfg.spec, cfg.variant, &cfg.tasks, cfg.seed, &device)?;
        Self::assemble(cfg, varmap, attrs, test, device)
    }

    fn assemble(
        cfg: TrainConfig,
        varmap: VarMap,
        attrs: Vec<usize>,
        test: Vec<Vec<Triplet>>,
        device: Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let net = Network::new(&cfg.spec, cfg.variant, &cfg.tasks, vb)?;
        let params = trainable(&varmap, &cfg)?;
        let shared = shared_parameters(&varmap, &cfg)?;
        let relations = relations::resolve(&cfg.relations, &cfg.tasks)?;
        let opt = Optimizer::new(
            cfg.optimizer,
            params,
            cfg.lr,
            cfg.adagrad_initial_accumulator,
        )?;
        Ok(Trainer {
            cfg,
            device,
            varmap,
            net,
            opt,
            attrs,
            test,
            epoch: 0,
            last_metrics: serde_json::Value::Null,
            log_lines: Vec::new(),
            step_times: Vec::new(),
            shared,
            ucr: None,
            relations,
            relation_loss: None,
            last_saved: None,
        })
    }

    /// Continues a run from its checkpoint: weights, BatchNorm statistics, optimizer
    /// state and epoch count are restored, so the result equals an uninterrupted run.
    /// `epochs` (if given) replaces the total number of epochs.
    pub fn resume(
        path: &Path,
        ds: &Dataset,
        device: Device,
        epochs: Option<usize>,
    ) -> Result<Self> {
        Self::resume_with(path, ds, device, epochs, None)
    }

    /// [`Trainer::resume`], with `ucr_every` (if given) replacing the run's UCR
    /// measurement interval, which does not change training.
    pub fn resume_with(
        path: &Path,
        ds: &Dataset,
        device: Device,
        epochs: Option<usize>,
        ucr_every: Option<usize>,
    ) -> Result<Self> {
        let ckpt = Checkpoint::load(path)?;
        let mut cfg: TrainConfig = serde_json::from_value(ckpt.header.train_config.clone())
            .map_err(|e| {
                Error::Config(format!("{path:?}: cannot read its training config: {e}"))
            })?;
        if let Some(e) = epochs {
            cfg.epochs = e;
        }
        if let Some(n) = ucr_every {
            cfg.ucr_every = n;
        }
        if cfg.objective != OBJECTIVE {
            if matches!(cfg.variant, Variant::Csn | Variant::Independent) {
                return Err(Error::Config(format!(
                    "{path:?}: this {} run began under the loss of an earlier modkit (version {}; this build trains version {OBJECTIVE}), so resuming would not continue it: train it again, or resume it with the build that began it",
                    cfg.variant, cfg.objective
                )));
            }
            // The other variants' loss did not change.
            cfg.objective = OBJECTIVE;
        }
        let config = &ckpt.header.train_config;
        check_splits(path, config, ds.csn_splits, Reuse::Again)?;
        // Every weight comes from the checkpoint, so `init_from` is not read again.
        let mut t = Self::fresh(cfg, ds, device)?;
        t.load_tensors(&ckpt)?;
        t.epoch = ckpt.header.epoch;
        t.last_metrics = ckpt.header.metrics.clone();
        t.log_lines = logged_epochs(&existing_sibling(path, "metrics.jsonl"), t.epoch)?;
        // A run stopped between writing its checkpoint and its log: the
        // checkpoint's metrics are its last epoch's line.
        let logged = |line: &String| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("epoch")?.as_u64())
        };
        let last_logged = t.log_lines.last().and_then(logged).unwrap_or(0);
        if last_logged + 1 == t.epoch as u64
            && t.last_metrics.get("epoch").and_then(|e| e.as_u64()) == Some(t.epoch as u64)
        {
            t.log_lines.push(t.last_metrics.to_string());
        }
        t.last_saved = Some((t.epoch, path.to_path_buf()));
        Ok(t)
    }

    fn load_tensors(&mut self, ckpt: &Checkpoint) -> Result<()> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("poisoned VarMap".into()))?;
        for (name, t) in &ckpt.tensors {
            let value = Tensor::from_slice(&t.data, t.shape.as_slice(), &self.device)?;
            if self.opt.load_state(name, &value)? {
                continue;
            }
            if let Some(var) = data.get(name) {
                var.set(&value)?;
            }
        }
        Ok(())
    }

    /// Copies the shared network (every tensor of the plain network: weights,
    /// BatchNorm parameters and statistics) of the checkpoint at `path` into the
    /// variables. The checkpoint must be of the same spec and have a shared trunk.
    fn load_shared(&mut self, path: &Path, ckpt: &Checkpoint) -> Result<()> {
        let theirs = &ckpt.header.spec;
        let ours = &self.cfg.spec;
        let same = theirs.input_size == ours.input_size
            && theirs.in_channels == ours.in_channels
            && theirs.widths == ours.widths
            && theirs.embedding == ours.embedding
            && theirs.batch_norm == ours.batch_norm;
        if !same {
            return Err(Error::Config(format!(
                "--init-from {path:?} holds a {} network ({}×{}, widths {:?}, embedding {}, BatchNorm {}), this run a {} one ({}×{}, widths {:?}, embedding {}, BatchNorm {}): use the same network options",
                theirs.name,
                theirs.input_size,
                theirs.input_size,
                theirs.widths,
                theirs.embedding,
                theirs.batch_norm,
                ours.name,
                ours.input_size,
                ours.input_size,
                ours.widths,
                ours.embedding,
                ours.batch_norm,
            )));
        }
        if ckpt.header.variant == Variant::Independent {
            return Err(Error::Config(format!(
                "--init-from {path:?} is an independent run: one network per task, no shared weights; start from branch:K, shared, modulated or csn"
            )));
        }
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("poisoned VarMap".into()))?;
        for e in names::base_network(ours, "") {
            let t = ckpt.tensors.get(&e.name).ok_or_else(|| {
                Error::Config(format!(
                    "--init-from {path:?} has no {}: not a checkpoint of this network",
                    e.name
                ))
            })?;
            let var = data
                .get(&e.name)
                .ok_or_else(|| Error::Config(format!("variable {} missing", e.name)))?;
            var.set(&Tensor::from_slice(
                &t.data,
                t.shape.as_slice(),
                &self.device,
            )?)?;
        }
        Ok(())
    }

    /// The network being trained.
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// The test triplets, per task.
    pub fn test_triplets(&self) -> &[Vec<Triplet>] {
        &self.test
    }

    /// What a step minimises, from its triplet loss: the loss itself, or for
    /// `independent` each network's own task's loss (their sum, so that each
    /// network's gradient is its task's alone, [`BatchLoss::tasks_apart`]); plus
    /// eq. 8's relation term when asked for, and CSN's mask penalty. Also the
    /// value logged (for `independent`, the mean of the tasks' losses, comparable
    /// with the other variants') and the relation term's value.
    fn objective(&self, batch: &BatchLoss) -> Result<(Tensor, f32, f64)> {
        let cfg = &self.cfg;
        let independent = cfg.variant == Variant::Independent;
        let mut loss = match independent {
            true => batch.tasks_apart()?,
            false => batch.loss.clone(),
        };
        let mut relation = 0.0;
        // Eq. 8 on the modulation, when asked for (`validate` made sure there is
        // modulation).
        let vectors = match self.relations.is_empty() {
            true => None,
            false => self.net.task_vectors()?,
        };
        if let Some(w) = vectors {
            let r = relation_loss(&w, &self.relations, cfg.relation_margin)?;
            relation = r.to_scalar::<f32>()? as f64;
            loss = (loss + (r * cfg.relation_weight)?)?;
        }
        if let Some(norm) = self.net.csn_mask_norm()? {
            loss = (loss + (norm * CSN_MASK_PENALTY)?)?;
        }
        // One read of the total (a sync on CUDA); `independent` has no other term.
        let mut shown = loss.to_scalar::<f32>()?;
        if independent {
            shown /= self.attrs.len() as f32;
        }
        Ok((loss, shown, relation))
    }

    /// Trains one epoch; `progress(step, steps, loss)` is called after every step.
    pub fn train_epoch(
        &mut self,
        ds: &Dataset,
        progress: &mut dyn FnMut(usize, usize, f32),
    ) -> Result<(f64, f64)> {
        let cfg = &self.cfg;
        let k = cfg.batch_per_task;
        let t = self.attrs.len();
        self.opt
            .set_lr(cfg.lr * cfg.lr_decay.powi(self.epoch as i32));
        let train = triplets::sample(
            ds,
            Split::Train,
            &self.attrs,
            cfg.triplets_per_task,
            cfg.seed,
            triplets::train_stream(self.epoch),
        )?;
        let steps = cfg.triplets_per_task / k;
        let groups: Vec<(usize, usize)> = (0..t).map(|task| (task, 3 * k)).collect();
        let (mut loss_sum, mut ok_sum) = (0.0, 0.0);
        self.step_times.clear();
        let mut ucr = (cfg.ucr_every > 0).then(|| UcrCounter::new(t));
        let mut relation_sum = 0.0;
        let since = |t: &mut Instant| {
            let now = Instant::now();
            let d = (now - *t).as_secs_f64();
            *t = now;
            d
        };
        for step in 0..steps {
            let mut times = StepTimes::default();
            let mut clock = Instant::now();
            let mut idx = Vec::with_capacity(3 * k * t);
            for ts in &train {
                let chunk = &ts[step * k..(step + 1) * k];
                idx.extend(chunk.iter().map(|x| x.anchor));
                idx.extend(chunk.iter().map(|x| x.positive));
                idx.extend(chunk.iter().map(|x| x.negative));
            }
            let mut work = || -> Result<_> {
                let x = batch_images(ds, &idx, &cfg.preprocess, &self.device)?;
                times.data = since(&mut clock);
                let emb = if cfg.mining == Mining::Pooled {
                    self.net.forward_all_tasks(&x, true)?
                } else {
                    self.net.forward_grouped(&x, &groups, true)?
                };
                let batch = match cfg.mining {
                    Mining::Sampled => sampled_loss(&emb, t, k, cfg.margin)?,
                    Mining::BatchAll => {
                        let labels: Vec<u16> = idx
                            .chunks(3 * k)
                            .zip(&self.attrs)
                            .flat_map(|(block, &a)| block.iter().map(move |&i| ds.class(i, a)))
                            .collect();
                        batch_all_loss(&emb, &labels, t, 3 * k, cfg.margin)?
                    }
                    Mining::Pooled => {
                        let labels: Vec<u16> = self
                            .attrs
                            .iter()
                            .flat_map(|&a| idx.iter().map(move |&i| ds.class(i, a)))
                            .collect();
                        pooled_loss(&emb, &labels, t, idx.len(), 3 * k, cfg.margin)?
                    }
                };
                let ok = batch.satisfied;
                let (loss, value, relation) = self.objective(&batch)?;
                // ReLU maps NaN to 0, so the loss alone can hide a NaN embedding.
                let probe = emb.sum_all()?.to_scalar::<f32>()?;
                if !value.is_finite() || !probe.is_finite() {
                    let value = if value.is_finite() { probe } else { value };
                    return Err(Error::NonFinite {
                        epoch: self.epoch + 1,
                        step: step + 1,
                        loss: value,
                        kept: self.last_saved.clone(),
                    });
                }
                times.forward = since(&mut clock);
                let grads = loss.backward()?;
                // CUDA runs asynchronously: wait, or the time lands in the next phase.
                self.device.synchronize()?;
                times.backward = since(&mut clock);
                if let Some(ucr) = ucr.as_mut().filter(|_| step % cfg.ucr_every == 0) {
                    ucr.add(&gradient_gram(&batch.per_task()?, &self.shared)?);
                    // Not part of the step's own time.
                    self.device.synchronize()?;
                    since(&mut clock);
                }
                Ok((grads, value, ok, relation))
            };
            // On the CPU, batch, forward and backward are back-to-back parallel
            // loops: the other threads spin between them instead of sleeping
            // (`workers`). Not on a GPU, where they would only burn a core, and not
            // the update, whose element-wise ops run on candle's own threads.
            let (grads, value, ok, relation) = if self.device.is_cpu() {
                crate::workers::keep_awake(work)?
            } else {
                work()?
            };
            self.opt.step(&grads)?;
            self.device.synchronize()?;
            times.update = since(&mut clock);
            self.step_times.push(times);
            loss_sum += value as f64;
            ok_sum += ok;
            relation_sum += relation;
            progress(step + 1, steps, value);
        }
        self.epoch += 1;
        self.ucr = ucr;
        self.relation_loss = (!self.relations.is_empty()).then(|| relation_sum / steps as f64);
        Ok((loss_sum / steps as f64, ok_sum / steps as f64))
    }

    /// Per-step timings of the last epoch trained, in order.
    pub fn step_times(&self) -> &[StepTimes] {
        &self.step_times
    }

    /// Per-task test triplet accuracy.
    pub fn evaluate(&self, ds: &Dataset) -> Result<Vec<f64>> {
        triplet_accuracy(
            &self.detached_net()?,
            ds,
            &self.test,
            &self.cfg.preprocess,
            &self.device,
        )
    }

    /// The network over detached views of the variables (the same storage, not a
    /// copy). Through the variables, candle records every op's inputs, so all of a
    /// forward's intermediate tensors stay alive until its output is dropped; with
    /// plain tensors each is freed once the next op has read it. Evaluating a
    /// paper@150 checkpoint peaked at 3.4 GB of allocations in 64-image batches
    /// that way (six live copies of a stage's largest tensor).
    fn detached_net(&self) -> Result<Network> {
        let tensors = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("poisoned VarMap".into()))?
            .iter()
            .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &self.device);
        Network::new(&self.cfg.spec, self.cfg.variant, &self.cfg.tasks, vb)
    }

    /// The checkpoint of the current state (weights, BN statistics, optimizer state).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("poisoned VarMap".into()))?;
        let to_data = |t: &Tensor| -> Result<TensorData> {
            Ok(TensorData {
                shape: t.dims().to_vec(),
                data: t.flatten_all()?.to_vec1::<f32>()?,
            })
        };
        let mut tensors = BTreeMap::new();
        for e in names::schema(&self.cfg.spec, &self.cfg.variant, &self.cfg.tasks) {
            let var = data
                .get(&e.name)
                .ok_or_else(|| Error::Config(format!("variable {} missing", e.name)))?;
            tensors.insert(e.name, to_data(var.as_tensor())?);
        }
        for (name, t) in self.opt.state()? {
            tensors.insert(name, to_data(&t)?);
        }
        Ok(Checkpoint {
            header: CheckpointHeader {
                spec: self.cfg.spec.clone(),
                variant: self.cfg.variant,
                tasks: self.cfg.tasks.clone(),
                preprocess: self.cfg.preprocess,
                epoch: self.epoch,
                train_config: serde_json::to_value(&self.cfg)
                    .map_err(|e| Error::Config(format!("serialising the config: {e}")))?,
                metrics: self.last_metrics.clone(),
            },
            tensors,
        })
    }

    /// The checkpoint of the current state, or an error if one of its tensors
    /// (weights, task vectors, BatchNorm statistics, the optimizer's state) holds a
    /// NaN or infinity after epoch `self.epoch`, before it replaces the last good
    /// checkpoint: the loss can stay finite while BatchNorm's running variance, or
    /// Adam's second moment, overflows, and a checkpoint holding one does not load.
    fn finite_checkpoint(&self) -> Result<Checkpoint> {
        let ckpt = self.checkpoint()?;
        match ckpt.non_finite() {
            Some(name) => Err(Error::Diverged {
                epoch: self.epoch,
                tensor: name.to_string(),
                kept: self.last_saved.clone(),
            }),
            None => Ok(ckpt),
        }
    }

    /// Trains the remaining epochs, evaluating, logging and checkpointing to `out`
    /// after each. `on_epoch` sees each epoch's log; `progress` each step.
    pub fn run_with(
        &mut self,
        ds: &Dataset,
        out: &Path,
        progress: &mut dyn FnMut(usize, usize, f32),
        on_epoch: &mut dyn FnMut(&EpochLog),
    ) -> Result<Report> {
        let mut logs = Vec::new();
        let mut last_accuracy = None;
        let images_per_epoch = (self.cfg.triplets_per_task * 3 * self.attrs.len()) as f64;
        while self.epoch < self.cfg.epochs {
            let start = Instant::now();
            let (loss, train_accuracy) = self.train_epoch(ds, progress)?;
            // Built once, checked before evaluating, saved with the metrics after.
            let mut ckpt = self.finite_checkpoint()?;
            let seconds = start.elapsed().as_secs_f64();
            let acc = self.evaluate(ds)?;
            let mean = acc.iter().sum::<f64>() / acc.len() as f64;
            let log = EpochLog {
                epoch: self.epoch,
                loss,
                train_accuracy,
                test_accuracy: self
                    .cfg
                    .tasks
                    .iter()
                    .cloned()
                    .zip(acc.iter().copied())
                    .collect(),
                mean_accuracy: mean,
                lr: self.opt.lr(),
                seconds,
                images_per_second: images_per_epoch / seconds,
                step_seconds: self
                    .step_times
                    .iter()
                    .fold(StepTimes::default(), |mut a, &t| {
                        a += t;
                        a
                    }),
                ucr: self.ucr.as_ref().map(|u| u.log(&self.cfg.tasks)),
                relation_loss: self.relation_loss,
            };
            self.last_metrics =
                serde_json::to_value(&log).map_err(|e| Error::Config(e.to_string()))?;
            if logs.is_empty() {
                // With the run's first checkpoint, not before: a run that stops in
                // its first epoch leaves an old run's files at `out` as they were.
                self.write_test_triplets(ds, out)?;
            }
            ckpt.header.metrics = self.last_metrics.clone();
            ckpt.save(out)?;
            self.last_saved = Some((self.epoch, out.to_path_buf()));
            // The log describes the checkpoint beside it: this run's epochs only.
            self.log_lines.push(self.last_metrics.to_string());
            let mut text = self.log_lines.join("\n");
            text.push('\n');
            modkit_models::write_atomic(&sibling(out, "metrics.jsonl"), text.as_bytes())?;
            on_epoch(&log);
            logs.push(log);
            last_accuracy = Some(acc);
        }
        // The last epoch's evaluation is the final one: nothing changed since. A run
        // resumed with no epochs left evaluates here.
        let accuracy = match last_accuracy {
            Some(acc) => acc,
            None => self.evaluate(ds)?,
        };
        let mean_accuracy = accuracy.iter().sum::<f64>() / accuracy.len() as f64;
        Ok(Report {
            epochs: logs,
            accuracy: self.cfg.tasks.iter().cloned().zip(accuracy).collect(),
            mean_accuracy,
        })
    }

    /// [`Trainer::run_with`] without callbacks.
    pub fn run(&mut self, ds: &Dataset, out: &Path) -> Result<Report> {
        self.run_with(ds, out, &mut |_, _, _| {}, &mut |_| {})
    }

    fn write_test_triplets(&self, ds: &Dataset, out: &Path) -> Result<()> {
        let by_name: BTreeMap<&str, Vec<[&str; 3]>> = self
            .cfg
            .tasks
            .iter()
            .zip(&self.test)
            .map(|(task, ts)| {
                let rows = ts
                    .iter()
                    .map(|t| {
                        [
                            &ds.files[t.anchor],
                            &ds.files[t.positive],
                            &ds.files[t.negative],
                        ]
                        .map(String::as_str)
                    })
                    .collect();
                (task.as_str(), rows)
            })
            .collect();
        let json = serde_json::json!({ "seed": self.cfg.seed, "split": "test", "tasks": by_name });
        modkit_models::write_atomic(&sibling(out, "triplets.json"), json.to_string().as_bytes())?;
        Ok(())
    }
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("cfg", &self.cfg)
            .field("device", &self.device)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// The variables the optimizer updates, by name, in schema order.
fn trainable(varmap: &VarMap, cfg: &TrainConfig) -> Result<Vec<(String, Var)>> {
    // Only-mask keeps the shared weights it started from.
    variables(varmap, cfg, |e| {
        e.trainable
            && (cfg.variant != Variant::OnlyMask || !names::shared_by_tasks(&cfg.variant, &e.name))
    })
}

/// The parameters (not statistics) every task shares, whose per-task gradients
/// UCR compares; fixed ones included.
fn shared_parameters(varmap: &VarMap, cfg: &TrainConfig) -> Result<Vec<Var>> {
    let vars = variables(varmap, cfg, |e| {
        e.trainable && names::shared_by_tasks(&cfg.variant, &e.name)
    })?;
    Ok(vars.into_iter().map(|(_, v)| v).collect())
}

/// The variables of the schema's entries that `keep`, by name, in schema order.
fn variables(
    varmap: &VarMap,
    cfg: &TrainConfig,
    keep: impl Fn(&names::TensorEntry) -> bool,
) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("poisoned VarMap".into()))?;
    names::schema(&cfg.spec, &cfg.variant, &cfg.tasks)
        .into_iter()
        .filter(|e| keep(e))
        .map(|e| {
            let v = data
                .get(&e.name)
                .cloned()
                .ok_or_else(|| Error::Config(format!("variable {} missing", e.name)))?;
            Ok((e.name, v))
        })
        .collect()
}

/// The lines of the log at `path` for epochs 1..=`epoch`, in order; none when it
/// is missing. Lines past `epoch` (a run that went on after the checkpoint) and
/// a last line cut short by a crash are dropped. A log that cannot be read, or a
/// line before the last that is no log entry, is an error: resuming rewrites
/// the log, and would lose what it holds.
fn logged_epochs(path: &Path, epoch: usize) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Config(format!(
                "{path:?}: cannot read the run's log ({e}); resuming rewrites it: repair it, or move it away to start a new one"
            )));
        }
    };
    // The last line of each epoch: logs appended to by earlier versions can hold
    // an older run's epochs before this one's.
    let mut by_epoch = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let e = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("epoch")?.as_u64());
        match e {
            Some(e) if (1..=epoch as u64).contains(&e) => {
                by_epoch.insert(e, line.to_string());
            }
            Some(_) => {}
            None if i + 1 == lines.len() || line.trim().is_empty() => {}
            None => {
                return Err(Error::Malformed {
                    path: path.into(),
                    line: i + 1,
                    msg: "not an epoch's log entry; resuming rewrites the log: repair the line, or move the log away to start a new one".into(),
                });
            }
        }
    }
    Ok(by_epoch.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only UT-Zappos50K runs evaluated on UT-Zappos50K are checked, and runs
    /// from before the record count as split by hash.
    #[test]
    fn splits_are_checked_for_zappos_runs_only() {
        let path = Path::new("run.safetensors");
        let check = |config: serde_json::Value, now: Option<bool>| {
            check_splits(path, &config, now, Reuse::Start).map_err(|e| e.to_string())
        };
        let (zappos, old_zappos, folder) = (
            serde_json::json!({ "data": "zappos:/z", "csn_splits": true }),
            serde_json::json!({ "data": "zappos:/z" }),
            serde_json::json!({ "data": "folder:/f" }),
        );
        assert_eq!(check(zappos.clone(), Some(true)), Ok(()));
        assert_eq!(check(folder.clone(), Some(true)), Ok(()));
        let err = check(old_zappos.clone(), Some(true)).unwrap_err();
        assert!(
            err.contains("split by hash") && err.contains("away to start from it"),
            "{err}"
        );
        assert_eq!(check(old_zappos.clone(), Some(false)), Ok(()));
        let err = check(zappos.clone(), Some(false)).unwrap_err();
        assert!(
            err.contains("put them back") && err.contains("to start from it"),
            "{err}"
        );
        // Not UT-Zappos50K now: nothing to compare.
        assert_eq!(check(zappos, None), Ok(()));
        let err = check_splits(path, &old_zappos, Some(true), Reuse::Again).unwrap_err();
        assert!(
            err.to_string().contains("away to evaluate or resume it"),
            "{err}"
        );
    }

    /// The step estimate is above what a step takes, and refuses only minibatches
    /// far past the paper's (7 tasks × 8 triplets at 150×150).
    #[test]
    fn step_memory_is_bounded_above_real_steps() {
        let paper = NetSpec::paper();
        let mut p64 = paper.clone();
        p64.input_size = 64;
        let gb = |b: u128| b as f64 / 1e9;
        // `bench-step --spec paper --size 64`: 96 images, 0.66 GB peak resident.
        let at64 = gb(step_bytes(&p64, 96));
        assert!((0.66..2.0).contains(&at64), "{at64}");
        let at150 = gb(step_bytes(&paper, 96));
        assert!((3.5..8.0).contains(&at150), "{at150}");
        let mut cfg = small_cfg();
        cfg.spec = NetSpec::tiny();
        cfg.batch_per_task = 100_000;
        cfg.triplets_per_task = 100_000;
        let (cpu, limit) = (Device::Cpu, 16 << 30);
        let err = cfg.check_step_memory(&cpu, limit).unwrap_err().to_string();
        assert!(
            err.contains("--batch-per-task 100000 for 2 tasks is 600000 images")
                && err.contains("more than this machine's 16.0 GiB")
                && err.contains("smaller --batch-per-task"),
            "{err}"
        );
        cfg.validate()
            .expect("not checked when validating (eval, resume)");
        cfg.batch_per_task = 32;
        cfg.check_step_memory(&cpu, limit)
            .expect("a usual minibatch");
        // The paper's minibatch fits 16 GiB.
        cfg.spec = paper;
        cfg.tasks = (0..7).map(|i| format!("t{i}")).collect();
        cfg.batch_per_task = 8;
        cfg.check_step_memory(&cpu, limit).expect("the paper's");
    }

    fn small_cfg() -> TrainConfig {
        let mut spec = NetSpec::tiny();
        spec.widths = [4, 8, 8, 8, 8];
        spec.embedding = 8;
        TrainConfig {
            spec,
            tasks: vec!["smiling".into(), "bangs".into()],
            epochs: 2,
            triplets_per_task: 16,
            batch_per_task: 4,
            test_triplets_per_task: 20,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn loss_falls_when_training_on_one_batch() {
        // Gradients reach every layer through the custom conv/pool kernels: a fixed
        // batch of 2 tasks × 8 triplets is fitted within a few Adagrad steps.
        let ds = Dataset::synthetic(200, 48, 4);
        let cfg = TrainConfig {
            batch_per_task: 8,
            ..small_cfg()
        };
        let mut t = Trainer::new(cfg, &ds, Device::Cpu).expect("trainer");
        let x = batch_images(&ds, &one_batch(&ds, &t), &t.cfg.preprocess, &Device::Cpu).expect("x");
        let mut losses = Vec::new();
        for _ in 0..15 {
            let emb = t
                .net
                .forward_grouped(&x, &[(0, 24), (1, 24)], true)
                .expect("fwd");
            let loss = sampled_loss(&emb, 2, 8, 0.2).expect("loss").loss;
            losses.push(loss.to_scalar::<f32>().expect("scalar"));
            t.opt.step(&loss.backward().expect("bwd")).expect("step");
        }
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < first * 0.5, "loss did not fall: {losses:?}");
    }

    #[test]
    fn evaluation_runs_on_the_same_parameters_without_a_graph() {
        let ds = Dataset::synthetic(200, 48, 4);
        for variant in [
            Variant::Modulated,
            Variant::Shared,
            Variant::Independent,
            Variant::Branch { k: 4 },
            Variant::Csn,
        ] {
            let cfg = TrainConfig {
                variant,
                ..small_cfg()
            };
            let mut t = Trainer::new(cfg, &ds, Device::Cpu).expect("trainer");
            t.run(
                &ds,
                &tempfile::tempdir()
                    .expect("dir")
                    .path()
                    .join("c.safetensors"),
            )
            .expect("train");
            let x =
                batch_images(&ds, &one_batch(&ds, &t), &t.cfg.preprocess, &Device::Cpu).expect("x");
            let eval = t.detached_net().expect("detached");
            // Even a training-mode forward records nothing: no parameter is a variable.
            assert!(!eval.trunk(&x, 0, true).expect("trunk").track_op());
            assert!(t.net.trunk(&x, 0, true).expect("trunk").track_op());
            // The trained values (and BatchNorm statistics), not a fresh network's.
            let ours = triplet_accuracy(&t.net, &ds, &t.test, &t.cfg.preprocess, &Device::Cpu)
                .expect("accuracy");
            assert_eq!(t.evaluate(&ds).expect("evaluate"), ours, "{variant}");
        }
    }

    /// Image indices of one minibatch: 8 sampled triplets per task, laid out as
    /// `forward_grouped` expects (each task's anchors, positives, negatives).
    fn one_batch(ds: &Dataset, t: &Trainer) -> Vec<usize> {
        let ts = triplets::sample(ds, Split::Train, &t.attrs, 8, 0, 0).expect("triplets");
        ts.iter()
            .flat_map(|ts| {
                let a = ts.iter().map(|x| x.anchor);
                let p = ts.iter().map(|x| x.positive);
                a.chain(p)
                    .chain(ts.iter().map(|x| x.negative))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// A trainer of [`small_cfg`] with `variant`, `mining` and 8 triplets per task,
    /// and its first minibatch: dataset indices and images.
    fn with_one_batch(
        ds: &Dataset,
        variant: Variant,
        mining: Mining,
    ) -> (Trainer, Vec<usize>, Tensor) {
        let cfg = TrainConfig {
            variant,
            mining,
            batch_per_task: 8,
            ..small_cfg()
        };
        let t = Trainer::new(cfg, ds, Device::Cpu).expect("trainer");
        let idx = one_batch(ds, &t);
        let x = batch_images(ds, &idx, &t.cfg.preprocess, &Device::Cpu).expect("x");
        (t, idx, x)
    }

    type StepGrads = (f32, Vec<(String, Option<Vec<f32>>)>);

    /// Loss and gradients of one training step from the seed, on `device`.
    fn step_grads(device: Device) -> StepGrads {
        let ds = Dataset::synthetic(120, 48, 4);
        let cfg = TrainConfig {
            batch_per_task: 8,
            ..small_cfg()
        };
        let t = Trainer::new(cfg, &ds, device.clone()).expect("trainer");
        let x = batch_images(&ds, &one_batch(&ds, &t), &t.cfg.preprocess, &device).expect("x");
        // Noise breaks the exact ties of the synthetic images' flat regions: a tie
        // rounded one way or the other sends a max-pool gradient to another pixel.
        let noise = crate::ops::test_util::rand(x.dims(), 7)
            .to_device(&device)
            .expect("noise");
        let x = (x + (noise * 0.1).expect("scale")).expect("x");
        let emb = t
            .net
            .forward_grouped(&x, &[(0, 24), (1, 24)], true)
            .expect("fwd");
        let loss = sampled_loss(&emb, 2, 8, 0.2).expect("loss").loss;
        let grads = loss.backward().expect("bwd");
        let named = trainable(&t.varmap, &t.cfg).expect("vars");
        let g = named
            .iter()
            .map(|(name, v)| {
                let g = grads.get(v).map(|g| {
                    g.flatten_all()
                        .and_then(|g| g.to_vec1::<f32>())
                        .expect("grad")
                });
                (name.clone(), g)
            })
            .collect();
        (loss.to_scalar::<f32>().expect("loss"), g)
    }

    /// Same loss (relative `tol`/10) and gradients (‖a − b‖ ≤ tol·‖a‖ per variable).
    fn assert_same_step((la, ga): &StepGrads, (lb, gb): &StepGrads, tol: f32) {
        assert!(
            (la - lb).abs() <= tol / 10.0 * la.abs().max(1e-3),
            "loss {la} vs {lb}"
        );
        assert_eq!(ga.len(), gb.len());
        for ((name, a), (_, b)) in ga.iter().zip(gb) {
            let (Some(a), Some(b)) = (a, b) else {
                assert_eq!(
                    a.is_some(),
                    b.is_some(),
                    "{name}: a gradient on one side only"
                );
                continue;
            };
            let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
            let norm: f32 = a.iter().map(|x| x * x).sum();
            assert!(
                diff.sqrt() <= tol * norm.sqrt().max(1e-6),
                "{name}: ‖a − b‖ = {} vs ‖a‖ = {}",
                diff.sqrt(),
                norm.sqrt()
            );
        }
    }

    /// The generic path (candle's ops, the GEMM conv backward: what CUDA runs) and
    /// the fused CPU kernels compute the same training step.
    #[test]
    fn generic_ops_step_matches_cpu_kernels() {
        let kernels = step_grads(Device::Cpu);
        let generic = crate::ops::with_generic_ops(|| step_grads(Device::Cpu));
        assert_same_step(&kernels, &generic, 1e-3);
    }

    /// Built with `--features cuda`, on a machine with a GPU (`scripts/gpu/bench.sh`):
    /// one training step from the same seed gives the same loss and gradients on the
    /// GPU as on the CPU, through cuDNN and through candle's own kernels.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_step_matches_cpu() {
        let gpu = match crate::ops::cudnn::cuda_device(0) {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!("cuda_step_matches_cpu: no GPU here ({e}); nothing compared");
                return;
            }
        };
        assert!(
            crate::ops::cudnn::in_use(),
            "cuda_step_matches_cpu: cuDNN did not load; put libcudnn.so.9 on LD_LIBRARY_PATH"
        );
        let cpu = step_grads(Device::Cpu);
        assert_same_step(&cpu, &step_grads(gpu.clone()), 1e-3);
        let generic = crate::ops::cudnn::without_cudnn(|| step_grads(gpu));
        assert_same_step(&cpu, &generic, 1e-3);
    }

    #[test]
    fn independent_networks_each_get_their_own_tasks_gradient() {
        // Trained in one graph, each network's gradient is what its task's triplets
        // alone give it, not a 1/T share (Adagrad is not scale-invariant).
        let ds = Dataset::synthetic(120, 48, 4);
        for mining in [Mining::Sampled, Mining::BatchAll] {
            let (t, idx, x) = with_one_batch(&ds, Variant::Independent, mining);
            let emb = t
                .net
                .forward_grouped(&x, &[(0, 24), (1, 24)], true)
                .expect("fwd");
            let labels: Vec<u16> = (0..48).map(|i| ds.class(idx[i], t.attrs[i / 24])).collect();
            let loss = |tasks: usize| match mining {
                Mining::Sampled => sampled_loss(&emb.narrow(0, 0, 24 * tasks)?, tasks, 8, 0.2),
                _ => batch_all_loss(
                    &emb.narrow(0, 0, 24 * tasks)?,
                    &labels[..24 * tasks],
                    tasks,
                    24,
                    0.2,
                ),
            };
            let (both, alone) = (loss(2).expect("both"), loss(1).expect("alone"));
            let (objective, shown, _) = t.objective(&both).expect("objective");
            let mean = (both.per_task().expect("parts").sum_all().expect("sum"))
                .to_scalar::<f32>()
                .expect("s");
            assert!(shown > 0.0 && shown.is_finite(), "{mining}: {shown}");
            // The mean loss is still what a shared run would log, give or take the
            // per-task normalisation of batch-all.
            if mining == Mining::Sampled {
                assert!((shown - mean).abs() < 1e-6, "{shown} vs {mean}");
            }
            let (g, ga) = (
                objective.backward().expect("bwd"),
                alone.loss.backward().expect("bwd alone"),
            );
            let prefix = names::independent_prefix(&t.cfg.tasks[0]);
            let mut compared = 0;
            for (name, var) in trainable(&t.varmap, &t.cfg).expect("vars") {
                if !name.starts_with(&prefix) {
                    continue;
                }
                let (a, b) = (g.get(&var), ga.get(&var));
                let (a, b) = (a.expect("grad"), b.expect("grad alone"));
                let err = (a - b)
                    .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                    .expect("err");
                let scale = b
                    .abs()
                    .and_then(|d| d.max_all()?.to_scalar::<f32>())
                    .expect("scale");
                assert!(
                    err <= 1e-5 * scale.max(1e-6),
                    "{mining} {name}: max |∇ − ∇alone| = {err}, max |∇alone| = {scale}"
                );
                compared += 1;
            }
            assert!(compared > 10, "{compared} tensors of the first network");
        }
    }

    #[test]
    fn csn_starts_disjoint_and_pays_for_its_masks() {
        let ds = Dataset::synthetic(120, 48, 4);
        let (t, _, x) = with_one_batch(&ds, Variant::Csn, Mining::Sampled);
        // Embedding 8, two tasks: 1 on its own 4 numbers, 0.1 on the other's.
        let ckpt = t.checkpoint().expect("ckpt");
        let masks = &ckpt.tensors[names::CSN_MASKS];
        assert_eq!(masks.shape, [2, 8]);
        let want: Vec<f32> = [[1.0; 4], [0.1; 4], [0.1; 4], [1.0; 4]].concat();
        assert_eq!(masks.data, want);
        // The step's objective adds 5e-4 · mean ‖ReLU(mask)‖₁ = 5e-4 · 4.4 to the
        // triplet loss, and the penalty's gradient reaches the masks.
        let emb = t
            .net
            .forward_grouped(&x, &[(0, 24), (1, 24)], true)
            .expect("fwd");
        let batch = sampled_loss(&emb, 2, 8, 0.2).expect("loss");
        let (objective, shown, _) = t.objective(&batch).expect("objective");
        let plain = batch.loss.to_scalar::<f32>().expect("s");
        let total = objective.to_scalar::<f32>().expect("s");
        assert!(
            (total - plain - 5e-4 * 4.4).abs() < 1e-6,
            "{total} − {plain}"
        );
        assert_eq!(shown, total);
        let masks = trainable(&t.varmap, &t.cfg)
            .expect("vars")
            .into_iter()
            .find(|(n, _)| n == names::CSN_MASKS)
            .expect("masks")
            .1;
        let g = objective.backward().expect("bwd");
        let g0 = batch.loss.backward().expect("bwd plain");
        let extra = (g.get(&masks).expect("grad") - g0.get(&masks).expect("grad plain"))
            .and_then(|d| d.flatten_all()?.to_vec1::<f32>())
            .expect("diff");
        // ∂/∂m of 5e-4 · Σ ReLU(m) / T, for positive m: 2.5e-4 everywhere.
        assert!(extra.iter().all(|d| (d - 2.5e-4).abs() < 1e-7), "{extra:?}");
        // More tasks than numbers in the embedding: refused, not all-0.1 masks.
        let cfg = TrainConfig {
            variant: Variant::Csn,
            tasks: ["smiling", "bangs", "young"].map(String::from).to_vec(),
            spec: NetSpec {
                embedding: 2,
                ..small_cfg().spec
            },
            ..small_cfg()
        };
        let err = Trainer::new(cfg, &ds, Device::Cpu)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("csn") && err.contains("3 tasks need --embedding 3"),
            "{err}"
        );
    }

    #[test]
    fn task_gradients_sum_to_the_step_gradient() {
        // Each task's part of the loss has its share of the step's gradient: the
        // rows UCR compares add up to what the optimizer gets, for every variant
        // with shared parameters and every mining mode.
        let ds = Dataset::synthetic(120, 48, 4);
        let cases = [
            (Variant::Modulated, Mining::Sampled),
            (Variant::Shared, Mining::Sampled),
            (Variant::Branch { k: 4 }, Mining::Sampled),
            (Variant::Csn, Mining::Sampled),
            (Variant::Modulated, Mining::BatchAll),
            (Variant::Modulated, Mining::Pooled),
        ];
        for (variant, mining) in cases {
            let (t, idx, x) = with_one_batch(&ds, variant, mining);
            let (ds, idx) = (&ds, &idx);
            let labels = |per: &dyn Fn(usize) -> Vec<usize>| -> Vec<u16> {
                t.attrs
                    .iter()
                    .enumerate()
                    .flat_map(|(task, &a)| per(task).into_iter().map(move |i| ds.class(idx[i], a)))
                    .collect()
            };
            let batch = match mining {
                Mining::Sampled => {
                    let emb = t
                        .net
                        .forward_grouped(&x, &[(0, 24), (1, 24)], true)
                        .expect("fwd");
                    sampled_loss(&emb, 2, 8, 0.2).expect("loss")
                }
                Mining::BatchAll => {
                    let emb = t
                        .net
                        .forward_grouped(&x, &[(0, 24), (1, 24)], true)
                        .expect("fwd");
                    let l = labels(&|task| (task * 24..(task + 1) * 24).collect());
                    batch_all_loss(&emb, &l, 2, 24, 0.2).expect("loss")
                }
                Mining::Pooled => {
                    let emb = t.net.forward_all_tasks(&x, true).expect("fwd");
                    let l = labels(&|_| (0..48).collect());
                    pooled_loss(&emb, &l, 2, 48, 24, 0.2).expect("loss")
                }
            };
            let full = batch.loss.backward().expect("bwd");
            let want = Tensor::cat(
                &t.shared
                    .iter()
                    .map(|v| full.get(v).expect("grad").flatten_all().expect("flat"))
                    .collect::<Vec<_>>(),
                0,
            )
            .expect("cat");
            let rows = crate::ucr::task_gradients(&batch.per_task().expect("parts"), &t.shared)
                .expect("rows");
            assert_eq!(rows.dims(), [2, want.dim(0).expect("p")]);
            let got = rows.sum(0).expect("sum");
            let err = (&got - &want)
                .and_then(|d| d.sqr()?.sum_all()?.sqrt())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("err");
            let norm = want
                .sqr()
                .and_then(|d| d.sum_all()?.sqrt())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("norm");
            assert!(norm > 0.0, "{variant} {mining}: no gradient");
            assert!(
                err <= 1e-4 * norm,
                "{variant} {mining}: ‖Σ rows − ∇θ‖ = {err}, ‖∇θ‖ = {norm}"
            );
            let names: Vec<_> = trainable(&t.varmap, &t.cfg)
                .expect("vars")
                .into_iter()
                .filter(|(n, _)| names::shared_by_tasks(&variant, n))
                .map(|(n, _)| n)
                .collect();
            assert!(
                names.contains(&"conv1.weight".to_string())
                    && !names.iter().any(|n| n.contains("modulation"))
            );
        }
    }

    #[test]
    fn the_report_and_the_saved_checkpoint_hold_the_last_evaluation() {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("r.safetensors");
        let cfg = TrainConfig {
            epochs: 2,
            ..small_cfg()
        };
        let mut t = Trainer::new(cfg, &ds, Device::Cpu).expect("trainer");
        let report = t.run(&ds, &out).expect("run");
        // In task order, as evaluating the final weights again gives them.
        let again = t.evaluate(&ds).expect("evaluate");
        let tasks = t.cfg.tasks.clone();
        let expected: Vec<(String, f64)> = tasks.into_iter().zip(again).collect();
        assert_eq!(report.accuracy, expected);
        let last = report.epochs.last().expect("epochs");
        assert_eq!(
            last.test_accuracy,
            report.accuracy.iter().cloned().collect()
        );
        // The checkpoint written is the state trained, with the epoch's metrics.
        let saved = Checkpoint::load(&out).expect("load");
        let now = t.checkpoint().expect("ckpt");
        assert_eq!(saved.tensors, now.tensors);
        assert_eq!(saved.header.metrics, now.header.metrics);
        assert_eq!(saved.header.metrics["epoch"], 2);
    }

    #[test]
    fn runs_begun_under_an_earlier_loss_resume_only_where_it_is_unchanged() {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        for variant in [Variant::Csn, Variant::Independent, Variant::Modulated] {
            let out = dir.path().join(format!("{variant}.safetensors"));
            let cfg = TrainConfig {
                variant,
                epochs: 1,
                ..small_cfg()
            };
            Trainer::new(cfg, &ds, Device::Cpu)
                .expect("trainer")
                .run(&ds, &out)
                .expect("run");
            // As an earlier build wrote it: no `objective`.
            let mut ckpt = Checkpoint::load(&out).expect("load");
            let config = ckpt.header.train_config.as_object_mut().expect("object");
            assert_eq!(config.remove("objective"), Some(OBJECTIVE.into()));
            ckpt.save(&out).expect("save");
            let resumed = Trainer::resume(&out, &ds, Device::Cpu, Some(2));
            match variant {
                Variant::Modulated => {
                    let t = resumed.expect("an unchanged loss resumes");
                    assert_eq!(t.cfg.objective, OBJECTIVE);
                }
                _ => {
                    let err = resumed.expect_err("refused").to_string();
                    assert!(
                        err.contains(&format!(
                            "this {variant} run began under the loss of an earlier modkit"
                        )),
                        "{err}"
                    );
                }
            }
        }
    }

    #[test]
    fn measuring_ucr_does_not_change_training() {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let run = |ucr_every: usize| {
            let cfg = TrainConfig {
                epochs: 1,
                ucr_every,
                ..small_cfg()
            };
            let out = dir.path().join(format!("ucr{ucr_every}.safetensors"));
            let mut t = Trainer::new(cfg, &ds, Device::Cpu).expect("trainer");
            let report = t.run(&ds, &out).expect("run");
            (t.checkpoint().expect("ckpt"), report)
        };
        let (plain, plain_report) = run(0);
        let (measured, report) = run(3);
        for (name, t) in &plain.tensors {
            assert_eq!(
                t, &measured.tensors[name],
                "{name} differs when UCR is measured"
            );
        }
        assert!(plain_report.epochs[0].ucr.is_none());
        let ucr = report.epochs[0].ucr.as_ref().expect("ucr logged");
        // 16 triplets per task in batches of 4: steps 0 and 3 are measured.
        assert_eq!(ucr.batches, 2);
        assert_eq!(ucr.tasks, ["smiling", "bangs"]);
        let r = ucr.ratio[0][1].expect("both tasks had a gradient");
        assert_eq!(ucr.ratio[1][0], Some(r));
        assert!((0.0..=1.0).contains(&r) && ucr.ratio[0][0].is_none());
        assert_eq!(ucr.mean, Some(r));
        // Logged in the checkpoint's metrics too.
        assert_eq!(measured.header.metrics["ucr"]["batches"], 2);

        let cfg = TrainConfig {
            variant: Variant::Independent,
            ucr_every: 1,
            ..small_cfg()
        };
        let err = Trainer::new(cfg, &ds, Device::Cpu).expect_err("independent shares nothing");
        assert!(err.to_string().contains("--ucr-every 1"), "{err}");
    }

    #[test]
    fn the_relation_regulariser_pulls_the_closer_pair_together() {
        let ds = Dataset::synthetic(200, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let triple = ["smiling", "mouth_slightly_open", "young"].map(String::from);
        let run = |relations: Vec<[String; 3]>| {
            let cfg = TrainConfig {
                tasks: triple.to_vec(),
                relations,
                relation_weight: 1.0,
                ..small_cfg()
            };
            let mut t = Trainer::new(cfg, &ds, Device::Cpu).expect("trainer");
            let report = t.run(&ds, &dir.path().join("r.safetensors")).expect("run");
            let w = t.net.task_vectors().expect("w").expect("modulated");
            let hinge = relation_loss(&w, &[[0, 1, 2]], 1.0)
                .and_then(|h| Ok(h.to_scalar::<f32>()?))
                .expect("hinge");
            (hinge, report)
        };
        let (free, free_report) = run(Vec::new());
        let (held, report) = run(vec![triple.clone()]);
        assert!(free_report.epochs[1].relation_loss.is_none());
        let logged = report.epochs[1].relation_loss.expect("logged");
        assert!(logged > 0.0 && logged <= 1.0 + 1e-6, "{logged}");
        assert!(
            held < free,
            "with eq. 8 the hinge ends at {held}, without at {free}"
        );
        let cfg = TrainConfig {
            variant: Variant::Shared,
            relations: vec![triple],
            ..small_cfg()
        };
        let err = Trainer::new(cfg, &ds, Device::Cpu).expect_err("no modulation");
        assert!(err.to_string().contains("use --variant modulated"), "{err}");
    }

    #[test]
    fn resume_continues_exactly() {
        for optimizer in [OptimizerKind::Adagrad, OptimizerKind::Adam] {
            let base = TrainConfig {
                optimizer,
                lr: optimizer.default_lr(),
                ..small_cfg()
            };
            let ds = Dataset::synthetic(120, 48, 4);
            let dir = tempfile::tempdir().expect("tmp");
            let full = dir.path().join("full.safetensors");
            let mut a = Trainer::new(base.clone(), &ds, Device::Cpu).expect("a");
            a.run(&ds, &full).expect("run");

            let half = dir.path().join("half.safetensors");
            let mut cfg = base.clone();
            cfg.epochs = 1;
            Trainer::new(cfg, &ds, Device::Cpu)
                .expect("b")
                .run(&ds, &half)
                .expect("run1");
            let mut b = Trainer::resume(&half, &ds, Device::Cpu, Some(2)).expect("resume");
            assert_eq!(b.epoch, 1);
            assert_eq!(b.cfg.optimizer, optimizer);
            b.run(&ds, &half).expect("run2");

            let (ca, cb) = (a.checkpoint().expect("ca"), b.checkpoint().expect("cb"));
            assert_eq!(ca.header.epoch, 2);
            let state = match optimizer {
                OptimizerKind::Adagrad => "optimizer.adagrad.fc.weight",
                OptimizerKind::Adam => "optimizer.adam.v.fc.weight",
            };
            assert!(ca.tensors.contains_key(state), "{optimizer}: no {state}");
            assert_eq!(
                ca.tensors.keys().collect::<Vec<_>>(),
                cb.tensors.keys().collect::<Vec<_>>()
            );
            for (name, t) in &ca.tensors {
                assert_eq!(
                    t, &cb.tensors[name],
                    "{optimizer}: {name} differs after resume"
                );
            }
            let lines = std::fs::read_to_string(sibling(&half, "metrics.jsonl")).expect("log");
            assert_eq!(lines.lines().count(), 2);
        }
    }

    /// The log beside a checkpoint holds that run's epochs only: a fresh run over
    /// an old one starts it anew, a resumed run keeps the epochs up to its
    /// checkpoint (not lines a longer run wrote after it), and checkpoints named
    /// without `.safetensors` keep their whole name in their logs' names.
    #[test]
    fn the_metrics_log_follows_its_checkpoint() {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("m.safetensors");
        let log = sibling(&out, "metrics.jsonl");
        let epochs = |path: &Path| -> Vec<u64> {
            std::fs::read_to_string(path)
                .expect("log")
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).expect("json")["epoch"]
                        .as_u64()
                        .expect("epoch")
                })
                .collect()
        };
        let mut cfg = small_cfg();
        cfg.epochs = 2;
        Trainer::new(cfg.clone(), &ds, Device::Cpu)
            .expect("a")
            .run(&ds, &out)
            .expect("a");
        assert_eq!(epochs(&log), [1, 2]);
        // A later line past the checkpoint's epoch, and a torn one.
        let mut text = std::fs::read_to_string(&log).expect("log");
        text = format!("{{\"epoch\": 1, \"loss\": 9.0}}\n{text}");
        text.push_str("{\"epoch\": 3, \"loss\": 1.0}\n{\"epo");
        std::fs::write(&log, text).expect("write");
        let mut r = Trainer::resume(&out, &ds, Device::Cpu, Some(3)).expect("resume");
        r.run(&ds, &out).expect("resumed");
        assert_eq!(epochs(&log), [1, 2, 3]);
        let resumed = std::fs::read_to_string(&log).expect("log");
        assert!(
            !resumed.contains("\"loss\": 9.0"),
            "an older epoch 1 was kept"
        );
        // Stopped between the checkpoint and its log line: the resumed log takes
        // the checkpoint's metrics for that epoch, so it has no gap.
        let lines: Vec<&str> = resumed.lines().collect();
        std::fs::write(&log, format!("{}\n{}\n", lines[0], lines[1])).expect("cut");
        let mut r = Trainer::resume(&out, &ds, Device::Cpu, Some(4)).expect("resume");
        r.run(&ds, &out).expect("resumed");
        assert_eq!(epochs(&log), [1, 2, 3, 4]);
        let third = std::fs::read_to_string(&log)
            .expect("log")
            .lines()
            .nth(2)
            .map(String::from);
        assert_eq!(
            third.as_deref(),
            Some(lines[2]),
            "epoch 3 from the checkpoint"
        );
        // A damaged line before the last, or bytes that are no text: the resume
        // is refused and the log left as it was.
        for damaged in [
            format!("{{\"epo\n{resumed}").into_bytes(),
            [resumed.as_bytes(), b"\xff\n"].concat(),
        ] {
            std::fs::write(&log, &damaged).expect("write");
            let err = Trainer::resume(&out, &ds, Device::Cpu, Some(4))
                .map(|_| ())
                .expect_err("refused")
                .to_string();
            assert!(err.contains("resuming rewrites"), "{err}");
            assert_eq!(std::fs::read(&log).expect("log"), damaged);
        }
        std::fs::write(&log, &resumed).expect("write");
        cfg.epochs = 1;
        Trainer::new(cfg.clone(), &ds, Device::Cpu)
            .expect("b")
            .run(&ds, &out)
            .expect("b");
        assert_eq!(epochs(&log), [1]);

        let (v1, v2) = (dir.path().join("run.v1"), dir.path().join("run.v2"));
        assert_eq!(
            sibling(&v1, "metrics.jsonl"),
            dir.path().join("run.v1.metrics.jsonl")
        );
        for p in [&v1, &v2] {
            Trainer::new(cfg.clone(), &ds, Device::Cpu)
                .expect("v")
                .run(&ds, p)
                .expect("v");
        }
        assert_eq!(epochs(&sibling(&v1, "metrics.jsonl")), [1]);
        assert_eq!(epochs(&sibling(&v2, "metrics.jsonl")), [1]);
        let run = crate::report::Run::load(&v1).expect("report");
        assert_eq!(run.variant.as_deref(), Some("modulated"));
        // A run named so before session 23 kept its log at `legacy.metrics.jsonl`.
        let legacy = dir.path().join("legacy.v1");
        std::fs::copy(&v1, &legacy).expect("copy");
        std::fs::copy(
            sibling(&v1, "metrics.jsonl"),
            dir.path().join("legacy.metrics.jsonl"),
        )
        .expect("copy");
        let run = crate::report::Run::load(&legacy).expect("legacy log");
        assert_eq!(run.epochs.len(), 1);
        // Two runs of one name in different directories keep apart in reports.
        let mut copies = Vec::new();
        for d in ["a", "b"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("dir");
            let to = dir.path().join(d).join("mod.metrics.jsonl");
            std::fs::copy(&log, &to).expect("copy");
            copies.push(to);
        }
        let runs = crate::report::load_runs(&copies).expect("runs").runs;
        assert_eq!(runs[0].name, "a-mod");
        assert_eq!(runs[1].name, "b-mod");
    }

    /// Only-mask keeps its starting network whole, BatchNorm statistics included
    /// (it normalises with them, not with each batch's), and learns the vectors.
    #[test]
    fn only_mask_keeps_the_shared_network_and_its_statistics() {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let base = dir.path().join("base.safetensors");
        let mut cfg = small_cfg();
        cfg.epochs = 1;
        cfg.variant = Variant::Branch { k: 4 };
        Trainer::new(cfg.clone(), &ds, Device::Cpu)
            .expect("base")
            .run(&ds, &base)
            .expect("base");
        cfg.variant = Variant::OnlyMask;
        cfg.init_from = Some(base.clone());
        // On the CPU's fused nodes, and on the generic ops that other devices run.
        for generic in [false, true] {
            let out = dir.path().join(format!("mask-{generic}.safetensors"));
            let mut t = Trainer::new(cfg.clone(), &ds, Device::Cpu).expect("mask");
            if generic {
                crate::ops::with_generic_ops(|| t.run(&ds, &out)).expect("mask");
            } else {
                t.run(&ds, &out).expect("mask");
            }
            let (before, after) = (
                Checkpoint::load(&base).expect("a"),
                Checkpoint::load(&out).expect("b"),
            );
            let shared = names::base_network(&cfg.spec, "");
            assert!(shared.iter().any(|e| e.name.ends_with("running_var")));
            for e in shared {
                assert_eq!(
                    before.tensors[&e.name], after.tensors[&e.name],
                    "generic {generic}: {} changed",
                    e.name
                );
            }
            let start = vec![1.0; cfg.spec.modulated_stages()[0].channels * cfg.tasks.len()];
            let learned = &after.tensors[&names::modulation(cfg.spec.modulated_stages()[0].name)];
            assert_ne!(
                learned.data, start,
                "generic {generic}: the vectors did not learn"
            );
        }
    }

    #[test]
    fn options_that_cannot_train_are_refused_before_the_data() {
        type Edit = fn(&mut TrainConfig);
        let cases: [(Edit, &str); 10] = [
            (
                |c| c.triplets_per_task = usize::MAX / 2,
                "--triplets-per-task 9",
            ),
            (|c| c.lr = 0.0, "--lr 0"),
            (|c| c.lr = f64::NAN, "--lr NaN"),
            (|c| c.lr_decay = -0.5, "--lr-decay -0.5"),
            (|c| c.margin = -1.0, "--margin -1"),
            (
                |c| c.adagrad_initial_accumulator = -1.0,
                "--adagrad-init -1",
            ),
            (|c| c.epochs = 0, "--epochs 0"),
            (|c| c.test_triplets_per_task = 0, "--test-triplets 0"),
            (|c| c.margin = f64::INFINITY, "--margin inf"),
            // Each list allowed alone, too many over the two tasks.
            (
                |c| c.test_triplets_per_task = MAX_TRIPLETS,
                "--triplets-per-task 16 and --test-triplets",
            ),
        ];
        for (set, want) in cases {
            let mut cfg = small_cfg();
            set(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.starts_with(want), "{want}: {err}");
        }
        let mut cfg = small_cfg();
        cfg.margin = 0.0;
        cfg.adagrad_initial_accumulator = 0.0;
        cfg.validate()
            .expect("zero margin and accumulator are fine");
        // A task named twice, in any spelling.
        let ds = Dataset::synthetic(60, 48, 4);
        cfg.tasks = vec!["smiling".into(), "Smiling".into()];
        let err = Trainer::new(cfg, &ds, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("\"smiling\" is asked for twice"), "{err}");
    }

    #[test]
    fn mining_modes_train_and_pooled_needs_a_shared_trunk() {
        let ds = Dataset::synthetic(120, 48, 4);
        for mining in [Mining::BatchAll, Mining::Pooled] {
            let cfg = TrainConfig {
                mining,
                optimizer: OptimizerKind::Adam,
                lr: 0.001,
                ..small_cfg()
            };
            let mut t = Trainer::new(cfg, &ds, Device::Cpu).expect("t");
            let (loss, acc) = t.train_epoch(&ds, &mut |_, _, _| {}).expect("epoch");
            assert!(loss.is_finite() && loss > 0.0, "{mining}: loss {loss}");
            assert!((0.0..=1.0).contains(&acc), "{mining}: accuracy {acc}");
        }
        let cfg = TrainConfig {
            mining: Mining::Pooled,
            variant: Variant::Independent,
            ..small_cfg()
        };
        let err = Trainer::new(cfg, &ds, Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("pooled") && err.contains("independent"),
            "{err}"
        );
    }

    #[test]
    fn configs_without_optimizer_or_mining_load_as_before() {
        let mut json = serde_json::to_value(TrainConfig::default()).expect("json");
        assert_eq!(json["optimizer"], "adagrad");
        assert_eq!(json["mining"], "sampled");
        let obj = json.as_object_mut().expect("object");
        obj.remove("optimizer");
        obj.remove("mining");
        let cfg: TrainConfig = serde_json::from_value(json).expect("old config");
        assert_eq!(cfg.optimizer, OptimizerKind::Adagrad);
        assert_eq!(cfg.mining, Mining::Sampled);
    }

    #[test]
    fn rejects_unknown_task_and_wrong_image_size() {
        let ds = Dataset::synthetic(60, 48, 4);
        let mut cfg = small_cfg();
        cfg.tasks = vec!["smile".into()];
        let err = Trainer::new(cfg, &ds, Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("\"smile\"") && err.contains("smiling"),
            "{err}"
        );
        let ds64 = Dataset::synthetic(20, 64, 4);
        let err = Trainer::new(small_cfg(), &ds64, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("64") && err.contains("48"), "{err}");
    }

    /// Scales the trainer's variable `name` by `factor` (NaN or ∞ to poison it).
    fn poison(t: &Trainer, name: &str, factor: f64) {
        let data = t.varmap.data().lock().expect("lock");
        let v = &data[name];
        v.set(&v.as_tensor().affine(factor, 0.0).expect("scale"))
            .expect("set");
    }

    /// Trains one epoch to a checkpoint, scales variable `name` by `factor`, and
    /// trains on: the error, and whether the checkpoint is unchanged.
    fn run_after_poisoning(name: &str, factor: f64) -> (Error, bool) {
        run_after(|t| poison(t, name, factor))
    }

    /// Trains one epoch to a checkpoint, applies `damage`, and trains on: the
    /// error, and whether the checkpoint is unchanged.
    fn run_after(damage: impl FnOnce(&mut Trainer)) -> (Error, bool) {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("m.safetensors");
        let mut cfg = small_cfg();
        cfg.epochs = 1;
        let mut t = Trainer::new(cfg, &ds, Device::Cpu).expect("t");
        t.run(&ds, &out).expect("epoch 1");
        let before = std::fs::read(&out).expect("ckpt");
        damage(&mut t);
        t.cfg.epochs = 2;
        let err = t.run(&ds, &out).unwrap_err();
        (err, std::fs::read(&out).expect("ckpt") == before)
    }

    #[test]
    fn non_finite_loss_stops_and_keeps_the_last_checkpoint() {
        // A NaN weight: the next loss is NaN.
        let (err, kept) = run_after_poisoning("fc.weight", f64::NAN);
        assert!(
            matches!(
                err,
                Error::NonFinite {
                    epoch: 2,
                    step: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("the checkpoint of epoch 1 is kept"),
            "{err}"
        );
        assert!(kept, "last good checkpoint changed");
    }

    /// An infinite BatchNorm variance leaves the loss finite (the statistics only
    /// serve evaluation); it must not replace the last good checkpoint either.
    #[test]
    fn diverged_statistics_stop_before_the_checkpoint() {
        let (err, kept) = run_after_poisoning("block5.conv.bn.running_var", f64::INFINITY);
        assert!(
            matches!(&err, Error::Diverged { epoch: 2, tensor, .. } if tensor == "block5.conv.bn.running_var"),
            "{err}"
        );
        assert!(kept, "last good checkpoint changed");
    }

    /// An optimizer state that overflowed (Adagrad's accumulator at infinity: the
    /// weights stay finite, their steps become 0) stops the run too; a checkpoint
    /// holding it would not load.
    #[test]
    fn diverged_optimizer_state_stops_before_the_checkpoint() {
        let (err, kept) = run_after(|t| {
            let (name, acc) = t.opt.state().expect("state").remove(0);
            let inf = (acc.ones_like().expect("ones") * f64::INFINITY).expect("inf");
            assert!(t.opt.load_state(&name, &inf).expect("load"), "{name}");
        });
        assert!(
            matches!(&err, Error::Diverged { epoch: 2, tensor, .. } if tensor.starts_with("optimizer.")),
            "{err}"
        );
        assert!(kept, "last good checkpoint changed");
    }

    /// A fresh run that stops in its first epoch has written nothing, and says so.
    #[test]
    fn a_fresh_run_that_stops_in_epoch_1_says_no_checkpoint_was_written() {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("m.safetensors");
        let mut t = Trainer::new(small_cfg(), &ds, Device::Cpu).expect("t");
        poison(&t, "fc.weight", f64::NAN);
        let err = t.run(&ds, &out).unwrap_err();
        assert!(matches!(err, Error::NonFinite { epoch: 1, .. }), "{err}");
        assert!(
            err.to_string().contains("no checkpoint was written"),
            "{err}"
        );
        assert!(!out.exists());
    }

    /// A fresh run that stops in its first epoch leaves an earlier run's files at
    /// its `-o` as they were: the checkpoint, its log and its test triplets.
    #[test]
    fn a_run_that_stops_in_epoch_1_leaves_an_old_runs_files_alone() {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("m.safetensors");
        let mut cfg = small_cfg();
        cfg.epochs = 1;
        Trainer::new(cfg.clone(), &ds, Device::Cpu)
            .expect("t")
            .run(&ds, &out)
            .expect("the old run");
        let files = ["safetensors", "metrics.jsonl", "triplets.json"].map(|s| sibling(&out, s));
        let read = || files.each_ref().map(|f| std::fs::read(f).expect("file"));
        let before = read();
        cfg.tasks.push("young".into());
        let mut t = Trainer::new(cfg, &ds, Device::Cpu).expect("t");
        poison(&t, "fc.weight", f64::NAN);
        t.run(&ds, &out).unwrap_err();
        assert!(before == read(), "an old run's file changed");
    }

    /// A run resumed to another `-o` that stops before its first save names the
    /// checkpoint it resumed from, which is what is left.
    #[test]
    fn a_resumed_run_that_stops_names_the_checkpoint_it_resumed_from() {
        let ds = Dataset::synthetic(120, 48, 4);
        let dir = tempfile::tempdir().expect("tmp");
        let first = dir.path().join("a.safetensors");
        let second = dir.path().join("b.safetensors");
        let mut cfg = small_cfg();
        cfg.epochs = 1;
        Trainer::new(cfg, &ds, Device::Cpu)
            .expect("t")
            .run(&ds, &first)
            .expect("epoch 1");
        let mut t = Trainer::resume(&first, &ds, Device::Cpu, Some(2)).expect("resume");
        poison(&t, "fc.weight", f64::NAN);
        let err = t.run(&ds, &second).unwrap_err().to_string();
        let want = format!("the checkpoint of epoch 1 is kept at {}", first.display());
        assert!(err.contains(&want), "{err}");
        assert!(!second.exists());
    }
}
