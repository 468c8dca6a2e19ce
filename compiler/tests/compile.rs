//! modc end to end: fold == switch, verify against candle, export, inspect
//! accounting, f16, and the errors.

use modkit_compiler::compile::{CompileOptions, FoldTasks, compile, task_network};
use modkit_compiler::verify::{max_abs_diff, sample_images, tract_embed, verify};
use modkit_compiler::{emit, fold_batch_norm, inspect, reference, tract_run};
use modkit_models::{NetSpec, Package, Precision, Variant};
use prost::Message;
use tract_onnx::pb::{ModelProto, tensor_proto::DataType};

mod common;
use common::{checkpoint, small};

const TASKS: [&str; 3] = ["smiling", "young", "bangs"];

#[test]
fn folded_equals_switch_for_every_task() {
    let ckpt = checkpoint(&small(), Variant::Modulated, &TASKS);
    let switch = compile(&ckpt, &CompileOptions::default()).expect("switch");
    let folded = compile(
        &ckpt,
        &CompileOptions {
            fold: FoldTasks::All,
            ..Default::default()
        },
    )
    .expect("fold");
    assert!(switch.tails.folded.is_empty() && folded.tails.switch.is_none());
    let images = sample_images(&switch, 3);
    for (t, name) in TASKS.iter().enumerate() {
        let ((_, a), ra) = tract_embed(&switch, &images, t).expect("switch");
        let ((_, b), rb) = tract_embed(&folded, &images, t).expect("folded");
        assert_eq!((ra, rb), ("switch", "folded"));
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "{name}: folded vs switch differ by {d}");
    }
    // All tasks of one image in one call: the switch tail takes a batch of vectors.
    let (c, hw) = emit::features_shape(&switch.spec);
    let feats =
        tract_run::run("trunk", &switch.trunk, std::slice::from_ref(&images)).expect("trunk");
    let first = feats.1[..c * hw * hw].to_vec();
    let mut inputs = vec![(vec![1, c, hw, hw], first)];
    for stage in 0..switch.task_vectors[0].len() {
        let v: Vec<f32> = switch
            .task_vectors
            .iter()
            .flat_map(|t| t[stage].clone())
            .collect();
        inputs.push((vec![TASKS.len(), v.len() / TASKS.len()], v));
    }
    let tail = switch.tails.switch.as_ref().expect("switch tail");
    let (shape, batched) = tract_run::run("switch", tail, &inputs).expect("batched");
    assert_eq!(shape, vec![TASKS.len(), 8]);
    for t in 0..TASKS.len() {
        let ((_, single), _) = tract_embed(&switch, &images, t).expect("single");
        let d = batched[t * 8..(t + 1) * 8]
            .iter()
            .zip(&single[..8])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "task {t}: batched vs single differ by {d}");
    }
    // The tasks really differ: the vectors are not all the same.
    let ((_, e0), _) = tract_embed(&switch, &images, 0).expect("t0");
    let ((_, e1), _) = tract_embed(&switch, &images, 1).expect("t1");
    assert!(e0.iter().zip(&e1).any(|(x, y)| (x - y).abs() > 1e-3));
}

#[test]
fn packages_match_candle_for_every_variant_and_mode() {
    let cases = [
        (Variant::Modulated, FoldTasks::None),
        (Variant::Modulated, FoldTasks::Some(vec!["young".into()])),
        (Variant::Shared, FoldTasks::None),
        (Variant::Csn, FoldTasks::All),
        (Variant::Branch { k: 5 }, FoldTasks::All),
    ];
    for (variant, fold) in cases {
        let ckpt = checkpoint(&small(), variant, &TASKS);
        let pkg = compile(
            &ckpt,
            &CompileOptions {
                fold: fold.clone(),
                ..Default::default()
            },
        )
        .expect("compile");
        for c in verify(&pkg, &ckpt, 3).expect("verify") {
            assert!(
                c.max_abs_error < 1e-4,
                "{variant} {fold:?} {}: {}",
                c.task,
                c.max_abs_error
            );
        }
    }
    let mut proj = small();
    proj.modulation = modkit_models::Modulation::Projection;
    let ckpt = checkpoint(&proj, Variant::Modulated, &TASKS);
    let pkg = compile(
        &ckpt,
        &CompileOptions {
            fold: FoldTasks::All,
            ..Default::default()
        },
    )
    .expect("projection");
    for c in verify(&pkg, &ckpt, 2).expect("verify") {
        assert!(
            c.max_abs_error < 1e-4,
            "projection {}: {}",
            c.task,
            c.max_abs_error
        );
    }
}

