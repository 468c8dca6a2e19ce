use std::io::Write;

use anyhow::Result;
use clap::Args;
use modkit_models::{NetSpec, Variant, tasks::CELEBA_20};
use modkit_trainer::bench::bench_step;
use modkit_trainer::optim::OptimizerKind;
use modkit_trainer::train::TrainConfig;

/// Time training steps: forward, backward, update and data, against the GEMM peak.
///
/// Runs the trainer's own step on built-in synthetic faces and a square f32 matmul
/// through the same kernels in the same run, and prints the median time of each
/// phase, images per second, and the step's FLOP rate as a fraction of that peak.
/// Threads follow RAYON_NUM_THREADS (default: all cores).
///
/// The defaults are the batch of the PyTorch comparison (`scripts/torch_step.sh`):
/// 4 tasks × 8 triplets = 96 images, sampled triplets, Adagrad.
///
/// Example: modtrain bench-step --spec paper --size 64
#[derive(Debug, Args)]
pub struct BenchStepArgs {
    /// Network preset: tiny or paper.
    #[arg(long, default_value = "paper")]
    spec: String,
    /// Input side in pixels; default: the preset's (48 tiny, 150 paper).
    #[arg(long)]
    size: Option<usize>,
    /// modulated, shared, independent, branch:K or csn.
    #[arg(long, default_value = "modulated")]
    variant: String,
    /// Number of tasks (the first of the paper's 20).
    #[arg(long, default_value_t = 4)]
    tasks: usize,
    /// Triplets per task in the minibatch.
    #[arg(long, default_value_t = 8)]
    batch_per_task: usize,
    /// sampled, batch-all or pooled.
    #[arg(long, default_value = "sampled")]
    mining: String,
    /// adagrad or adam.
    #[arg(long, default_value = "adagrad")]
    optimizer: String,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first (allocator and caches warm up).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Synthetic images to draw the minibatches from.
    #[arg(long, default_value_t = 400)]
    images: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, or cuda[:N] when built with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the measurements as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl BenchStepArgs {
    pub fn run(self) -> Result<()> {
        let mut spec = NetSpec::preset(&self.spec)?;
        if let Some(size) = self.size {
            spec.input_size = size;
            spec.name = format!("{}@{size}", spec.name);
        }
        spec.validate()?;
        if self.tasks == 0 || self.tasks > CELEBA_20.len() {
            anyhow::bail!(
                "--tasks {}: choose 1..={} (the paper's tasks, in order)",
                self.tasks,
                CELEBA_20.len()
            );
        }
        let variant: Variant = self.variant.parse()?;
        let optimizer: OptimizerKind = self.optimizer.parse()?;
        let cfg = TrainConfig {
            spec,
            variant,
            tasks: CELEBA_20[..self.tasks]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            synth_images: self.images,
            batch_per_task: self.batch_per_task,
            lr: optimizer.default_lr(),
            mining: self.mining.parse()?,
            optimizer,
            seed: self.seed,
            ..TrainConfig::default()
        };
        eprintln!(
            "timing {} + {} steps of {} ({}×{}), {}, {} tasks × {} triplets…",
            self.warmup,
            self.steps,
            cfg.spec.name,
            cfg.spec.input_size,
            cfg.spec.input_size,
            cfg.variant,
            self.tasks,
            self.batch_per_task
        );
        let b = bench_step(&cfg, self.steps, self.warmup, super::device(&self.device)?)?;
        let mut out = std::io::stdout().lock();
        if self.json {
            writeln!(out, "{}", serde_json::to_string(&b)?)?;
            return Ok(());
        }
        let m = &b.median;
        let total = m.total();
        writeln!(
            out,
            "{} {}×{}, {}, {} mining, {}, {} images per step, {} threads, {}",
            b.spec,
            b.input_size,
            b.input_size,
            b.variant,
            b.mining,
            b.optimizer,
            b.images_per_step,
            b.threads,
            b.device
        )?;
        writeln!(out, "{:<10} {:>11} {:>7}", "phase", "median ms", "share")?;
        for (name, t) in [
            ("data", m.data),
            ("forward", m.forward),
            ("backward", m.backward),
            ("update", m.update),
            ("step", total),
        ] {
            writeln!(
                out,
                "{name:<10} {:>11.1} {:>6.1}%",
                t * 1e3,
                100.0 * t / total
            )?;
        }
        writeln!(
            out,
            "{:.0} images/s; step = {:.2} × forward",
            b.images_per_second(),
            total / m.forward
        )?;
        writeln!(
            out,
            "{:.2} GFLOP per step at {:.1} GFLOP/s = {:.0}% of the GEMM peak ({:.1} GFLOP/s, {}³ f32 matmul, same threads)",
            b.flops_per_step / 1e9,
            b.gflops,
            100.0 * b.peak_fraction(),
            b.gemm_peak_gflops,
            b.gemm_size
        )?;
        Ok(())
    }
}
