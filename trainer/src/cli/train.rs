use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use modkit_models::output::{self, Output};
use modkit_models::{Modulation, NetSpec, Variant};
use modkit_trainer::data::{DataSource, zappos};
use modkit_trainer::optim::OptimizerKind;
use modkit_trainer::train::{
    Reuse, TrainConfig, Trainer, check_splits, max_step_bytes, sibling, sibling_partner,
};

/// What a training log starts with: its first line's first field.
const LOG: Output = Output::Text {
    what: "training log",
    starts: "{\"epoch\":",
};

/// What a run's test-triplet list starts with.
const TEST_TRIPLETS: Output = Output::Text {
    what: "test-triplet list",
    starts: "{\"seed\":",
};

/// Train a network on triplets from every task (paper sections 3.3, 4.1).
///
/// Writes OUT (safetensors checkpoint, updated atomically after every epoch) and
/// beside it, named after OUT without its `.safetensors`, NAME.metrics.jsonl (one
/// line per epoch) and NAME.triplets.json (the fixed test triplets, with the first
/// checkpoint).
///
/// Example: modtrain train --data synth --variant modulated --spec tiny -o runs/mod.safetensors
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Data: `synth` (generated in memory, the default), `celeba:DIR` (CelebA layout,
    /// e.g. from `modtrain synth`), `zappos:DIR` (UT-Zappos50K as unpacked: its
    /// images directory and ut-zap50k-data/meta-data.csv; with CSN's
    /// tripletlists/ and filenames.json there, the paper's splits) or `folder:DIR` (images
    /// with DIR/labels.csv: `file,<attribute>,…[,split]`, any class values)
    /// [default with --resume: the data the checkpoint was trained on].
    #[arg(long)]
    data: Option<String>,
    /// Images to generate for `--data synth` [default: 6000; with --resume: the checkpoint's].
    #[arg(long)]
    synth_images: Option<usize>,
    /// Load only the first N images of a celeba:, zappos: or folder: directory.
    #[arg(long)]
    limit: Option<usize>,
    /// modulated, shared (FSN), independent (ITN), branch:K (IB-K), csn, or
    /// only-mask (with --init-from: fixed shared weights, only modulation learns).
    #[arg(long, default_value = "modulated")]
    variant: String,
    /// With --variant only-mask: the checkpoint whose shared weights (and
    /// BatchNorm statistics) are loaded and kept fixed, e.g. a branch:K run as in
    /// the paper. The network, data and tasks default to that run's;
    /// --first-modulated and --projection still choose the modulation.
    #[arg(long, value_name = "CKPT")]
    init_from: Option<PathBuf>,
    /// Network preset: tiny (48×48, trains on a CPU in minutes) or paper (Table 2,
    /// 150×150) [default: tiny; with --init-from: that run's network, which --spec
    /// may only repeat].
    #[arg(long)]
    spec: Option<String>,
    /// First modulated block N (2..=5); default: the preset's (4).
    #[arg(long)]
    first_modulated: Option<usize>,
    /// Channel-wise projection matrices instead of scaling vectors (paper eq. 4).
    #[arg(long)]
    projection: bool,
    /// Input side in pixels; default: the preset's (48 tiny, 150 paper; at least 48).
    #[arg(long)]
    input_size: Option<usize>,
    /// Output channels of conv1 and blocks 2..5, comma-separated; default: the preset's
    /// (8,16,32,32,32 tiny; 32,64,128,128,128 paper).
    #[arg(long, value_delimiter = ',')]
    widths: Option<Vec<usize>>,
    /// Embedding size (fc output); default: the preset's (32 tiny, 256 paper).
    #[arg(long)]
    embedding: Option<usize>,
    /// Drop BatchNorm (the paper's Table 2 as printed; the authors' code has it).
    #[arg(long)]
    no_batch_norm: bool,
    /// Comma-separated task (attribute) names; default: the paper's: its 20 face
    /// attributes, or for zappos:DIR category, gender, heel_height and closure; for
    /// folder:DIR every attribute of labels.csv.
    #[arg(long, value_delimiter = ',')]
    tasks: Option<Vec<String>>,
    /// Epochs in all [default: 4; with --resume: the run's own total, so pass a
    /// larger one to train on].
    #[arg(long)]
    epochs: Option<usize>,
    /// Training triplets per task per epoch (re-sampled every epoch).
    #[arg(long, default_value_t = 400)]
    triplets_per_task: usize,
    /// Triplets per task in each minibatch (paper §4.2: 3 for 20 tasks, i.e. 180
    /// images; 8 for 7 tasks, 168).
    #[arg(long, default_value_t = 4)]
    batch_per_task: usize,
    /// Fixed test triplets per task.
    #[arg(long, default_value_t = 500)]
    test_triplets: usize,
    /// adagrad (the paper's) or adam (β 0.9/0.999, bias-corrected).
    #[arg(long, default_value = "adagrad")]
    optimizer: String,
    /// Learning rate [default: 0.01 with adagrad, 0.001 with adam].
    #[arg(long)]
    lr: Option<f64>,
    /// Learning-rate multiplier per epoch.
    #[arg(long, default_value_t = 1.0)]
    lr_decay: f64,
    /// Triplet margin α.
    #[arg(long, default_value_t = 0.2)]
    margin: f64,
    /// sampled (the paper's: only the sampled triplets), batch-all (every valid
    /// triplet within each task's block of the minibatch) or pooled (each task's
    /// block anchors against every image of the minibatch: each image serves all
    /// tasks; learns the synthetic set fastest).
    #[arg(long, default_value = "sampled")]
    mining: String,
    /// Adagrad's starting accumulator (TensorFlow's 0.1; PyTorch's 0 takes larger
    /// first steps) [default: 0.1]. Only with --optimizer adagrad.
    #[arg(long)]
    adagrad_init: Option<f64>,
    /// Measure the Update Compliance Ratio between every pair of tasks (paper
    /// section 3.1: the fraction of minibatches whose per-task gradients on the
    /// shared parameters agree in sign) on every N-th minibatch; 1 measures all of
    /// them, as the paper does. Each measured minibatch costs one extra backward
    /// pass per task; training itself is unchanged. Logged per epoch in
    /// NAME.metrics.jsonl, printed at the end, drawn by `modtrain report`.
    #[arg(long, value_name = "N")]
    ucr_every: Option<usize>,
    /// Prior knowledge for the task-relation regulariser (paper eq. 8): `i,j,k`
    /// says task i is closer to j than to k, e.g. smiling,mouth_slightly_open,young.
    /// Repeat for more triples. Adds λ·max(0, ‖W_i − W_j‖² + β − ‖W_i − W_k‖²) on
    /// the modulation (modulated and only-mask).
    #[arg(long, value_name = "I,J,K")]
    task_relation: Vec<String>,
    /// β of --task-relation (the paper gives none).
    #[arg(long, default_value_t = modkit_trainer::relations::DEFAULT_MARGIN)]
    relation_margin: f64,
    /// λ of --task-relation, its weight beside the triplet loss.
    #[arg(long, default_value_t = modkit_trainer::relations::DEFAULT_WEIGHT)]
    relation_weight: f64,
    /// Fixes the data, initialisation and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, or cuda[:N] when built with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Continue from this checkpoint, bit-exactly: its network, tasks and
    /// training options are used, so only --epochs (the new total), --data,
    /// --synth-images, --limit, --ucr-every, --device, --json and -o may be given.
    #[arg(long, conflicts_with_all = [
        "variant", "init_from", "spec", "first_modulated", "projection", "input_size",
        "widths", "embedding", "no_batch_norm", "tasks", "triplets_per_task",
        "batch_per_task", "test_triplets", "optimizer", "lr", "lr_decay", "margin",
        "mining", "adagrad_init", "task_relation", "relation_margin", "relation_weight",
        "seed",
    ])]
    resume: Option<PathBuf>,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Checkpoint to write.
    #[arg(long, short)]
    out: PathBuf,
}

