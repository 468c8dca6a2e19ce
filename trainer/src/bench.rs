//! `modtrain bench-step`: where a training step's time goes, and how close it comes
//! to the machine's matrix-multiply peak.
//!
//! The step is the trainer's own ([`Trainer::train_epoch`]) on built-in synthetic
//! data, so the numbers are those of `modtrain train` with the same settings. The
//! peak is a square f32 GEMM through candle (the same kernels and threads the
//! convolutions use), timed in the same run, so the fraction of peak is a ratio of
//! two measurements taken side by side.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use modkit_models::{NetSpec, Variant};
use serde::Serialize;

use crate::data::Dataset;
use crate::mining::Mining;
use crate::train::{StepTimes, TrainConfig, Trainer};
use crate::{Error, Result};

/// Floating-point operations of one training step of `images` images: forward,
/// then backward at twice the forward (weight and input gradients) except that
/// conv1 needs no input gradient. Convolutions and fc only; element-wise ops are
/// not counted. With `tail_passes` > 1 (pooled mining) the tail runs that many times
/// per image.
pub fn step_flops(spec: &NetSpec, images: usize, tail_passes: usize) -> f64 {
    let (trunk, tail) = spec.macs();
    let conv1 =
        (spec.in_channels * 9 * spec.widths[0]) as u64 * (spec.stages()[0].size as u64).pow(2);
    let forward = 2.0 * (trunk + tail * tail_passes as u64) as f64 * images as f64;
    let no_input_grad = 2.0 * conv1 as f64 * images as f64;
    3.0 * forward - no_input_grad
}

/// Runs of the GEMM between timed steps (the best is kept), plus one to warm up:
/// ~60 ms on 2 cores, about one tiny step, untimed.
pub const PAIRED_RUNS: usize = 3;