/// The reference `verify` compares with is the trainer's evaluation forward pass:
/// every variant, both modulations, every modulation point, with and without
/// BatchNorm, every task.
#[test]
fn reference_equals_the_trainers_forward_pass() {
    let mut cases = vec![];
    for variant in [
        Variant::Modulated,
        Variant::Shared,
        Variant::Independent,
        Variant::Csn,
        Variant::Branch { k: 5 },
        Variant::OnlyMask,
    ] {
        cases.push((small(), variant));
    }
    let mut proj = small();
    proj.modulation = modkit_models::Modulation::Projection;
    cases.push((proj, Variant::Modulated));
    for n in [2, 3, 5] {
        for bn in [true, false] {
            let mut s = small();
            s.first_modulated = n;
            s.batch_norm = bn;
            cases.push((s, Variant::Modulated));
        }
    }
    for (spec, variant) in cases {
        let ckpt = checkpoint(&spec, variant, &TASKS);
        let pkg_like = Package {
            spec: spec.clone(),
            ..compile(
                &checkpoint(&small(), Variant::Modulated, &TASKS),
                &CompileOptions::default(),
            )
            .expect("pkg")
        };
        let images = sample_images(&pkg_like, 2);
        let (_vm, net) =
            modkit_trainer::net::network_from_checkpoint(&ckpt, &candle_core::Device::Cpu)
                .expect("candle");
        let x = candle_core::Tensor::from_slice(
            &images.1,
            images.0.as_slice(),
            &candle_core::Device::Cpu,
        )
        .expect("x");
        let mut outputs = vec![];
        for t in 0..TASKS.len() {
            let want = net
                .forward_grouped(&x, &[(t, 2)], false)
                .and_then(|e| Ok(e.flatten_all()?.to_vec1::<f32>()?))
                .expect("candle forward");
            let (shape, got) = reference::embed(&ckpt, &images, t).expect("reference");
            assert_eq!(shape, vec![2, want.len() / 2]);
            let d = max_abs_diff(&got, &want);
            assert!(
                d < 1e-5,
                "{variant} N={} bn={}: task {t}: {d}",
                spec.first_modulated,
                spec.batch_norm
            );
            outputs.push(got);
        }
        // Not trivially equal: the images and, but for `shared`, the tasks differ.
        let dim = outputs[0].len() / 2;
        assert!(max_abs_diff(&outputs[0][..dim], &outputs[0][dim..]) > 1e-2);
        if variant != Variant::Shared {
            assert!(max_abs_diff(&outputs[0], &outputs[1]) > 1e-2, "{variant}");
        }
    }
    let ckpt = checkpoint(&small(), Variant::Modulated, &TASKS);
    let err = reference::embed(&ckpt, &(vec![1, 3, 5, 5], vec![0.0; 75]), 0).unwrap_err();
    assert!(err.to_string().contains("[1, 3, 5, 5]"), "{err}");
    let images = (vec![1, 3, 48, 48], vec![0.0; 3 * 48 * 48]);
    let err = reference::embed(&ckpt, &images, 3).unwrap_err();
    assert!(err.to_string().contains("3 tasks"), "{err}");
}

/// `verify` fails a package whose task numbers were changed after compiling, and
/// only on that task.
#[test]
fn verify_catches_a_changed_task_vector() {
    let ckpt = checkpoint(&small(), Variant::Modulated, &TASKS);
    let mut pkg = compile(&ckpt, &CompileOptions::default()).expect("compile");
    pkg.task_vectors[1][0]
        .iter_mut()
        .step_by(2)
        .for_each(|v| *v = 0.0);
    let checks = verify(&pkg, &ckpt, 2).expect("verify");
    let errors: Vec<f32> = checks.iter().map(|c| c.max_abs_error).collect();
    assert!(errors[0] < 1e-5 && errors[2] < 1e-5, "{errors:?}");
    assert!(errors[1] > 1e-3, "{errors:?}");
}

/// A diverged checkpoint (a NaN or infinity anywhere) is refused, naming the tensor.
#[test]
fn non_finite_checkpoints_are_refused() {
    let mut ckpt = checkpoint(&small(), Variant::Modulated, &TASKS);
    let name = "fc.weight";
    ckpt.tensors.get_mut(name).expect("fc").data[3] = f32::INFINITY;
    let err = compile(&ckpt, &CompileOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checkpoint tensor fc.weight holds NaN or infinity"),
        "{err}"
    );
}