/// `--data` with a directory made absolute (`folder:rel` → `folder:/…/rel`), as the
/// checkpoint records it, so that `eval` and `--resume` find the data from any
/// working directory.
fn absolute_data(data: &str) -> String {
    match data.split_once(':') {
        Some((kind @ ("celeba" | "zappos" | "folder"), dir)) => std::path::absolute(dir)
            .map_or_else(|_| data.to_string(), |p| format!("{kind}:{}", p.display())),
        _ => data.to_string(),
    }
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let variant: Variant = self.variant.parse()?;
        if self.projection && !variant.is_modulated() {
            anyhow::bail!(
                "--projection shapes the modulation; {variant} has none: drop --projection or use --variant modulated or only-mask"
            );
        }
        // Only-mask continues another run's network: its spec, data and tasks.
        let source = match (&self.init_from, variant) {
            (Some(path), Variant::OnlyMask) => {
                let ckpt = modkit_models::Checkpoint::load(path)?;
                let cfg = serde_json::from_value::<TrainConfig>(ckpt.header.train_config)
                    .with_context(|| {
                        format!("reading the training config of {}", path.display())
                    })?;
                Some(cfg)
            }
            _ => None,
        };
        let mut spec = match (&source, &self.spec) {
            (Some(cfg), Some(name)) => {
                // The fixed weights are of the source's network: no other preset.
                let preset = NetSpec::preset(name)?.name;
                let theirs = cfg.spec.name.split(['@', '-']).next().unwrap_or_default();
                if theirs != preset {
                    anyhow::bail!(
                        "--spec {name}: --init-from {} holds a {} network, whose weights only-mask keeps; drop --spec",
                        self.init_from.as_deref().unwrap_or(Path::new("")).display(),
                        cfg.spec.name,
                    );
                }
                cfg.spec.clone()
            }
            (Some(cfg), None) => cfg.spec.clone(),
            (None, name) => NetSpec::preset(name.as_deref().unwrap_or("tiny"))?,
        };
        if let Some(n) = self.first_modulated {
            spec.first_modulated = n;
        }
        if let Some(size) = self.input_size {
            spec.input_size = size;
            spec.name = format!("{}@{size}", spec.name);
        }
        if let Some(w) = &self.widths {
            spec.widths = w
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("--widths needs 5 numbers, got {}", w.len()))?;
            spec.name = format!(
                "{}-widths-{}",
                spec.name,
                w.iter().map(usize::to_string).collect::<Vec<_>>().join("-")
            );
        }
        if let Some(e) = self.embedding {
            spec.embedding = e;
            spec.name = format!("{}-emb{e}", spec.name);
        }
        if self.projection {
            spec.modulation = Modulation::Projection;
        }
        if self.no_batch_norm {
            spec.batch_norm = false;
        }
        spec.validate()?;
        let optimizer: OptimizerKind = self.optimizer.parse()?;
        let mut defaults = TrainConfig::default();
        if let Some(src) = source {
            defaults.data = src.data;
            defaults.synth_images = src.synth_images;
            defaults.tasks = src.tasks;
        }
        let data = self
            .data
            .as_deref()
            .map_or(defaults.data.clone(), absolute_data);
        let source: DataSource = data.parse()?;
        if let Some(init) = self.adagrad_init
            && optimizer != OptimizerKind::Adagrad
        {
            anyhow::bail!(
                "--adagrad-init {init}: is for --optimizer adagrad, not {optimizer}; leave it out"
            );
        }
        Ok(TrainConfig {
            spec,
            variant,
            tasks: match (&self.tasks, &source) {
                (Some(t), _) => t.clone(),
                (None, DataSource::Zappos(_)) if self.init_from.is_none() => {
                    zappos::PAPER_TASKS.map(String::from).to_vec()
                }
                // Every attribute of the labels, once they are read (`run`).
                (None, DataSource::Folder(_)) if self.init_from.is_none() => Vec::new(),
                (None, _) => defaults.tasks,
            },
            data,
            synth_images: self.synth_images.unwrap_or(defaults.synth_images),
            limit: self.limit,
            // From the data, in `Trainer::new`.
            csn_splits: None,
            epochs: self.epochs.unwrap_or(TrainConfig::default().epochs),
            triplets_per_task: self.triplets_per_task,
            batch_per_task: self.batch_per_task,
            test_triplets_per_task: self.test_triplets,
            lr: self.lr.unwrap_or(optimizer.default_lr()),
            lr_decay: self.lr_decay,
            margin: self.margin,
            mining: self.mining.parse()?,
            optimizer,
            adagrad_initial_accumulator: self
                .adagrad_init
                .unwrap_or(TrainConfig::default().adagrad_initial_accumulator),
            seed: self.seed,
            preprocess: defaults.preprocess,
            ucr_every: self.ucr_every.unwrap_or(0),
            // Absolute, so that `eval` and `--resume` find it from anywhere.
            init_from: self
                .init_from
                .as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
            relations: self
                .task_relation
                .iter()
                .map(|r| {
                    let names: Vec<String> = r.split(',').map(|n| n.trim().to_string()).collect();
                    <[String; 3]>::try_from(names).map_err(|n| {
                        anyhow::anyhow!(
                            "--task-relation {r:?} names {} task(s); write three, i,j,k: i is closer to j than to k",
                            n.len()
                        )
                    })
                })
                .collect::<Result<_>>()?,
            relation_margin: self.relation_margin,
            relation_weight: self.relation_weight,
            objective: defaults.objective,
        })
    }

    /// Refuses, before any work, an `-o` under which the run would replace
    /// anything but a checkpoint and its own log and test triplets (a dataset's
    /// files, another run's log, the `--init-from` checkpoint, a device), or
    /// whose folder it cannot write in.
    fn check_outputs(&self, init_from: Option<&Path>) -> Result<()> {
        let out = &self.out;
        let names_a_directory = out.is_dir()
            || out.file_name().is_none()
            || out
                .as_os_str()
                .to_string_lossy()
                .ends_with(std::path::is_separator);
        if names_a_directory {
            anyhow::bail!(
                "-o {}: names a directory; name the checkpoint file, e.g. {}",
                out.display(),
                out.join("run.safetensors").display()
            );
        }
        if let Some(init) = init_from
            && same_file(init, out)
        {
            anyhow::bail!(
                "-o {}: is the --init-from checkpoint, which the run would replace; name a new file for the only-mask run",
                out.display()
            );
        }
        if modkit_models::is_system_path(out) {
            anyhow::bail!(
                "-o {}: a run writes its log and test triplets beside its checkpoint; name a file in a folder of yours",
                out.display()
            );
        }
        // `run` and `run.safetensors` would write one log.
        let partner = sibling_partner(out);
        if partner.is_file() {
            let resumed = |p: &Path| self.resume.as_deref().is_some_and(|r| same_file(r, p));
            anyhow::bail!(
                "-o {}: its log and test triplets ({}) are those of the checkpoint {} beside it; {}",
                out.display(),
                sibling(out, "metrics.jsonl").display(),
                partner.display(),
                if resumed(&partner) {
                    "resume into that checkpoint itself (-o the same file)".to_string()
                } else if resumed(out) {
                    format!("move {} away to resume this one", partner.display())
                } else {
                    "name the checkpoint otherwise".to_string()
                }
            );
        }
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = dir {
            if let Some(file) = dir.ancestors().find(|a| a.is_file()) {
                anyhow::bail!(
                    "-o {}: {} is a file, not a folder; name the checkpoint in a folder",
                    out.display(),
                    file.display()
                );
            }
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let inputs: Vec<(&Path, &str)> = init_from
            .map(|p| (p, "the --init-from checkpoint"))
            .into_iter()
            .collect();
        output::check(out, Output::Checkpoint, &inputs)?;
        for (suffix, kind) in [("metrics.jsonl", LOG), ("triplets.json", TEST_TRIPLETS)] {
            let path = sibling(out, suffix);
            // Named after -o, so the fix is another -o or moving the folder.
            if path.is_dir() {
                anyhow::bail!(
                    "-o {}: the run's {} goes to {}, which is a folder; move it away, or name another checkpoint",
                    out.display(),
                    kind.what(),
                    path.display()
                );
            }
            output::check(&path, kind, &inputs)?;
        }
        // A folder the run cannot write in fails now, not after the first epoch.
        let dir = dir.unwrap_or(Path::new("."));
        let probe = dir.join(format!(".modtrain-probe{}", std::process::id()));
        std::fs::File::create_new(&probe).map_err(|e| {
            anyhow::anyhow!(
                "-o {}: cannot write in {}: {e}; name a checkpoint in a folder you can write to",
                out.display(),
                dir.display()
            )
        })?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    pub fn run(self) -> Result<()> {
        let device = super::device(&self.device)?;
        if self.epochs == Some(0) {
            anyhow::bail!("--epochs 0 trains nothing and writes no checkpoint: give 1 or more");
        }
        // The config comes from the checkpoint when resuming, so the data is loaded
        // at the size it was trained at.
        let cfg = match &self.resume {
            Some(path) => {
                let ckpt = modkit_models::Checkpoint::load(path)?;
                let mut cfg = serde_json::from_value::<TrainConfig>(ckpt.header.train_config)
                    .with_context(|| {
                        format!("reading the training config of {}", path.display())
                    })?;
                cfg.data = self.data.as_deref().map_or(cfg.data, absolute_data);
                cfg.synth_images = self.synth_images.unwrap_or(cfg.synth_images);
                cfg.limit = self.limit.or(cfg.limit);
                cfg.epochs = self.epochs.unwrap_or(cfg.epochs);
                // Before the data, which may take minutes to load.
                let done = ckpt.header.epoch;
                if cfg.epochs <= done {
                    anyhow::bail!(
                        "{} has trained {done} of {} epochs: pass --epochs N above {done} to train more",
                        path.display(),
                        cfg.epochs,
                    );
                }
                cfg
            }
            None => self.config()?,
        };
        // Before the data, which may take a while to load.
        let generated = matches!(cfg.data.parse::<DataSource>()?, DataSource::Synth);
        if let Some(n) = self.synth_images
            && !generated
        {
            anyhow::bail!(
                "--synth-images {n}: is for --data synth, and {} is read from files; leave it out (--limit N loads fewer of them)",
                cfg.data
            );
        }
        if let Some(n) = self.limit
            && generated
        {
            anyhow::bail!(
                "--limit {n}: is for celeba:, zappos: and folder: data; --data synth generates --synth-images faces instead"
            );
        }
        self.check_outputs(cfg.init_from.as_deref())?;
        cfg.validate()?;
        if self.resume.is_none() {
            cfg.check_step_memory(&device, max_step_bytes())?;
        }
        // The splits too: a run on other splits is refused before minutes of loading.
        let now = cfg.data.parse::<DataSource>()?.csn_splits();
        // A resumed run's `init_from` is not read again.
        let reused = match &self.resume {
            Some(path) => Some((path, Reuse::Again)),
            None => cfg.init_from.as_ref().map(|path| (path, Reuse::Start)),
        };
        if let (Some((path, reuse)), Some(_)) = (reused, now) {
            let ckpt = modkit_models::Checkpoint::load(path)?;
            check_splits(path, &ckpt.header.train_config, now, reuse)?;
        }
        let mut cfg = cfg;
        let ds = super::load_data(
            &cfg.data,
            cfg.spec.input_size,
            cfg.synth_images,
            cfg.seed,
            cfg.limit,
        )?;
        if cfg.tasks.is_empty() {
            cfg.tasks = ds.attributes.clone();
        }
        let mut trainer = match &self.resume {
            Some(path) => {
                let mut t =
                    Trainer::resume_with(path, &ds, device, Some(cfg.epochs), self.ucr_every)?;
                // The data it now trains on, as the new checkpoint must record it.
                t.cfg.data = cfg.data.clone();
                t.cfg.synth_images = cfg.synth_images;
                t.cfg.limit = cfg.limit;
                eprintln!(
                    "resuming {} at epoch {} of {}",
                    path.display(),
                    t.epoch,
                    t.cfg.epochs
                );
                t
            }
            None => Trainer::new(cfg, &ds, device)?,
        };
        let (trainer, ds) = (&mut trainer, &ds);
        let count = modkit_models::ParamCount::of(
            &trainer.cfg.spec,
            &trainer.cfg.variant,
            trainer.cfg.tasks.len(),
        );
        eprintln!(
            "training {} ({} spec) on {} tasks: {} shared + {} per task parameters; {}, lr {}",
            trainer.cfg.variant,
            trainer.cfg.spec.name,
            trainer.cfg.tasks.len(),
            count.shared,
            count.per_task,
            trainer.cfg.optimizer,
            trainer.cfg.lr
        );
        let epochs = trainer.cfg.epochs;
        let images_per_step = 3 * trainer.cfg.batch_per_task * trainer.cfg.tasks.len();
        // Without a terminal the bar is hidden: log every tenth of an epoch instead.
        let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let started = std::cell::Cell::new(std::time::Instant::now());
        // Both callbacks share the bar: the step callback opens it, the epoch one closes it.
        let pb: std::cell::RefCell<Option<indicatif::ProgressBar>> = Default::default();
        let epoch = std::cell::Cell::new(trainer.epoch);
        let report = trainer.run_with(
            ds,
            &self.out,
            &mut |step, steps, loss| {
                // Timed from the end of the first step, which pays one-off costs.
                if step == 1 {
                    started.set(std::time::Instant::now());
                }
                let secs = started.get().elapsed().as_secs_f64();
                let rate = if step > 1 { ((step - 1) * images_per_step) as f64 / secs } else { 0.0 };
                let mut pb = pb.borrow_mut();
                let bar = pb.get_or_insert_with(|| super::bar(steps as u64, format!("epoch {}/{epochs}", epoch.get() + 1)));
                bar.set_position(step as u64);
                bar.set_message(format!("loss {loss:.4}, {rate:.0} img/s"));
                if plain && (step % (steps / 10).max(1) == 0 || step == steps) {
                    eprintln!("epoch {}/{epochs}: step {step}/{steps}, loss {loss:.4}, {rate:.0} img/s", epoch.get() + 1);
                }
            },
            &mut |log| {
                if let Some(bar) = pb.borrow_mut().take() {
                    bar.finish_and_clear();
                }
                epoch.set(log.epoch);
                let ucr = match &log.ucr {
                    Some(u) => match u.mean {
                        Some(m) => format!(", UCR {:.1}% ({} batches)", m * 100.0, u.batches),
                        None => format!(", UCR undefined ({} batches)", u.batches),
                    },
                    None => String::new(),
                };
                let ucr = match log.relation_loss {
                    Some(r) => format!("{ucr}, eq. 8 hinge {r:.4}"),
                    None => ucr,
                };
                eprintln!(
                    "epoch {}/{epochs}: loss {:.4}, train acc {:.1}%, test acc {:.2}%{ucr}, {:.0} s, {:.0} img/s",
                    log.epoch,
                    log.loss,
                    log.train_accuracy * 100.0,
                    log.mean_accuracy * 100.0,
                    log.seconds,
                    log.images_per_second
                );
            },
        )?;
        let ucr = report.epochs.last().and_then(|e| e.ucr.as_ref());
        if self.json {
            let json = serde_json::json!({
                "variant": trainer.cfg.variant,
                "accuracy": report.accuracy.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "mean_accuracy": report.mean_accuracy,
                "ucr": ucr,
                "epochs": report.epochs,
            });
            writeln!(std::io::stdout().lock(), "{json}")?;
        } else {
            super::print_table(&report.accuracy, report.mean_accuracy)?;
            if let Some(ucr) = ucr {
                let mut out = std::io::stdout().lock();
                writeln!(out)?;
                super::report::write_ucr_table(&mut out, ucr)?;
            }
        }
        eprintln!("checkpoint: {}", self.out.display());
        Ok(())
    }
}

/// Whether `a` and `b` name one existing file (through links or `..` too).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
