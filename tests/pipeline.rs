//! The pipeline as far as it exists: synthetic data in CelebA's layout → trainer →
//! checkpoint that the format crate reads and validates, with the parameter counts
//! the models crate promises.

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

#[test]
fn same_seed_same_checkpoint() {
    let ds = modkit_trainer::data::Dataset::synthetic(120, 48, 9);
    let dir = tempfile::tempdir().expect("tmp");
    let run = |name: &str| {
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
        Trainer::new(cfg, &ds, Device::Cpu)
            .expect("t")
            .run(&ds, &out)
            .expect("run");
        Checkpoint::load(&out).expect("load").tensors
    };
    assert_eq!(run("a.safetensors"), run("b.safetensors"));
}
