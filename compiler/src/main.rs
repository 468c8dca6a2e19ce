//! `modc`: compile modkit checkpoints into `.modpack` packages. See `modc --help`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use modkit_compiler::compile::{CompileOptions, FoldTasks, compile, task_network};
use modkit_compiler::{emit, fold_batch_norm, inspect, verify};
use modkit_models::output::{self, Output};
use modkit_models::{Checkpoint, Package, Precision, package, tasks};

/// Compile a trained checkpoint into a compact package for the modkit runtime.
#[derive(Debug, Parser)]
#[command(name = "modc", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Compile(CompileArgs),
    ExportOnnx(ExportArgs),
    Inspect(InspectArgs),
    Verify(VerifyArgs),
}

/// Checkpoint → .modpack: the shared trunk once, then per task a folded tail or the
/// runtime switch (one shared tail plus the task's modulation vectors: 512 numbers
/// per task at the paper spec, 96 at the tiny one).
///
/// Example: modc compile runs/mod.safetensors -o model.modpack --fold-tasks smiling,young
#[derive(Debug, Args)]
struct CompileArgs {
    /// The trained checkpoint (`modtrain train -o`).
    checkpoint: PathBuf,
    /// The package to write: a new file, or an old package to replace.
    #[arg(long, short)]
    out: PathBuf,
    /// Fold these tasks' vectors into their own tail weights (`all`, or a comma list;
    /// a bare --fold-tasks is `all`); the others use the runtime switch.
    #[arg(long, num_args = 0..=1, default_missing_value = "all")]
    fold_tasks: Option<String>,
    /// Keep only these tasks (comma list).
    #[arg(long, value_delimiter = ',')]
    tasks: Option<Vec<String>>,
    /// f32, or f16 (half the bytes; the runtime converts at load).
    #[arg(long, default_value = "f32")]
    precision: String,
}

/// One task as a single standard ONNX model (image → embedding), any runtime runs it.
/// The graph starts at the normalised input: how to prepare an image (squaring,
/// size, mean and std) is printed and stored in the model's metadata_props
/// (modkit.task, modkit.fit, modkit.input_size, modkit.mean, modkit.std, modkit.input).
///
/// Example: modc export-onnx runs/mod.safetensors --task smiling -o smiling.onnx
#[derive(Debug, Args)]
struct ExportArgs {
    /// The trained checkpoint (`modtrain train -o`).
    checkpoint: PathBuf,
    /// The task whose network to export.
    #[arg(long)]
    task: String,
    /// The ONNX model to write: a new file, or an old ONNX model to replace.
    #[arg(long, short)]
    out: PathBuf,
}

/// Parameters and bytes of a package: shared trunk, tails, per task, whole file.
#[derive(Debug, Args)]
struct InspectArgs {
    package: PathBuf,
    #[arg(long)]
    json: bool,
}

/// Run every graph of a package with tract and compare with the checkpoint
/// evaluated directly (BatchNorm and task modulation unfolded), per task.
#[derive(Debug, Args)]
struct VerifyArgs {
    package: PathBuf,
    #[arg(long)]
    against: PathBuf,
    /// Images to compare on, 1 to 64 (each graph runs on all of them at once).
    #[arg(long, default_value_t = 4)]
    images: usize,
    /// Largest acceptable absolute difference per embedding value [default: 1e-4
    /// for f32 packages, 2e-2 for f16 ones, whose weights are rounded to 11 bits].
    #[arg(long)]
    tolerance: Option<f32>,
}

fn precision(s: &str) -> Result<Precision> {
    match s {
        "f32" => Ok(Precision::F32),
        "f16" => Ok(Precision::F16),
        _ => bail!("unknown --precision {s:?}: use f32 or f16"),
    }
}

impl CompileArgs {
    fn run(self) -> Result<()> {
        let precision = precision(&self.precision)?;
        output::check(
            &self.out,
            Output::Container(&package::KIND),
            &[(&self.checkpoint, "the checkpoint")],
        )?;
        let ckpt = Checkpoint::load(&self.checkpoint)?;
        let fold = match self.fold_tasks.as_deref() {
            None => FoldTasks::None,
            Some(all) if all.trim().eq_ignore_ascii_case("all") => FoldTasks::All,
            Some(list) => FoldTasks::Some(list.split(',').map(|s| s.trim().to_string()).collect()),
        };
        let opts = CompileOptions {
            tasks: self.tasks,
            fold,
            precision,
        };
        let pkg = compile(&ckpt, &opts)
            .with_context(|| format!("compiling {}", self.checkpoint.display()))?;
        let bytes = pkg.to_bytes()?;
        modkit_models::write_atomic(&self.out, &bytes)?;
        // Its length, not the file's: `-o /dev/null` has none.
        let size = bytes.len();
        eprintln!(
            "wrote {} ({} task{}, {size} bytes)",
            self.out.display(),
            pkg.tasks.len(),
            if pkg.tasks.len() == 1 { "" } else { "s" }
        );
        Ok(())
    }
}

