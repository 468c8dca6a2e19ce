//! The trainer's end of the pipeline: synthetic data in CelebA's layout → trainer →
//! checkpoint that the format crate reads and validates, with the parameter counts
//! the models crate promises (`runtime.rs` carries it on through modc and modrt).

use candle_core::Device;
use modkit_models::{Checkpoint, NetSpec, ParamCount, Variant, names};
use modkit_trainer::data::celeba;
use modkit_trainer::train::{TrainConfig, Trainer};

fn small_spec() -> NetSpec {
    let mut s = NetSpec::tiny();
    s.widths = [4, 8, 8, 8, 8];
    s.embedding = 8;
    s
}

#[test]
fn every_variant_trains_and_writes_a_valid_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    celeba::write_synthetic(&dir.path().join("data"), 150, 48, 3, &|_| {}).expect("synth");
    let ds = celeba::load(&dir.path().join("data"), 48, None).expect("load");
    let tasks: Vec<String> = ["smiling", "young", "mouth_slightly_open"]
        .map(String::from)
        .to_vec();
    for variant in [
        Variant::Modulated,
        Variant::Shared,
        Variant::Independent,
        Variant::Branch { k: 4 },
        Variant::Csn,
    ] {
        let cfg = TrainConfig {
            spec: small_spec(),
            variant,
            tasks: tasks.clone(),
            epochs: 1,
            triplets_per_task: 8,
            batch_per_task: 4,
            test_triplets_per_task: 10,
            ..TrainConfig::default()
        };
        let out = dir.path().join(format!(
            "{}.safetensors",
            variant.to_string().replace(':', "_")
        ));
        let report = Trainer::new(cfg, &ds, Device::Cpu)
            .expect("trainer")
            .run(&ds, &out)
            .expect("train");
        assert_eq!(report.accuracy.len(), 3);

        let ckpt = Checkpoint::load(&out).expect("checkpoint validates");
        assert_eq!(ckpt.header.variant, variant);
        assert_eq!(ckpt.header.tasks, tasks);
        assert_eq!(ckpt.header.epoch, 1);
        assert!(ckpt.header.metrics["mean_accuracy"].is_number());
        let params: usize = names::schema(&ckpt.header.spec, &variant, &tasks)
            .iter()
            .filter(|e| e.trainable)
            .map(|e| ckpt.tensors[&e.name].data.len())
            .sum();
        assert_eq!(
            params,
            ParamCount::of(&small_spec(), &variant, 3).total(),
            "{variant}"
        );
    }
}

/// The same seed gives the same weights bit for bit, on any number of threads:
/// the convolutions sum their weight gradients over a fixed number of image
/// groups, not one per thread.
#[test]
fn same_seed_same_checkpoint() {
    let ds = modkit_trainer::data::Dataset::synthetic(120, 48, 9);
    let dir = tempfile::tempdir().expect("tmp");
    let run = |name: &str, threads: usize| {
        let cfg = TrainConfig {
            spec: small_spec(),
            tasks: vec!["bangs".into(), "chubby".into()],
            epochs: 1,
            triplets_per_task: 8,
            batch_per_task: 4,
            test_triplets_per_task: 10,
            ..TrainConfig::default()
        };
        let out = dir.path().join(name);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            Trainer::new(cfg, &ds, Device::Cpu)
                .expect("t")
                .run(&ds, &out)
                .expect("run")
        });
        Checkpoint::load(&out).expect("load").tensors
    };
    let two = run("a.safetensors", 2);
    assert_eq!(two, run("b.safetensors", 2));
    assert_eq!(two, run("c.safetensors", 1), "1 thread against 2");
    assert_eq!(two, run("d.safetensors", 3), "3 threads against 2");
}

#[test]
fn only_mask_learns_the_vectors_on_a_branch_runs_fixed_weights_and_compiles() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    celeba::write_synthetic(&data, 150, 48, 5, &|_| {}).expect("synth");
    let ds = celeba::load(&data, 48, None).expect("load");
    let base = TrainConfig {
        spec: small_spec(),
        tasks: ["smiling", "young", "bangs"].map(String::from).to_vec(),
        epochs: 1,
        triplets_per_task: 8,
        batch_per_task: 4,
        test_triplets_per_task: 10,
        ..TrainConfig::default()
    };
    let branch = dir.path().join("branch.safetensors");
    Trainer::new(
        TrainConfig {
            variant: Variant::Branch { k: 4 },
            ..base.clone()
        },
        &ds,
        Device::Cpu,
    )
    .expect("branch")
    .run(&ds, &branch)
    .expect("train branch");

    let masked = dir.path().join("mask.safetensors");
    let cfg = TrainConfig {
        variant: Variant::OnlyMask,
        init_from: Some(branch.clone()),
        epochs: 2,
        ..base.clone()
    };
    Trainer::new(cfg.clone(), &ds, Device::Cpu)
        .expect("only-mask")
        .run(&ds, &masked)
        .expect("train only-mask");
    let (b, m) = (
        Checkpoint::load(&branch).expect("b"),
        Checkpoint::load(&masked).expect("m"),
    );
    assert_eq!(m.header.variant, Variant::OnlyMask);
    for e in names::base_network(&small_spec(), "") {
        let same = b.tensors[&e.name] == m.tensors[&e.name];
        if e.name.contains("running_") {
            // BatchNorm's statistics follow the batches, as in any training.
            continue;
        }
        assert!(
            same,
            "{} changed: the shared weights must stay fixed",
            e.name
        );
    }
    let fc = &m.tensors["modulation.fc"].data;
    assert!(fc.iter().any(|&v| v != 1.0), "the vectors did not learn");
    assert!(
        !m.tensors
            .keys()
            .any(|n| n.starts_with("optimizer.") && n.contains("conv1")),
        "no optimizer state for fixed weights"
    );

    // The package runs it like any modulated network.
    let package = modkit_compiler::compile::compile(&m, &Default::default()).expect("compile");
    assert_eq!(package.tasks.len(), 3);

    // Bad starts are refused with what to do.
    let err = |cfg: TrainConfig| {
        Trainer::new(cfg, &ds, Device::Cpu)
            .expect_err("refused")
            .to_string()
    };
    let msg = err(TrainConfig {
        init_from: None,
        ..cfg.clone()
    });
    assert!(msg.contains("--init-from CKPT"), "{msg}");
    let mut wide = small_spec();
    wide.widths = [4, 8, 8, 8, 16];
    let msg = err(TrainConfig {
        spec: wide,
        ..cfg.clone()
    });
    assert!(msg.contains("use the same network options"), "{msg}");
    let msg = err(TrainConfig {
        variant: Variant::Modulated,
        ..cfg.clone()
    });
    assert!(msg.contains("is for --variant only-mask"), "{msg}");
}