/// The graphs agree but the package would square images otherwise than training
/// did (a version-1 package reads as cropping whatever it was trained on).
#[test]
fn verify_catches_a_package_that_prepares_images_otherwise() {
    let ckpt = checkpoint(&small(), Variant::Modulated, &TASKS);
    let mut pkg = compile(&ckpt, &CompileOptions::default()).expect("compile");
    verify(&pkg, &ckpt, 1).expect("the same preprocessing passes");
    // Another network that prints the same name: the message shows the field.
    let mut other = pkg.clone();
    other.spec.input_size += 16;
    let err = verify(&other, &ckpt, 1).unwrap_err().to_string();
    let side = ckpt.header.spec.input_size;
    let (theirs, ours) = (format!("3×{0}×{0}", side + 16), format!("3×{side}×{side}"));
    assert!(err.contains(&theirs) && err.contains(&ours), "{err}");
    pkg.preprocess.fit = modkit_models::Fit::Pad;
    let err = verify(&pkg, &ckpt, 1).unwrap_err().to_string();
    assert!(
        err.contains("prepares images as Pad") && err.contains("trained on Crop"),
        "{err}"
    );
}

#[test]
fn half_precision_halves_the_weights_and_stays_close() {
    let ckpt = checkpoint(&small(), Variant::Modulated, &TASKS);
    let f32p = compile(&ckpt, &CompileOptions::default()).expect("f32");
    let f16p = compile(
        &ckpt,
        &CompileOptions {
            precision: Precision::F16,
            ..Default::default()
        },
    )
    .expect("f16");
    let ratio = f16p.trunk.len() as f64 / f32p.trunk.len() as f64;
    assert!(ratio < 0.65, "f16 trunk is {ratio:.2} of f32");
    for c in verify(&f16p, &ckpt, 2).expect("verify") {
        assert!(c.max_abs_error < 2e-2, "{}: {}", c.task, c.max_abs_error);
    }
    // The L2 norm's epsilon stays an f32 1e-12 (as f16 it would round to 0, and a
    // zero embedding would become 0/0), and is not counted as a parameter.
    let tail = f16p.tails.switch.as_ref().expect("switch tail");
    let graph = ModelProto::decode(tail.as_slice())
        .expect("onnx")
        .graph
        .expect("graph");
    let eps = graph
        .initializer
        .iter()
        .find(|t| t.name == emit::L2_EPS)
        .expect("l2.eps");
    assert_eq!(eps.data_type, DataType::Float as i32);
    assert_eq!(eps.raw_data, 1e-12f32.to_le_bytes());
    let f32_tail = inspect::inspect(&f32p, 0).switch_tail.expect("f32").params;
    assert_eq!(
        inspect::inspect(&f16p, 0).switch_tail.expect("f16").params,
        f32_tail
    );
}

#[test]
fn verify_refuses_what_it_cannot_compare_and_propagates_nan() {
    let ckpt = checkpoint(&small(), Variant::Modulated, &TASKS);
    let pkg = compile(&ckpt, &CompileOptions::default()).expect("compile");
    let err = verify(&pkg, &ckpt, 0).unwrap_err().to_string();
    assert!(err.contains("--images 1"), "{err}");
    // A package task the checkpoint lacks is an error, not compared with task 0.
    let mut renamed = pkg.clone();
    renamed.tasks[1] = "bald".into();
    let err = verify(&renamed, &ckpt, 1).unwrap_err().to_string();
    assert!(
        err.contains("\"bald\"") && err.contains("smiling, young, bangs"),
        "{err}"
    );
    assert!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]) == 0.5);
    assert!(max_abs_diff(&[1.0, f32::NAN, 2.0], &[1.0, 0.0, 9.0]).is_nan());
    assert!(max_abs_diff(&[f32::NAN], &[f32::NAN]).is_nan());
}