impl ExportArgs {
    fn run(self) -> Result<()> {
        output::check(
            &self.out,
            Output::Onnx,
            &[(&self.checkpoint, "the checkpoint")],
        )?;
        let ckpt = Checkpoint::load(&self.checkpoint)?;
        let t = tasks::select(std::slice::from_ref(&self.task), &ckpt.header.tasks)?[0];
        let prefix = match ckpt.header.variant {
            modkit_models::Variant::Independent => {
                modkit_models::names::independent_prefix(&ckpt.header.tasks[t])
            }
            _ => String::new(),
        };
        let base = fold_batch_norm::fold_batch_norm(&ckpt, &prefix)?;
        let (net, head) = task_network(&ckpt, &base, t)?;
        let h = &ckpt.header;
        let metadata = emit::export_metadata(&h.spec, &h.preprocess, &h.tasks[t]);
        let bytes = emit::export_model(&h.spec, &net, head.as_ref(), Precision::F32, &metadata);
        modkit_models::write_atomic(&self.out, &bytes)?;
        let input = metadata
            .iter()
            .find(|(k, _)| *k == "modkit.input")
            .map_or("", |(_, v)| v.as_str());
        eprintln!(
            "wrote {} (task {}, image → embedding; input: {input}, mean {:?}, std {:?}; also in its metadata_props)",
            self.out.display(),
            h.tasks[t],
            h.preprocess.mean,
            h.preprocess.std,
        );
        Ok(())
    }
}

impl InspectArgs {
    fn run(self) -> Result<()> {
        let (pkg, _) = Package::load(&self.package)?;
        let size = std::fs::metadata(&self.package).map(|m| m.len() as usize)?;
        let report = inspect::inspect(&pkg, size);
        let mut out = std::io::stdout().lock();
        if self.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        } else {
            write!(out, "{}", report.render())?;
        }
        Ok(())
    }
}

impl VerifyArgs {
    fn run(self) -> Result<()> {
        let (pkg, _) = Package::load(&self.package)?;
        let ckpt = Checkpoint::load(&self.against)?;
        let tolerance = self.tolerance.unwrap_or(match pkg.precision {
            Precision::F32 => 1e-4,
            Precision::F16 => 2e-2,
        });
        if !tolerance.is_finite() || tolerance < 0.0 {
            bail!("--tolerance {tolerance}: give a finite number ≥ 0 such as 1e-4");
        }
        let checks = verify::verify(&pkg, &ckpt, self.images)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{:<22} {:<7} {:>14}", "task", "route", "max abs error")?;
        for c in &checks {
            writeln!(
                out,
                "{:<22} {:<7} {:>14.3e}",
                c.task, c.route, c.max_abs_error
            )?;
        }
        if let Some(c) = checks.iter().find(|c| c.max_abs_error.is_nan()) {
            bail!(
                "task {:?}: NaN in the package's embedding or the checkpoint's; check the checkpoint with `modtrain eval`, then compile it again",
                c.task
            );
        }
        let worst = checks.iter().map(|c| c.max_abs_error).fold(0.0, f32::max);
        if worst > tolerance {
            bail!(
                "max abs error {worst:.3e} exceeds --tolerance {tolerance:.1e}; if {} was compiled from another checkpoint than {}, name that one with --against",
                self.package.display(),
                self.against.display()
            );
        }
        writeln!(out, "ok: all {} tasks within {tolerance:.1e}", checks.len(),)?;
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match modkit_models::threads::check_rayon_env() {
        Err(e) => Err(e.into()),
        Ok(()) => match cli.command {
            Command::Compile(a) => a.run(),
            Command::ExportOnnx(a) => a.run(),
            Command::Inspect(a) => a.run(),
            Command::Verify(a) => a.run(),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("modc: {}", modkit_models::one_line(err.as_ref()));
            ExitCode::from(2)
        }
    }
}
