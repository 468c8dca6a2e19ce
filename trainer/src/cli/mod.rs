//! Command-line interface: one args struct per subcommand, each with `run`.

mod bench;
mod eval;
mod report;
mod synth;
mod train;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use modkit_trainer::data::{DataSource, Dataset, celeba, folder, zappos};

/// Train modulated multi-task retrieval networks (Zhao et al., ECCV 2018) and the
/// baselines the paper compares against.
#[derive(Debug, Parser)]
#[command(name = "modtrain", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Synth(synth::SynthArgs),
    Train(Box<train::TrainArgs>),
    Eval(eval::EvalArgs),
    BenchStep(bench::BenchStepArgs),
    Report(report::ReportArgs),
}

impl Cli {
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Synth(a) => a.run(),
            Command::Train(a) => (*a).run(),
            Command::Eval(a) => a.run(),
            Command::BenchStep(a) => a.run(),
            Command::Report(a) => a.run(),
        }
    }
}

/// Loads `--data` at the network's input size.
fn load_data(
    source: &str,
    size: usize,
    synth_images: usize,
    seed: u64,
    limit: Option<usize>,
) -> Result<Dataset> {
    let source: DataSource = source.parse()?;
    let start = std::time::Instant::now();
    let ds = match &source {
        DataSource::Synth => {
            eprintln!("generating {synth_images} synthetic faces at {size}×{size} (seed {seed})…");
            Dataset::synthetic(synth_images, size, seed)
        }
        DataSource::Celeba(dir) | DataSource::Zappos(dir) | DataSource::Folder(dir) => {
            eprintln!("loading {} at {size}×{size}…", dir.display());
            let load = match &source {
                DataSource::Zappos(_) => zappos::load,
                DataSource::Folder(_) => folder::load,
                _ => celeba::load,
            };
            load(dir, size, limit).with_context(|| format!("loading --data {}", dir.display()))?
        }
    };
    if ds.is_empty() {
        bail!("--data {source:?} holds no images; check the directory or --synth-images");
    }
    eprintln!(
        "{} images in {:.1} s",
        ds.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(ds)
}

/// `cpu` or `cuda[:N]`.
fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda.starts_with("cuda") => {
            let ordinal = cuda
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .context("--device cuda:N")?;
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {name}: this modtrain was built without CUDA; rebuild with `cargo build --release --features cuda`"
                );
            }
            // A clear error, not cudarc's panic, where the driver is missing.
            #[cfg(feature = "cuda")]
            let dev = modkit_trainer::ops::cudnn::cuda_device(ordinal.unwrap_or(0))?;
            #[cfg(not(feature = "cuda"))]
            let dev = Device::new_cuda(ordinal.unwrap_or(0))?;
            Ok(dev)
        }
        other => bail!("unknown --device {other:?}: use cpu or cuda[:N]"),
    }
}

fn bar(len: u64, prefix: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

/// Prints a per-task accuracy table to stdout.
fn print_table(rows: &[(String, f64)], mean: f64) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<22} {:>9}", "task", "accuracy")?;
    for (task, acc) in rows {
        writeln!(out, "{task:<22} {:>8.2}%", acc * 100.0)?;
    }
    writeln!(out, "{:<22} {:>8.2}%", "mean", mean * 100.0)
}