#[test]
fn exported_model_runs_in_tract_and_matches_the_package() {
    let ckpt = checkpoint(&small(), Variant::Modulated, &TASKS);
    let base = fold_batch_norm::fold_batch_norm(&ckpt, "").expect("bn");
    let (net, head) = task_network(&ckpt, &base, 1).expect("task");
    let metadata = emit::export_metadata(&ckpt.header.spec, &ckpt.header.preprocess, TASKS[1]);
    let onnx = emit::export_model(
        &ckpt.header.spec,
        &net,
        head.as_ref(),
        Precision::F32,
        &metadata,
    );
    // How to prepare an image travels with the model.
    let props: std::collections::BTreeMap<String, String> = ModelProto::decode(onnx.as_slice())
        .expect("onnx")
        .metadata_props
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect();
    assert_eq!(props["modkit.task"], TASKS[1]);
    assert_eq!(props["modkit.fit"], "crop");
    assert_eq!(props["modkit.mean"], "0.5,0.5,0.5");
    assert_eq!(props["modkit.std"], "0.25,0.25,0.25");
    assert_eq!(
        props["modkit.input_size"],
        ckpt.header.spec.input_size.to_string()
    );
    let pkg = compile(&ckpt, &CompileOptions::default()).expect("pkg");
    let images = sample_images(&pkg, 2);
    let (shape, got) = tract_run::run("export", &onnx, std::slice::from_ref(&images)).expect("run");
    assert_eq!(shape, vec![2, 8]);
    let ((_, want), _) = tract_embed(&pkg, &images, 1).expect("pkg");
    let d = got
        .iter()
        .zip(&want)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(d < 1e-5, "export vs package: {d}");
}

#[test]
fn independent_networks_export_per_task() {
    let ckpt = checkpoint(&small(), Variant::Independent, &TASKS);
    let (_vm, candle_net) =
        modkit_trainer::net::network_from_checkpoint(&ckpt, &candle_core::Device::Cpu)
            .expect("candle");
    let pkg_like = compile(
        &checkpoint(&small(), Variant::Modulated, &TASKS),
        &CompileOptions::default(),
    )
    .expect("pkg");
    let images = sample_images(&pkg_like, 2);
    let x =
        candle_core::Tensor::from_slice(&images.1, images.0.as_slice(), &candle_core::Device::Cpu)
            .expect("x");
    for (t, task) in TASKS.iter().enumerate() {
        let base = fold_batch_norm::fold_batch_norm(
            &ckpt,
            &modkit_models::names::independent_prefix(task),
        )
        .expect("bn");
        let (net, head) = task_network(&ckpt, &base, t).expect("task");
        let onnx = emit::export_model(&ckpt.header.spec, &net, head.as_ref(), Precision::F32, &[]);
        let (_, got) = tract_run::run("export", &onnx, std::slice::from_ref(&images)).expect("run");
        let want = candle_net
            .forward_grouped(&x, &[(t, 2)], false)
            .and_then(|e| Ok(e.flatten_all()?.to_vec1::<f32>()?))
            .expect("forward");
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-4, "{task}: export vs candle {d}");
    }
}

#[test]
fn inspect_accounts_for_the_paper_spec_with_20_tasks() {
    let tasks = modkit_models::tasks::CELEBA_20;
    let ckpt = checkpoint(&NetSpec::paper(), Variant::Modulated, &tasks);
    let dir = tempfile::tempdir().expect("tmp");
    for (fold, name) in [(FoldTasks::None, "switch"), (FoldTasks::All, "folded")] {
        let pkg = compile(
            &ckpt,
            &CompileOptions {
                fold,
                ..Default::default()
            },
        )
        .expect("compile");
        let path = dir.path().join(format!("{name}.modpack"));
        pkg.save(&path).expect("save");
        let size = std::fs::metadata(&path).expect("meta").len() as usize;
        let r = inspect::inspect(&Package::load(&path).expect("load").0, size);
        assert_eq!(r.mode, name);
        // Shared parameters ≈ 3.0M (BN folded into biases: 2,953,664 as in Table 2).
        let shared = r.trunk.params + r.switch_tail.as_ref().map_or(0, |p| p.params);
        if name == "switch" {
            assert_eq!(shared, 2_953_664);
            assert_eq!(r.vectors_per_task.params, 512);
            assert_eq!(r.per_task.params, 512);
        } else {
            // Each folded tail: block5 (3 convs, 442,752) + fc (1,605,888).
            assert_eq!(r.per_task.params, 2_048_640);
            assert_eq!(r.folded_tails.len(), 20);
        }
        // The parts add up to the file within the container overhead (< 0.5%).
        assert!(
            r.overhead_bytes * 200 < size,
            "{name}: overhead {} of {size}",
            r.overhead_bytes
        );
    }
}