/// Best-of-`runs` throughput of an `n×n · n×n` f32 matmul on `device`, in GFLOP/s.
pub fn gemm_gflops(device: &Device, n: usize, runs: usize) -> Result<f64> {
    let a = Tensor::ones((n, n), DType::F32, device)?.affine(0.5, 0.0)?;
    let b = Tensor::ones((n, n), DType::F32, device)?.affine(0.25, 0.0)?;
    let mut best = f64::INFINITY;
    for _ in 0..runs + 1 {
        let start = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// What [`bench_step`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    /// The network timed (a peer benchmark rebuilds it from this).
    pub net: NetSpec,
    pub spec: String,
    pub input_size: usize,
    pub variant: String,
    pub mining: String,
    pub optimizer: String,
    pub tasks: usize,
    pub batch_per_task: usize,
    pub warmup: usize,
    pub images_per_step: usize,
    pub threads: usize,
    pub device: String,
    /// Every timed step (warm-up steps excluded), in seconds.
    pub steps: Vec<StepTimes>,
    /// Per phase, the median over the timed steps.
    pub median: StepTimes,
    pub flops_per_step: f64,
    /// `flops_per_step / median.total()`, GFLOP/s.
    pub gflops: f64,
    /// The square GEMM's rate on the same device and threads, GFLOP/s.
    pub gemm_peak_gflops: f64,
    /// The same GEMM timed between the timed steps (best of [`PAIRED_RUNS`]):
    /// before the first and after each, `steps.len() + 1` rates in GFLOP/s.
    pub between_steps_gflops: Vec<f64>,
    /// [`paired_fraction`] of the timed steps: the fraction of the peak with a
    /// shared host's slow moments divided out, as far as they last longer than a
    /// step. [`StepBench::peak_fraction`] divides the median step by the best
    /// peak of the whole run instead, so that a slow moment counts against the
    /// step.
    pub paired_peak_fraction: f64,
    /// Side of the square f32 matmul that measured the peak.
    pub gemm_size: usize,
    /// The instruction set of the GEMM kernels that ran ([`gemm_kernels`]).
    pub gemm_kernels: String,
    /// The process's peak resident memory right after the timed steps, in bytes
    /// (Linux's `VmHWM`; `None` elsewhere): in a `bench-step` process, the peak of
    /// a step (activations, gradients, columns) plus the data and the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_resident_bytes: Option<u64>,
    /// Each convolution timed on its own (`bench-step --layers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<LayerBench>>,
}

impl StepBench {
    /// Fraction of the GEMM peak the step reaches.
    pub fn peak_fraction(&self) -> f64 {
        self.gflops / self.gemm_peak_gflops
    }

    /// Images per second of a whole step.
    pub fn images_per_second(&self) -> f64 {
        self.images_per_step as f64 / self.median.total()
    }
}

/// The median over `steps` of each step's rate (`flops` per step) divided by its
/// own peak, the better of the GEMM rates timed just before and just after it
/// (`between`, one more than the steps): a step is never set against a slow
/// moment that the matmuls on both sides of it did not see.
pub fn paired_fraction(flops: f64, steps: &[StepTimes], between: &[f64]) -> f64 {
    let own = between.windows(2).map(|w| w[0].max(w[1]));
    median(
        steps
            .iter()
            .zip(own)
            .map(|(t, p)| flops / t.total() / 1e9 / p)
            .collect(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Times `steps` training steps (after `warmup` untimed ones) of `cfg` on synthetic
/// data generated at the spec's input size. `cfg.triplets_per_task` and `epochs`
/// are set here; everything else (spec, variant, tasks, batch, mining, optimizer,
/// seed) is taken as given.
pub fn bench_step(
    cfg: &TrainConfig,
    steps: usize,
    warmup: usize,
    device: Device,
) -> Result<StepBench> {
    // The trainer's own checks name `modtrain train`'s options; these name
    // bench-step's.
    if steps == 0 {
        return Err(Error::Config(
            "bench-step needs at least one timed step (--steps ≥ 1)".into(),
        ));
    }
    if cfg.tasks.is_empty() {
        return Err(Error::Config(
            "bench-step needs at least one task (--tasks ≥ 1)".into(),
        ));
    }
    if cfg.batch_per_task == 0 {
        return Err(Error::Config(
            "--batch-per-task 0: bench-step needs at least one triplet per task".into(),
        ));
    }
    if cfg.variant == Variant::OnlyMask || cfg.init_from.is_some() {
        return Err(Error::Config(
            "--variant only-mask trains on the fixed weights of another run, which bench-step does not load: time modulated, shared, independent, branch:K or csn".into(),
        ));
    }
    let triplets = warmup
        .checked_add(steps)
        .and_then(|n| n.checked_mul(cfg.batch_per_task))
        .filter(|&n| n <= crate::train::MAX_TRIPLETS)
        .ok_or_else(|| {
            Error::Config(format!(
                "--batch-per-task {} × (--warmup {warmup} + --steps {steps}) triplets is too many: use smaller values",
                cfg.batch_per_task
            ))
        })?;
    let mut cfg = cfg.clone();
    cfg.epochs = 1;
    cfg.triplets_per_task = triplets;
    cfg.test_triplets_per_task = 1;
    let what = format!("--images {}", cfg.synth_images);
    Dataset::check_fits(cfg.synth_images, cfg.spec.input_size, &what, "--images")?;
    let ds = Dataset::synthetic(cfg.synth_images, cfg.spec.input_size, cfg.seed);
    // 1024³ saturates a CPU's cores; a GPU needs a larger product to reach its peak.
    let gemm_size = if device.is_cpu() { 1024 } else { 8192 };
    let mut trainer = Trainer::new(cfg.clone(), &ds, device.clone()).map_err(|e| match e {
        Error::EmptySplit { task, split, .. } => Error::Config(format!(
            "--images {}: too few for task {task:?} to form a triplet in the {split} split (2 images of one class and 1 of another); raise --images",
            cfg.synth_images
        )),
        e => e,
    })?;
    // The peak between the timed steps too, untimed (the next step's clock starts
    // after the callback returns): before the first and after each.
    let mut bounds = Vec::with_capacity(steps + 1);
    if warmup == 0 {
        bounds.push(gemm_gflops(&device, gemm_size, PAIRED_RUNS)?);
    }
    let mut peak_err = None;
    trainer
        .train_epoch(&ds, &mut |done, _, _| {
            if done >= warmup && peak_err.is_none() {
                match gemm_gflops(&device, gemm_size, PAIRED_RUNS) {
                    Ok(p) => bounds.push(p),
                    Err(e) => peak_err = Some(e),
                }
            }
        })
        .map_err(|e| match e {
            Error::NonFinite { step, loss, .. } => Error::Config(format!(
                "loss became {loss} at step {step} of bench-step; try another --optimizer, --mining or --seed"
            )),
            e => e,
        })?;
    if let Some(e) = peak_err {
        return Err(e);
    }
    let peak_resident_bytes = peak_resident_bytes();
    let timed: Vec<StepTimes> = trainer.step_times()[warmup..].to_vec();
    let pick = |f: fn(&StepTimes) -> f64| median(timed.iter().map(f).collect());
    let med = StepTimes {
        data: pick(|t| t.data),
        forward: pick(|t| t.forward),
        backward: pick(|t| t.backward),
        update: pick(|t| t.update),
    };
    let tasks = cfg.tasks.len();
    let images = 3 * cfg.batch_per_task * tasks;
    let tail_passes = if cfg.mining == Mining::Pooled {
        tasks
    } else {
        1
    };
    let flops = step_flops(&cfg.spec, images, tail_passes);
    let paired_peak_fraction = paired_fraction(flops, &timed, &bounds);
    // The best of 30 (a third of a second on 2 cores): with 5, a busy moment of
    // this shared machine once halved the "peak" and put a step at 140% of it.
    // The best of the paired runs counts too: the peak is the best the run saw.
    let peak = bounds
        .iter()
        .fold(gemm_gflops(&device, gemm_size, 30)?, |a, &p| a.max(p));
    Ok(StepBench {
        net: cfg.spec.clone(),
        spec: cfg.spec.name.clone(),
        input_size: cfg.spec.input_size,
        variant: cfg.variant.to_string(),
        mining: cfg.mining.to_string(),
        optimizer: cfg.optimizer.to_string(),
        tasks,
        batch_per_task: cfg.batch_per_task,
        warmup,
        images_per_step: images,
        threads: rayon::current_num_threads(),
        device: match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        },
        steps: timed,
        median: med,
        flops_per_step: flops,
        gflops: flops / med.total() / 1e9,
        gemm_peak_gflops: peak,
        between_steps_gflops: bounds,
        paired_peak_fraction,
        gemm_size,
        gemm_kernels: gemm_kernels(&device).into(),
        peak_resident_bytes,
        layers: None,
    })
}

/// This process's peak resident memory so far, in bytes: `VmHWM` in
/// `/proc/self/status`, `None` where there is none (not Linux).
pub fn peak_resident_bytes() -> Option<u64> {
    vm_hwm(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The `VmHWM:   123456 kB` line of a `/proc/<pid>/status` text, in bytes.
fn vm_hwm(status: &str) -> Option<u64> {
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?;
    kb.trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

/// The instruction set of the f32 GEMM kernels on `device`: on a CPU, the one the
/// `gemm` crate picks at run time (the same test of the CPU's features, in the
/// same order, as its dispatch), so that numbers taken on different CPUs say
/// which kernels they timed.
pub fn gemm_kernels(device: &Device) -> &'static str {
    if !device.is_cpu() {
        #[cfg(feature = "cuda")]
        if crate::ops::cudnn::in_use() {
            return "cuBLAS + cuDNN";
        }
        return "cuBLAS";
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "AVX-512"
        } else if std::arch::is_x86_feature_detected!("fma") {
            "AVX2+FMA"
        } else {
            "scalar"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            "NEON"
        } else {
            "scalar"
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// One 3×3 convolution of a network: `[B, cin, size, size] → [B, cout, ·, ·]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConvLayer {
    /// `conv1`, or `blockN.conv`, `blockN.res1`, `blockN.res2`.
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Input side.
    pub size: usize,
    pub pad: usize,
}

impl ConvLayer {
    /// Output side (0 for an input too small for a 3×3 kernel).
    pub fn out_size(&self) -> usize {
        (self.size + 2 * self.pad).saturating_sub(2)
    }

    /// Forward FLOPs for `images` images.
    pub fn flops(&self, images: usize) -> f64 {
        2.0 * (self.in_channels * 9 * self.out_channels * self.out_size().pow(2) * images) as f64
    }
}

/// The 3×3 convolutions of `spec` in network order: conv1, then per block its
/// convolution (no padding, before the pool) and the two residual ones (padding 1).
pub fn conv_layers(spec: &NetSpec) -> Vec<ConvLayer> {
    let stages = spec.stages();
    let layer = |name: String, cin, cout, size, pad| ConvLayer {
        name,
        in_channels: cin,
        out_channels: cout,
        size,
        pad,
    };
    let mut out = vec![layer(
        "conv1".into(),
        spec.in_channels,
        stages[0].channels,
        spec.input_size,
        0,
    )];
    for pair in stages[..5].windows(2) {
        let (prev, s) = (&pair[0], &pair[1]);
        out.push(layer(
            format!("{}.conv", s.name),
            prev.channels,
            s.channels,
            prev.size,
            0,
        ));
        for res in ["res1", "res2"] {
            out.push(layer(
                format!("{}.{res}", s.name),
                s.channels,
                s.channels,
                s.size,
                1,
            ));
        }
    }
    out
}

/// One convolution timed on its own by [`bench_conv_layers`].
#[derive(Debug, Clone, Serialize)]
pub struct LayerBench {
    pub layer: ConvLayer,
    /// Best forward time, seconds.
    pub forward: f64,
    /// Best backward time (∂W, and ∂x for every layer but conv1), seconds.
    pub backward: f64,
    pub forward_flops: f64,
    pub backward_flops: f64,
}

/// Times every convolution of `spec` on `images` images with the CPU kernels the
/// trainer runs (forward, and the backward candle's backprop calls): the best of
/// `runs` each, on fixed pseudo-random inputs.
pub fn bench_conv_layers(spec: &NetSpec, images: usize, runs: usize) -> Result<Vec<LayerBench>> {
    let dev = Device::Cpu;
    let filled = |n: usize, salt: f32| -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.618_034 + salt).fract() - 0.5)
            .collect()
    };
    let best = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..runs.max(1) {
            let start = Instant::now();
            f()?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    conv_layers(spec)
        .into_iter()
        .enumerate()
        .map(|(i, layer)| {
            let (c, o, s, so) = (
                layer.in_channels,
                layer.out_channels,
                layer.size,
                layer.out_size(),
            );
            let x = Tensor::from_vec(filled(images * c * s * s, 0.1), (images, c, s, s), &dev)?;
            let w =
                Tensor::from_vec(filled(o * c * 9, 0.2), (o, c, 3, 3), &dev)?.affine(0.1, 0.0)?;
            let g = Tensor::from_vec(filled(o * images * so * so, 0.3), (o, images, so, so), &dev)?;
            // As in training: the network's input (conv1's) needs no gradient.
            let with_dx = i > 0;
            let forward = best(&mut || {
                crate::ops::conv3x3_channel_major(&x, &w, layer.pad)?;
                Ok(())
            })?;
            let backward = best(&mut || {
                crate::ops::conv3x3_grads(&x, &w, &g, layer.pad, with_dx)?;
                Ok(())
            })?;
            let flops = layer.flops(images);
            Ok(LayerBench {
                layer,
                forward,
                backward,
                forward_flops: flops,
                backward_flops: if with_dx { 2.0 * flops } else { flops },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_resident_memory_is_read_from_vm_hwm() {
        let status = "Name:\tmodtrain\nVmPeak:\t 9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(vm_hwm(status), Some(2048 * 1024));
        assert_eq!(vm_hwm("VmRSS:\t 1024 kB\n"), None);
        assert_eq!(vm_hwm("VmHWM:\t lots kB\n"), None);
    }

    #[test]
    fn step_flops_of_the_paper_network_by_hand() {
        // Table 2 at 150×150, multiply-accumulates per image, as (C·9)·O·Ho·Wo:
        // conv1 3→32 at 148²; each block's conv at (previous side − 2), its two
        // residual convs (padding 1) at the pooled side; fc 128·7·7 = 6272 → 256.
        let convs: [u64; 5] = [
            27 * 32 * 148 * 148,
            288 * 64 * 146 * 146 + 2 * 576 * 64 * 73 * 73,
            576 * 128 * 71 * 71 + 2 * 1152 * 128 * 35 * 35,
            1152 * 128 * 33 * 33 + 2 * 1152 * 128 * 16 * 16,
            1152 * 128 * 14 * 14 + 2 * 1152 * 128 * 7 * 7,
        ];
        let macs = convs.iter().sum::<u64>() + 6272 * 256;
        let want = 3.0 * 2.0 * macs as f64 - 2.0 * convs[0] as f64;
        let got = step_flops(&NetSpec::paper(), 1, 1);
        assert_eq!(got, want);
        // 96 images: linear in the batch.
        assert_eq!(step_flops(&NetSpec::paper(), 96, 1), 96.0 * want);
        // Pooled mining runs the tail (block5 and fc at N = 4) once per task.
        let tail = (convs[4] + 6272 * 256) as f64;
        assert_eq!(
            step_flops(&NetSpec::paper(), 1, 3),
            want + 2.0 * 3.0 * 2.0 * tail
        );
    }

    #[test]
    fn bench_step_times_the_trainers_step() {
        let mut spec = NetSpec::tiny();
        spec.widths = [4, 4, 8, 8, 8];
        spec.embedding = 8;
        let cfg = TrainConfig {
            spec,
            tasks: vec!["smiling".into(), "bald".into()],
            batch_per_task: 2,
            synth_images: 120,
            ..TrainConfig::default()
        };
        let b = bench_step(&cfg, 3, 1, Device::Cpu).expect("bench");
        assert_eq!(b.steps.len(), 3);
        assert_eq!(b.images_per_step, 12);
        for t in &b.steps {
            assert!(
                t.forward > 0.0 && t.backward > 0.0 && t.update > 0.0,
                "{t:?}"
            );
        }
        assert!(b.median.total() > 0.0 && b.gflops > 0.0 && b.gemm_peak_gflops > 0.0);
        assert_eq!(b.flops_per_step, step_flops(&cfg.spec, 12, 1));
        // A matmul before the first step and after each, none above the run's
        // peak, and the paired fraction computed from them; with no warm-up the
        // first step has a matmul before it too.
        assert_eq!(b.between_steps_gflops.len(), 4);
        assert!(
            b.between_steps_gflops
                .iter()
                .all(|&p| p > 0.0 && p <= b.gemm_peak_gflops)
        );
        let paired = paired_fraction(b.flops_per_step, &b.steps, &b.between_steps_gflops);
        assert_eq!(b.paired_peak_fraction, paired);
        // At least the dataset's images (120 at 48×48×3 bytes) were resident.
        #[cfg(target_os = "linux")]
        assert!(b.peak_resident_bytes.is_some_and(|r| r > 120 * 48 * 48 * 3));
        let cold = bench_step(&cfg, 2, 0, Device::Cpu).expect("no warm-up");
        assert_eq!(cold.between_steps_gflops.len(), 3);
        let err = bench_step(&cfg, 0, 1, Device::Cpu).expect_err("no steps");
        assert!(err.to_string().contains("--steps"), "{err}");
    }

    #[test]
    fn bench_step_errors_name_its_own_flags() {
        let cfg = TrainConfig {
            spec: NetSpec::tiny(),
            tasks: vec!["smiling".into()],
            batch_per_task: 2,
            synth_images: 120,
            ..TrainConfig::default()
        };
        let err = |cfg: &TrainConfig| {
            bench_step(cfg, 1, 0, Device::Cpu)
                .expect_err("rejected")
                .to_string()
        };
        let none = err(&TrainConfig {
            batch_per_task: 0,
            ..cfg.clone()
        });
        assert!(
            none.contains("--batch-per-task 0") && !none.contains("--triplets-per-task"),
            "{none}"
        );
        let mask = err(&TrainConfig {
            variant: Variant::OnlyMask,
            ..cfg.clone()
        });
        assert!(
            mask.contains("--variant only-mask") && !mask.contains("--init-from"),
            "{mask}"
        );
        let huge = TrainConfig {
            batch_per_task: usize::MAX,
            ..cfg.clone()
        };
        let huge = bench_step(&huge, 2, 0, Device::Cpu)
            .expect_err("overflows")
            .to_string();
        assert!(huge.contains("--batch-per-task"), "{huge}");
        // 5 images leave one in the test split: no triplet.
        let few = err(&TrainConfig {
            synth_images: 5,
            ..cfg.clone()
        });
        assert!(
            few.contains("--images 5") && few.contains("raise --images"),
            "{few}"
        );
    }

    #[test]
    fn each_step_is_paired_with_the_better_matmul_around_it() {
        // 100 GFLOP steps of 1, 2 and 1 s: 100, 50 and 100 GFLOP/s.
        let step = |s: f64| StepTimes {
            forward: s / 2.0,
            backward: s / 2.0,
            ..StepTimes::default()
        };
        let steps = [step(1.0), step(2.0), step(1.0)];
        // Own peaks 200, 200, 400: 0.5, 0.25, 0.25. Pairing with the matmul
        // before each step only would give 1.0, 0.25, 2.0 (median 1.0), with the
        // one after only 0.5, 1.0, 0.25 (0.5).
        let f = paired_fraction(100e9, &steps, &[100.0, 200.0, 50.0, 400.0]);
        assert!((f - 0.25).abs() < 1e-12, "{f}");
        // An even count takes the middle two's mean.
        let f = paired_fraction(100e9, &steps[..2], &[100.0, 100.0, 100.0]);
        assert!((f - 0.75).abs() < 1e-12, "{f}");
    }

    #[test]
    fn the_layers_are_the_networks_convolutions() {
        let tiny = conv_layers(&NetSpec::tiny());
        let shapes: Vec<_> = tiny
            .iter()
            .map(|l| {
                (
                    l.name.as_str(),
                    l.in_channels,
                    l.out_channels,
                    l.size,
                    l.pad,
                )
            })
            .collect();
        assert_eq!(
            shapes[..5],
            [
                ("conv1", 3, 8, 48, 0),
                ("block2.conv", 8, 16, 46, 0),
                ("block2.res1", 16, 16, 22, 1),
                ("block2.res2", 16, 16, 22, 1),
                ("block3.conv", 16, 32, 22, 0),
            ]
        );
        assert_eq!(shapes[12], ("block5.res2", 32, 32, 1, 1));
        // Their FLOPs are the step's forward less fc, for both presets.
        for spec in [NetSpec::tiny(), NetSpec::paper()] {
            let (trunk, tail) = spec.macs();
            let fc = (spec.fc_inputs() * spec.embedding) as f64;
            let convs: f64 = conv_layers(&spec).iter().map(|l| l.flops(3)).sum();
            assert_eq!(
                convs,
                2.0 * 3.0 * ((trunk + tail) as f64 - fc),
                "{}",
                spec.name
            );
        }
    }

    #[test]
    fn bench_conv_layers_times_every_layer() {
        let mut spec = NetSpec::tiny();
        spec.widths = [4, 4, 8, 8, 8];
        let layers = bench_conv_layers(&spec, 2, 1).expect("layers");
        assert_eq!(layers.len(), 13);
        for (i, l) in layers.iter().enumerate() {
            assert!(l.forward > 0.0 && l.backward > 0.0, "{l:?}");
            assert_eq!(l.forward_flops, l.layer.flops(2));
            // conv1 computes no input gradient.
            let passes = if i == 0 { 1.0 } else { 2.0 };
            assert_eq!(
                l.backward_flops,
                passes * l.forward_flops,
                "{}",
                l.layer.name
            );
        }
    }
}
