use std::io::Write;

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use modkit_models::{NetSpec, Variant, tasks::CELEBA_20};
use modkit_trainer::bench::{LayerBench, StepBench, bench_conv_layers, bench_step, gemm_gflops};
use modkit_trainer::optim::OptimizerKind;
use modkit_trainer::train::TrainConfig;

/// Time training steps: forward, backward, update and data, against the GEMM peak.
///
/// Runs the trainer's own step on built-in synthetic faces and a square f32 matmul
/// through the same kernels in the same run, and prints the median time of each
/// phase, images per second, and the step's FLOP rate as a fraction of that peak:
/// once against the best peak of the run, and once paired, each step against the
/// better of the matmuls timed just before and after it, which divides out a
/// shared machine's slow moments.
/// Threads follow RAYON_NUM_THREADS (default: all cores).
///
/// The defaults are the batch of the PyTorch comparison (`scripts/compare_torch.sh`):
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
    /// Also time each 3×3 convolution on its own (forward, and backward: ∂W and
    /// ∂x), best of 5 on the step's images, and set their sum against the step's
    /// forward and backward: how much of each phase the convolutions take at most
    /// (inside the step they share caches and memory with the rest). The
    /// GEMM peak is then the best of two measurements, before and after. CPU only.
    #[arg(long)]
    layers: bool,
    /// Print the measurements as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Runs of each convolution in `--layers` (the best is reported).
const LAYER_RUNS: usize = 5;

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
        let device = super::device(&self.device)?;
        if self.layers && !device.is_cpu() {
            anyhow::bail!(
                "--layers times the CPU kernels, not {}: drop --layers or use --device cpu",
                self.device
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
        let mut b = bench_step(&cfg, self.steps, self.warmup, device)?;
        if self.layers {
            eprintln!("timing each convolution, best of {LAYER_RUNS}…");
            b.layers = Some(bench_conv_layers(&cfg.spec, b.images_per_step, LAYER_RUNS)?);
            // The peak again, after the layers: this machine's speed drifts, and a
            // peak taken in a slow moment would put fast layers above 100%.
            let again = gemm_gflops(&Device::Cpu, b.gemm_size, 30)?;
            b.gemm_peak_gflops = b.gemm_peak_gflops.max(again);
        }
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
            "{:.2} GFLOP per step at {:.1} GFLOP/s = {:.0}% of the GEMM peak ({:.1} GFLOP/s, {}³ f32 matmul, same threads, {} kernels)",
            b.flops_per_step / 1e9,
            b.gflops,
            100.0 * b.peak_fraction(),
            b.gemm_peak_gflops,
            b.gemm_size,
            b.gemm_kernels
        )?;
        let between = &b.between_steps_gflops;
        writeln!(
            out,
            "{:.0}% of the peak paired per step (median of each step against the better of the same matmuls timed just before and after it, {:.1}–{:.1} GFLOP/s)",
            100.0 * b.paired_peak_fraction,
            between.iter().copied().fold(f64::INFINITY, f64::min),
            between.iter().copied().fold(0.0, f64::max),
        )?;
        if let Some(bytes) = b.peak_resident_bytes {
            writeln!(
                out,
                "peak resident memory {:.0} MB (the process's high-water mark after the steps: a step's tensors, the data and the model)",
                bytes as f64 / 1e6
            )?;
        }
        if let Some(layers) = &b.layers {
            print_layers(&mut out, &b, layers)?;
        }
        Ok(())
    }
}

/// The `--layers` table: per convolution, time and share of the GEMM peak; then
/// their sums against the step's phases.
fn print_layers(out: &mut impl Write, b: &StepBench, layers: &[LayerBench]) -> Result<()> {
    let pct = |flops: f64, secs: f64| 100.0 * flops / secs / 1e9 / b.gemm_peak_gflops;
    writeln!(
        out,
        "\nconvolutions on their own ({} images, best of {LAYER_RUNS}; % of the GEMM peak):",
        b.images_per_step
    )?;
    writeln!(
        out,
        "{:<12} {:>16} {:>11} {:>5} {:>12} {:>5}",
        "layer", "shape", "forward ms", "%", "backward ms", "%"
    )?;
    for l in layers {
        let shape = format!(
            "{}→{} @{}{}",
            l.layer.in_channels,
            l.layer.out_channels,
            l.layer.size,
            if l.layer.pad > 0 { " p1" } else { "" }
        );
        writeln!(
            out,
            "{:<12} {:>16} {:>11.2} {:>4.0}% {:>12.2} {:>4.0}%",
            l.layer.name,
            shape,
            l.forward * 1e3,
            pct(l.forward_flops, l.forward),
            l.backward * 1e3,
            pct(l.backward_flops, l.backward)
        )?;
    }
    let sum = |f: fn(&LayerBench) -> f64| layers.iter().map(f).sum::<f64>();
    let (fwd, bwd) = (sum(|l| l.forward), sum(|l| l.backward));
    let (ff, bf) = (sum(|l| l.forward_flops), sum(|l| l.backward_flops));
    writeln!(
        out,
        "{:<12} {:>16} {:>11.2} {:>4.0}% {:>12.2} {:>4.0}%",
        "all",
        "",
        fwd * 1e3,
        pct(ff, fwd),
        bwd * 1e3,
        pct(bf, bwd)
    )?;
    let m = &b.median;
    writeln!(
        out,
        "the convolutions alone are {:.0}% of the step's forward and {:.0}% of its backward; \
         the rest, {:.1} ms and {:.1} ms, is BatchNorm, pooling, ReLU, fc, loss, autograd, \
         and the convolutions running slower inside the step than alone",
        100.0 * fwd / m.forward,
        100.0 * bwd / m.backward,
        (m.forward - fwd) * 1e3,
        (m.backward - bwd) * 1e3
    )?;
    Ok(())
}
