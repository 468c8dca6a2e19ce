//! Command-line interface: one args struct per subcommand, each with `run`.

mod bench;
mod eval;
mod report;
mod synth;
mod train;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Device;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use modkit_trainer::data::{DataSource, Dataset, Split, celeba, folder, zappos};

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

/// How long loading may take before it shows a progress bar.
const QUIET_LOAD: Duration = Duration::from_secs(2);

/// Loads `--data` at the network's input size.
fn load_data(
    data: &str,
    size: usize,
    synth_images: usize,
    seed: u64,
    limit: Option<usize>,
) -> Result<Dataset> {
    if limit == Some(0) {
        bail!("--limit 0 keeps no images: give a positive count, or leave --limit out to load all");
    }
    let source: DataSource = data.parse()?;
    let start = Instant::now();
    let ds = match &source {
        DataSource::Synth => {
            Dataset::check_fits(
                synth_images,
                size,
                &format!("--synth-images {synth_images}"),
                "--synth-images",
            )?;
            eprintln!("generating {synth_images} synthetic faces at {size}×{size} (seed {seed})…");
            Dataset::synthetic(synth_images, size, seed)
        }
        DataSource::Celeba(dir) | DataSource::Zappos(dir) | DataSource::Folder(dir) => {
            eprintln!("loading {} at {size}×{size}…", dir.display());
            let load = match &source {
                DataSource::Zappos(_) => zappos::load_with_progress,
                DataSource::Folder(_) => folder::load_with_progress,
                _ => celeba::load_with_progress,
            };
            // Hidden until loading has taken a while, so that small sets print nothing.
            let pb = styled(ProgressBar::hidden(), "decoding".into());
            let shown = AtomicBool::new(false);
            let progress = |done: usize, total: usize| {
                if !shown.load(Ordering::Relaxed)
                    && start.elapsed() >= QUIET_LOAD
                    && !shown.swap(true, Ordering::Relaxed)
                {
                    pb.set_length(total as u64);
                    pb.set_draw_target(ProgressDrawTarget::stderr());
                }
                pb.set_position(done as u64);
            };
            let ds = load(dir, size, limit, &progress)
                .with_context(|| format!("loading --data {data}"))?;
            pb.finish_and_clear();
            ds
        }
    };
    if ds.is_empty() {
        let hint = match &source {
            DataSource::Synth => format!("raise --synth-images (now {synth_images})"),
            DataSource::Celeba(dir) => format!(
                "check that {} lists images after its two header lines",
                dir.join(celeba::ATTR_FILE).display()
            ),
            DataSource::Zappos(dir) => format!(
                "check that {} lists shoes whose images are under {}",
                dir.join(zappos::META).display(),
                dir.join(zappos::IMAGE_DIRS[0]).display()
            ),
            DataSource::Folder(dir) => format!(
                "check that {} has a row per image after its header",
                dir.join(folder::LABELS).display()
            ),
        };
        bail!("--data {data} holds no images; {hint}");
    }
    let count = |split| ds.splits.iter().filter(|&&s| s == split).count();
    eprintln!(
        "{} images ({} train, {} val, {} test) in {:.1} s",
        ds.len(),
        count(Split::Train),
        count(Split::Val),
        count(Split::Test),
        start.elapsed().as_secs_f64()
    );
    if let DataSource::Zappos(dir) = &source {
        let lists = dir.join(zappos::CSN_LISTS);
        if ds.csn_splits == Some(true) {
            eprintln!("splits from CSN's triplet lists in {}", lists.display());
        } else {
            eprintln!(
                "splits drawn by a hash of each shoe's CID ({} has no CSN triplet lists)",
                lists.display()
            );
        }
    }
    for note in &ds.notes {
        eprintln!("modtrain: warning: {note}");
    }
    Ok(ds)
}

/// `cpu` or `cuda[:N]`.
fn device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let index = match name {
        "cuda" => "0",
        _ => name
            .strip_prefix("cuda:")
            .with_context(|| format!("unknown --device {name:?}: use cpu or cuda[:N]"))?,
    };
    let ordinal: usize = index
        .parse()
        .map_err(|_| anyhow!("--device {name:?}: the GPU index must be a number, e.g. cuda:0"))?;
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "--device {name}: this modtrain was built without CUDA; rebuild with `cargo build --release --features cuda`"
        );
    }
    // A clear error, not cudarc's panic, where the driver is missing.
    #[cfg(feature = "cuda")]
    let dev = modkit_trainer::ops::cudnn::cuda_device(ordinal)?;
    #[cfg(not(feature = "cuda"))]
    let dev = Device::new_cuda(ordinal)?;
    Ok(dev)
}

fn bar(len: u64, prefix: String) -> ProgressBar {
    styled(ProgressBar::new(len), prefix)
}

/// `pb` in modtrain's style, named `prefix`.
fn styled(pb: ProgressBar, prefix: String) -> ProgressBar {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message<T>(result: Result<T>) -> String {
        match result {
            Ok(_) => String::from("no error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn device_errors_name_the_value() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu)));
        assert_eq!(
            message(device("cuda:x")),
            "--device \"cuda:x\": the GPU index must be a number, e.g. cuda:0"
        );
        assert_eq!(
            message(device("cuda7")),
            "unknown --device \"cuda7\": use cpu or cuda[:N]"
        );
    }

    #[test]
    fn limit_0_is_rejected_before_loading() {
        let err = message(load_data("folder:/no/such/dir", 48, 10, 0, Some(0)));
        assert!(err.starts_with("--limit 0 keeps no images"), "{err}");
    }

    #[test]
    fn empty_data_is_named_as_written_with_a_hint_for_its_source() {
        let err = message(load_data("synth", 48, 0, 0, None));
        assert_eq!(
            err,
            "--data synth holds no images; raise --synth-images (now 0)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(folder::LABELS), "file,smiling\n").expect("labels");
        let data = format!("folder:{}", dir.path().display());
        let err = message(load_data(&data, 48, 10, 0, None));
        assert!(
            err.starts_with(&format!("--data {data} holds no images"))
                && err.contains("labels.csv has a row per image"),
            "{err}"
        );
    }
}