#[test]
fn unsupported_requests_get_clear_errors() {
    let ind = checkpoint(&small(), Variant::Independent, &TASKS);
    let err = compile(&ind, &CompileOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("independent") && err.contains("export-onnx"),
        "{err}"
    );
    let m = checkpoint(&small(), Variant::Modulated, &TASKS);
    let opts = CompileOptions {
        tasks: Some(vec!["smile".into()]),
        ..Default::default()
    };
    let err = compile(&m, &opts).unwrap_err().to_string();
    assert!(
        err.contains("\"smile\"") && err.contains("smiling, young, bangs"),
        "{err}"
    );
    // A folded task that --tasks leaves out is named, not dropped.
    let opts = CompileOptions {
        tasks: Some(vec!["smiling".into(), "young".into()]),
        fold: FoldTasks::Some(vec!["young".into(), "bangs".into()]),
        ..Default::default()
    };
    let err = compile(&m, &opts).unwrap_err().to_string();
    assert!(
        err.contains("\"bangs\"") && err.contains("--tasks"),
        "{err}"
    );
    // Packages take RGB images.
    let mut grey = small();
    grey.in_channels = 1;
    let err = compile(
        &checkpoint(&grey, Variant::Modulated, &TASKS),
        &CompileOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("1 input channels"), "{err}");
}

#[test]
fn csn_masks_and_branch_heads_are_a_runtime_switch_too() {
    // CSN's per-task mask scales fc's outputs, branch:K's head maps them to K: the
    // switch tail takes either as the task's inputs, and equals the folded tails.
    for (variant, inputs) in [
        (Variant::Csn, vec![8]),
        (Variant::Branch { k: 4 }, vec![32, 4]),
    ] {
        let ckpt = checkpoint(&small(), variant, &TASKS);
        let switch = compile(&ckpt, &CompileOptions::default()).expect("switch");
        let opts = CompileOptions {
            fold: FoldTasks::All,
            ..Default::default()
        };
        let folded = compile(&ckpt, &opts).expect("folded");
        assert!(switch.tails.switch.is_some() && switch.tails.folded.is_empty());
        for v in &switch.task_vectors {
            assert_eq!(
                v.iter().map(Vec::len).collect::<Vec<_>>(),
                inputs,
                "{variant}"
            );
        }
        for pkg in [&switch, &folded] {
            for c in verify(pkg, &ckpt, 2).expect("verify") {
                assert!(
                    c.max_abs_error < 1e-4,
                    "{variant} {}: {}",
                    c.task,
                    c.max_abs_error
                );
            }
        }
        let images = sample_images(&switch, 2);
        for t in 0..TASKS.len() {
            let ((_, a), _) = tract_embed(&switch, &images, t).expect("switch");
            let ((_, b), _) = tract_embed(&folded, &images, t).expect("folded");
            assert!(
                a.len() == b.len() && max_abs_diff(&a, &b) < 1e-5,
                "{variant} task {t}"
            );
        }
        // The tasks' own numbers differ, so their embeddings do.
        let ((_, a), _) = tract_embed(&switch, &images, 0).expect("0");
        let ((_, b), _) = tract_embed(&switch, &images, 1).expect("1");
        assert!(max_abs_diff(&a, &b) > 1e-3, "{variant}");
    }
}

#[test]
fn every_modulation_point_with_and_without_batch_norm_verifies() {
    // The paper's N ∈ {2, 3, 4, 5}, with and without BatchNorm, both routes:
    // tract against candle on the same checkpoint.
    for first in 2..=5 {
        for bn in [true, false] {
            let mut spec = small();
            spec.first_modulated = first;
            spec.batch_norm = bn;
            let ckpt = checkpoint(&spec, Variant::Modulated, &TASKS);
            for fold in [FoldTasks::None, FoldTasks::All] {
                let opts = CompileOptions {
                    fold: fold.clone(),
                    ..Default::default()
                };
                let pkg = compile(&ckpt, &opts).expect("compile");
                assert_eq!(pkg.task_vectors[0].len(), 6 - first + 1);
                for c in verify(&pkg, &ckpt, 2).expect("verify") {
                    assert!(
                        c.max_abs_error < 1e-4,
                        "N={first} bn={bn} {fold:?} {}: {}",
                        c.task,
                        c.max_abs_error
                    );
                }
            }
        }
    }
}
