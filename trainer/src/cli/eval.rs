use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use modkit_models::Checkpoint;
use modkit_trainer::data::DataSource;
use modkit_trainer::train::{Reuse, TrainConfig, Trainer, check_splits};

/// Per-task triplet accuracy of a checkpoint on its fixed test triplets.
///
/// Example: modtrain eval runs/mod.safetensors --data synth
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The checkpoint.
    checkpoint: PathBuf,
    /// Data the test triplets come from; default: what the checkpoint was trained on.
    #[arg(long)]
    data: Option<String>,
    /// Images to generate for `--data synth`; default: the checkpoint's.
    #[arg(long)]
    synth_images: Option<usize>,
    /// Load only the first N images of a CelebA directory; default: the checkpoint's.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    pub fn run(self) -> Result<()> {
        let ckpt = Checkpoint::load(&self.checkpoint)?;
        let cfg: TrainConfig = serde_json::from_value(ckpt.header.train_config.clone())
            .with_context(|| {
                format!(
                    "reading the training config of {}",
                    self.checkpoint.display()
                )
            })?;
        let data = self.data.clone().unwrap_or(cfg.data.clone());
        // Before the data, which may take minutes to load.
        let now = data.parse::<DataSource>()?.csn_splits();
        check_splits(
            &self.checkpoint,
            &ckpt.header.train_config,
            now,
            Reuse::Again,
        )?;
        let device = super::device(&self.device)?;
        let ds = super::load_data(
            &data,
            cfg.spec.input_size,
            self.synth_images.unwrap_or(cfg.synth_images),
            cfg.seed,
            self.limit.or(cfg.limit),
        )?;
        let trainer = Trainer::resume(&self.checkpoint, &ds, device, None)?;
        let acc = trainer.evaluate(&ds)?;
        let mean = acc.iter().sum::<f64>() / acc.len() as f64;
        let rows: Vec<(String, f64)> = trainer.cfg.tasks.iter().cloned().zip(acc).collect();
        if self.json {
            let map: std::collections::BTreeMap<_, _> = rows.iter().cloned().collect();
            let json = serde_json::json!({ "accuracy": map, "mean_accuracy": mean, "epoch": trainer.epoch });
            writeln!(std::io::stdout().lock(), "{json}")?;
        } else {
            super::print_table(&rows, mean)?;
        }
        Ok(())
    }
}
