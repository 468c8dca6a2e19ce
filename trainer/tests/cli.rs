//! The `modtrain` command line: synth → train → eval, and one-line errors.

use std::path::Path;
use std::process::{Command, Output};

/// A run of seconds: 8 triplets per task in batches of 4, 10 test triplets, one epoch.
const SMALL: [&str; 8] = [
    "--triplets-per-task",
    "8",
    "--batch-per-task",
    "4",
    "--test-triplets",
    "10",
    "--epochs",
    "1",
];

fn modtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modtrain"))
        .args(args)
        .output()
        .expect("runs modtrain")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `modtrain ARGS` exits with 2 and a last line `modtrain: …` that contains `want`.
fn fails_with(args: &[&str], want: &str) {
    let o = modtrain(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("modtrain: ") && last.contains(want),
        "{args:?}: {err}"
    );
}

/// `RAYON_NUM_THREADS` (or `RAYON_RS_NUM_CPUS`) past any machine's cores is
/// one line, not a panic of the thread pool, and no work starts.
#[test]
fn bad_rayon_thread_counts_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("data");
    for (var, want) in [
        ("RAYON_NUM_THREADS", "RAYON_NUM_THREADS=100000: at most"),
        ("RAYON_RS_NUM_CPUS", "RAYON_RS_NUM_CPUS=100000: at most"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_modtrain"))
            .args(["synth", "--out", out.to_str().expect("utf8"), "--n", "4"])
            .env(var, "100000")
            .output()
            .expect("runs modtrain");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.starts_with("modtrain: ") && err.contains(want), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn synth_train_eval_round_trip() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let ckpt = dir.path().join("run/m.safetensors");
    let o = modtrain(&[
        "synth",
        "--out",
        data.to_str().expect("utf8"),
        "--n",
        "120",
        "--size",
        "48",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(data.join("Anno/list_attr_celeba.txt").exists());

    let src = format!("celeba:{}", data.display());
    let o = modtrain(&[
        "train",
        "--data",
        &src,
        "--tasks",
        "smiling,bangs",
        "--epochs",
        "1",
        "--triplets-per-task",
        "8",
        "--batch-per-task",
        "4",
        "--test-triplets",
        "10",
        "--json",
        "-o",
        ckpt.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json report");
    assert!(report["accuracy"]["smiling"].is_number(), "{report}");
    for sibling in ["metrics.jsonl", "triplets.json"] {
        assert!(ckpt.with_extension(sibling).exists(), "missing {sibling}");
    }

    let o = modtrain(&[
        "eval",
        ckpt.to_str().expect("utf8"),
        "--data",
        &src,
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eval: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        eval["mean_accuracy"], report["mean_accuracy"],
        "eval disagrees with train's final report"
    );
}

#[test]
fn bad_input_gets_one_line_errors_and_exit_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("m.safetensors");
    let out = out.to_str().expect("utf8");
    let synth = format!("{}/synth", dir.path().display());
    let cases: [(&[&str], &str); 21] = [
        // Options that would be ignored are refused.
        (
            &[
                "train",
                "--data",
                "celeba:/x",
                "--synth-images",
                "50",
                "-o",
                out,
            ],
            "--synth-images 50: is for --data synth",
        ),
        (
            &["train", "--limit", "10", "-o", out],
            "--limit 10: is for celeba:",
        ),
        (
            &[
                "train",
                "--optimizer",
                "adam",
                "--adagrad-init",
                "0.5",
                "-o",
                out,
            ],
            "is for --optimizer adagrad",
        ),
        (&["train", "--input-size", "40", "-o", out], "at least 48"),
        (
            &[
                "train",
                "--tasks",
                "smile",
                "--synth-images",
                "60",
                "-o",
                out,
            ],
            "available tasks: smiling",
        ),
        (
            &["train", "--variant", "mixed", "-o", out],
            "unknown variant \"mixed\"",
        ),
        (&["train", "--data", "imagenet:/x", "-o", out], "celeba:DIR"),
        (
            &["eval", "/nonexistent/ckpt.safetensors"],
            "/nonexistent/ckpt.safetensors",
        ),
        (&["bench-step", "--tasks", "21"], "--tasks 21"),
        (
            &["train", "--widths", "8,16,0,32,32", "-o", out],
            "must all be positive",
        ),
        (&["bench-step", "--spec", "tiny", "--steps", "0"], "--steps"),
        (&["bench-step", "--spec", "huge"], "huge"),
        (&["train", "--epochs", "0", "-o", out], "--epochs 0"),
        (&["train", "--lr=-1", "-o", out], "--lr -1"),
        (
            &["train", "--test-triplets", "0", "-o", out],
            "--test-triplets 0",
        ),
        (
            &[
                "train",
                "--tasks",
                "smiling,Smiling",
                "--synth-images",
                "60",
                "-o",
                out,
            ],
            "asked for twice",
        ),
        // Sizes past any real run: one-line errors, not allocation failures.
        (
            &["train", "--synth-images", "18446744073709551615", "-o", out],
            "(--synth-images, --input-size)",
        ),
        (
            &["bench-step", "--images", "18446744073709551615"],
            "would take",
        ),
        (
            &["synth", "--out", &synth, "--n", "2", "--size", "100000"],
            "at most 1024 pixels",
        ),
        (
            &["train", "--variant", "branch:99999999999999", "-o", out],
            "over the 16384",
        ),
        (
            &["train", "--widths", "100000000,8,8,8,8", "-o", out],
            "width 100000000",
        ),
    ];
    for (args, want) in cases {
        fails_with(args, want);
    }
    assert!(!Path::new(out).exists(), "a failed run left a checkpoint");
    // An -o that is a directory fails before any data is loaded or trained on.
    let start = std::time::Instant::now();
    fails_with(
        &["train", "-o", dir.path().to_str().expect("utf8")],
        "names a directory",
    );
    let new_dir = format!("{}/new/", dir.path().display());
    fails_with(&["train", "-o", &new_dir], "names a directory");
    fails_with(
        &["train", "--variant", "shared", "--projection", "-o", out],
        "--projection",
    );
    assert!(start.elapsed().as_secs() < 20);
    assert!(std::fs::read_dir(dir.path()).expect("dir").next().is_none());
}

#[test]
fn eval_and_resume_reuse_the_checkpoints_data_settings() {
    let dir = tempfile::tempdir().expect("tmp");
    let ckpt = dir.path().join("m.safetensors");
    let c = ckpt.to_str().expect("utf8");
    let common = [
        "--tasks",
        "smiling,bangs",
        "--triplets-per-task",
        "8",
        "--batch-per-task",
        "4",
        "--test-triplets",
        "10",
    ];
    let mut args = vec![
        "train",
        "--synth-images",
        "150",
        "--epochs",
        "1",
        "--json",
        "-o",
        c,
    ];
    args.extend(common);
    let o = modtrain(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let trained: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");

    // No --data / --synth-images: eval rebuilds the same 150 images from the checkpoint.
    let o = modtrain(&["eval", c, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eval: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(eval["mean_accuracy"], trained["mean_accuracy"]);

    let o = modtrain(&["train", "--resume", c, "--epochs", "2", "--json", "-o", c]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("150 images"), "{}", stderr(&o));
    let resumed: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(resumed["epochs"][0]["epoch"], 2);
    // Without --epochs a resumed run keeps its own total (it used to fall back to
    // 4); at that total nothing is left to train.
    fails_with(&["train", "--resume", c, "-o", c], "--epochs N above 2");
    fails_with(
        &["train", "--resume", c, "--epochs", "0", "-o", c],
        "--epochs 0 trains nothing",
    );
    // Options the checkpoint fixes are refused, not silently ignored.
    for flag in [["--lr", "0.5"], ["--variant", "shared"], ["--seed", "9"]] {
        let o = modtrain(&[
            "train", "--resume", c, "--epochs", "3", flag[0], flag[1], "-o", c,
        ]);
        assert_eq!(o.status.code(), Some(2), "{flag:?}");
        assert!(
            stderr(&o).contains("cannot be used with"),
            "{flag:?}: {}",
            stderr(&o)
        );
    }
    // The data a resumed run trains on is what its checkpoint records.
    let o = modtrain(&[
        "train",
        "--resume",
        c,
        "--epochs",
        "3",
        "--synth-images",
        "160",
        "-o",
        c,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = modkit_models::Checkpoint::load(&ckpt).expect("checkpoint");
    assert_eq!(resumed.header.train_config["synth_images"], 160);
    assert_eq!(resumed.header.train_config["epochs"], 3);
    // Resumed into `m`, beside it: two checkpoints would share one log.
    let bare = dir.path().join("m");
    let b = bare.to_str().expect("utf8");
    fails_with(
        &["train", "--resume", c, "--epochs", "4", "-o", b],
        "resume into that checkpoint itself",
    );
    assert!(!bare.exists());
    // Two checkpoints that share a log (an earlier build allowed it): each says
    // to move the other away.
    std::fs::copy(&ckpt, &bare).expect("copy");
    fails_with(
        &["train", "--resume", b, "--epochs", "4", "-o", b],
        "m.safetensors away to resume this one",
    );
    // A run saved as `m` (no extension) resumes in place.
    std::fs::rename(&ckpt, &bare).expect("rename");
    let o = modtrain(&["train", "--resume", b, "--epochs", "4", "-o", b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(dir.path().join("m.metrics.jsonl")).expect("log");
    assert_eq!(log.lines().count(), 4, "{log}");
}

/// `-o` never replaces a dataset's file, another run's log or a folder, and a
/// folder the run cannot write in fails before the data is loaded.
#[test]
fn train_outputs_never_replace_data_or_logs() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let data = d.join("data");
    let o = modtrain(&["synth", "--out", data.to_str().expect("utf8"), "--n", "60"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let src = format!("celeba:{}", data.display());
    let run = d.join("m.safetensors");
    let train = |out: &Path| {
        modtrain(&[
            "train",
            "--data",
            &src,
            "--tasks",
            "smiling",
            "--epochs",
            "1",
            "--triplets-per-task",
            "8",
            "--batch-per-task",
            "4",
            "--test-triplets",
            "10",
            "-o",
            out.to_str().expect("utf8"),
        ])
    };
    let o = train(&run);
    assert!(o.status.success(), "{}", stderr(&o));
    let inputs = [
        data.join("Anno/list_attr_celeba.txt"),
        data.join("Eval/list_eval_partition.txt"),
        data.join("img_align_celeba/000001.png"),
        d.join("m.metrics.jsonl"),
        d.join("m.triplets.json"),
    ];
    let before: Vec<Vec<u8>> = inputs
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    for input in &inputs {
        let o = train(input);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{input:?}: {err}");
        assert!(err.contains("is not a modkit checkpoint"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // The log or test triplets it would write: a folder, a text file.
    std::fs::create_dir(d.join("x.metrics.jsonl")).expect("mkdir");
    let o = train(&d.join("x.safetensors"));
    let err = stderr(&o);
    assert!(
        err.contains("x.metrics.jsonl, which is a folder")
            && err.contains("move it away, or name another checkpoint"),
        "{err}"
    );
    std::fs::write(d.join("y.triplets.json"), "my notes\n").expect("notes");
    let o = train(&d.join("y.safetensors"));
    assert!(
        stderr(&o).contains("is not a test-triplet list"),
        "{}",
        stderr(&o)
    );
    if cfg!(target_os = "linux") {
        let o = train(Path::new("/sys/modkit-test.safetensors"));
        assert!(
            stderr(&o).contains("cannot write in /sys"),
            "{}",
            stderr(&o)
        );
    }
    for system in ["/proc/modkit-test.safetensors", "/dev/null"] {
        let o = train(Path::new(system));
        let err = stderr(&o);
        assert!(err.contains("name a file in a folder of yours"), "{err}");
    }
    let o = train(&d.join("x.safetensors/"));
    assert!(stderr(&o).contains("names a directory"), "{}", stderr(&o));
    for (input, bytes) in inputs.iter().zip(&before) {
        assert_eq!(
            &std::fs::read(input).expect("read"),
            bytes,
            "{input:?} changed"
        );
    }
    assert!(!d.join("x.safetensors").exists() && !d.join("y.safetensors").exists());
    // An old checkpoint of its own name is replaced: that is how a rerun updates it.
    let o = train(&run);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn adam_runs_resume_bit_exactly_and_record_the_optimizer() {
    let dir = tempfile::tempdir().expect("tmp");
    let full = dir.path().join("full.safetensors");
    let half = dir.path().join("half.safetensors");
    let train = |out: &Path, epochs: &str| {
        let o = modtrain(&[
            "train",
            "--synth-images",
            "150",
            "--tasks",
            "smiling,bangs",
            "--optimizer",
            "adam",
            "--triplets-per-task",
            "8",
            "--batch-per-task",
            "4",
            "--test-triplets",
            "10",
            "--epochs",
            epochs,
            "-o",
            out.to_str().expect("utf8"),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    train(&full, "2");
    train(&half, "1");
    let h = half.to_str().expect("utf8");
    // --optimizer is the checkpoint's on resume; a wrong one here is not even parsed.
    let o = modtrain(&["train", "--resume", h, "--epochs", "2", "-o", h]);
    assert!(o.status.success(), "{}", stderr(&o));

    let a = modkit_models::Checkpoint::load(&full).expect("full");
    let b = modkit_models::Checkpoint::load(&half).expect("half");
    assert_eq!(a.header.train_config["optimizer"], "adam");
    assert_eq!(a.header.train_config["lr"], 0.001, "adam's default lr");
    assert_eq!(b.header.epoch, 2);
    assert!(a.tensors.contains_key("optimizer.adam.step"));
    assert!(
        !a.tensors
            .keys()
            .any(|n| n.starts_with("optimizer.adagrad."))
    );
    assert_eq!(
        a.tensors["optimizer.adam.step"].data,
        [4.0],
        "2 epochs × 2 steps"
    );
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        assert_eq!(t, &b.tensors[name], "{name} differs after resume");
    }

    let o = modtrain(&["train", "--optimizer", "sgd", "-o", h]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unknown optimizer \"sgd\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bench_step_reports_phases_and_the_gemm_peak() {
    let o = modtrain(&[
        "bench-step",
        "--spec",
        "tiny",
        "--tasks",
        "2",
        "--batch-per-task",
        "2",
        "--steps",
        "2",
        "--images",
        "100",
        "--layers",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let b: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let layers = b["layers"].as_array().expect("--layers: layers");
    assert_eq!(layers.len(), 13, "conv1, then 3 per block: {b}");
    assert_eq!(layers[1]["layer"]["name"], "block2.conv");
    for l in layers {
        for phase in ["forward", "backward"] {
            assert!(l[phase].as_f64().is_some_and(|t| t > 0.0), "{l}");
        }
    }
    assert_eq!(b["images_per_step"], 12);
    assert_eq!(b["device"], "cpu");
    assert_eq!(b["steps"].as_array().map(Vec::len), Some(2));
    assert_eq!(b["net"]["widths"], serde_json::json!([8, 16, 32, 32, 32]));
    for phase in ["forward", "backward", "update"] {
        assert!(
            b["median"][phase].as_f64().is_some_and(|t| t > 0.0),
            "{phase}: {b}"
        );
    }
    assert!(b["gemm_peak_gflops"].as_f64().is_some_and(|g| g > 0.0));
    // The matmul between the steps: before the first and after each of the two.
    assert_eq!(b["between_steps_gflops"].as_array().map(Vec::len), Some(3));
    assert!(b["paired_peak_fraction"].as_f64().is_some_and(|f| f > 0.0));
    let kernels = b["gemm_kernels"].as_str().expect("gemm_kernels");
    assert!(
        ["AVX-512", "AVX2+FMA", "NEON", "scalar"].contains(&kernels),
        "{kernels}"
    );

    let o = modtrain(&[
        "bench-step",
        "--spec",
        "tiny",
        "--tasks",
        "1",
        "--batch-per-task",
        "1",
        "--steps",
        "1",
        "--images",
        "60",
        "--layers",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "forward",
        "backward",
        "update",
        "images/s",
        "% of the GEMM peak",
        "% of the peak paired per step",
        "block5.res2",
        "32→32 @1 p1",
        "% of the step's forward",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    // `modtrain bench-step … | head -0`: the reader is gone before the table.
    let mut child = Command::new(env!("CARGO_BIN_EXE_modtrain"))
        .args([
            "bench-step",
            "--spec",
            "tiny",
            "--tasks",
            "1",
            "--batch-per-task",
            "1",
            "--steps",
            "1",
            "--images",
            "60",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs modtrain");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("waits");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn ucr_is_measured_logged_and_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let runs = dir.path().join("runs");
    let train = |variant: &str, name: &str, ucr_every: &str| {
        let out = runs.join(format!("{name}.safetensors"));
        let o = modtrain(&[
            "train",
            "--synth-images",
            "150",
            "--variant",
            variant,
            "--tasks",
            "smiling,bangs,young",
            "--triplets-per-task",
            "8",
            "--batch-per-task",
            "2",
            "--test-triplets",
            "10",
            "--epochs",
            "2",
            "--ucr-every",
            ucr_every,
            "--json",
            "-o",
            out.to_str().expect("utf8"),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert!(stderr(&o).contains("UCR "), "{}", stderr(&o));
        report
    };
    let fsn = train("shared", "fsn", "1");
    // 8 triplets per task in batches of 2: 4 minibatches per epoch, all measured.
    assert_eq!(fsn["ucr"]["batches"], 4, "{fsn}");
    assert_eq!(
        fsn["ucr"]["tasks"],
        serde_json::json!(["smiling", "bangs", "young"])
    );
    let ratio = fsn["ucr"]["ratio"].as_array().expect("ratio rows");
    assert_eq!(ratio.len(), 3);
    assert!(ratio[0][0].is_null() && ratio[0][1] == ratio[1][0], "{fsn}");
    let modulated = train("modulated", "mod", "2");
    assert_eq!(modulated["ucr"]["batches"], 2, "{modulated}");

    let o = modtrain(&["report", runs.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for want in [
        "| fsn (shared) | 2 |",
        "| mod (modulated) | 2 |",
        "| bangs |",
        "1 smiling",
        "|w_i − w_j| of the learned task vectors",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let out = runs.join("report");
    for (png, width) in [
        ("loss.png", 720),
        ("accuracy.png", 720),
        ("ucr.png", 720),
        ("ucr-fsn.png", 0),
        ("ucr-mod.png", 0),
    ] {
        let img = image::open(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(img.width() >= width.max(300), "{png}: {}", img.width());
    }
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert_eq!(md, text, "report.md holds the printed tables");
    // Run again, the report replaces the earlier one.
    let o = modtrain(&["report", runs.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));

    // One run named twice, by its checkpoint and its log: one column.
    let path = |p: &Path| p.to_str().expect("utf8").to_string();
    let (fsn_ckpt, fsn_log) = (runs.join("fsn.safetensors"), runs.join("fsn.metrics.jsonl"));
    let twice = dir.path().join("twice");
    let o = modtrain(&[
        "report",
        &path(&fsn_ckpt),
        &path(&fsn_log),
        "-o",
        &path(&twice),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.matches("| fsn (shared) |").count(), 1, "{text}");
    // A folder with someone's report.md: refused before any table prints.
    let notes = dir.path().join("notes");
    std::fs::create_dir(&notes).expect("mkdir");
    std::fs::write(notes.join("report.md"), "# My notes\n").expect("md");
    let o = modtrain(&["report", &path(&fsn_ckpt), "-o", &path(&notes)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        stderr(&o).contains("a report.md that modtrain report did not write"),
        "{}",
        stderr(&o)
    );
    let md = std::fs::read_to_string(notes.join("report.md")).expect("md");
    assert_eq!(md, "# My notes\n");
    // Two runs' lines in one log: refused, naming the line.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    let mut both = std::fs::read_to_string(&fsn_log).expect("log");
    both += &std::fs::read_to_string(runs.join("mod.metrics.jsonl")).expect("log");
    std::fs::write(other.join("cat.metrics.jsonl"), both).expect("cat");
    fails_with(
        &["report", &path(&other.join("cat.metrics.jsonl"))],
        "line 3: epoch 1 after epoch 2",
    );
    // Another run's checkpoint beside a log: left out, and said.
    std::fs::copy(&fsn_ckpt, other.join("x.safetensors")).expect("copy");
    std::fs::copy(
        runs.join("mod.metrics.jsonl"),
        other.join("x.metrics.jsonl"),
    )
    .expect("copy");
    let x = path(&other.join("x.safetensors"));
    let o = modtrain(&["report", &x, "-o", &path(&other.join("rep"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is not the run its log"),
        "{}",
        stderr(&o)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("| x | 2 |") && !text.contains("(shared)"),
        "{text}"
    );
    // The default report folder is a file: refused before any table.
    std::fs::write(other.join("x.report"), "notes").expect("file");
    let o = modtrain(&["report", &x]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("x.report is a file") && stderr(&o).contains("-o DIR"));
    assert!(o.stdout.is_empty(), "tables printed before the error");

    for (args, want) in [
        (
            vec![
                "train",
                "--variant",
                "independent",
                "--ucr-every",
                "1",
                "--tasks",
                "smiling,bangs",
                "-o",
            ],
            "--ucr-every 1",
        ),
        (vec!["report"], "/nonexistent/run.metrics.jsonl"),
    ] {
        let mut args = args;
        args.push("/nonexistent/run.safetensors");
        fails_with(&args, want);
    }
}

/// A small UT-Zappos50K tree: `n` shoes drawn as a dark sole whose colour
/// follows the category, whose height follows the heel, on white, 64×48 (as the
/// originals, wider than tall), and a meta-data.csv with one multi-valued closure
/// and one shoe without an image.
fn zappos_fixture(dir: &Path, n: usize) {
    let cats = ["Boots", "Shoes", "Sandals"];
    let heels = ["Flat", "High heel"];
    let closures = ["Lace up", "Zipper", "Buckle;Zipper"];
    let genders = ["Men", "Women"];
    let mut meta = String::from(
        "CID,Category,SubCategory,HeelHeight,Insole,Closure,Gender,Material,ToeStyle\n",
    );
    for i in 0..n {
        let (c, h, cl, g) = (i % 3, (i / 3) % 2, (i / 2) % 3, (i / 5) % 2);
        let sub = dir.join(format!("ut-zap50k-images/{}/Sub/Brand{}", cats[c], i % 4));
        std::fs::create_dir_all(&sub).expect("dirs");
        let colour = [[200u8, 30, 30], [30, 200, 30], [30, 30, 200]][c];
        let top = if h == 1 { 8 } else { 30 };
        let img = image::RgbImage::from_fn(64, 48, |x, y| {
            if y >= top && y < 40 && (8..56).contains(&x) {
                image::Rgb(colour)
            } else if g == 1 && y < 4 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        img.save(sub.join(format!("{}.{}.jpg", 1000 + i, i % 7)))
            .expect("jpg");
        meta.push_str(&format!(
            "{}-{},{},Sub,{},,{},{},Leather,\n",
            1000 + i,
            i % 7,
            cats[c],
            heels[h],
            closures[cl],
            genders[g]
        ));
    }
    meta.push_str("999999-1,Boots,Sub,Flat,,Zipper,Men,,\n");
    std::fs::create_dir_all(dir.join("ut-zap50k-data")).expect("dirs");
    std::fs::write(dir.join("ut-zap50k-data/meta-data.csv"), meta).expect("meta");
}

/// CSN's lists for [`zappos_fixture`]'s first `n` shoes: shoe `i`'s split is
/// `split(i)` (none: in no list). Each split's shoes are listed in runs of three,
/// the same for the four conditions.
fn csn_fixture(dir: &Path, n: usize, split: impl Fn(usize) -> Option<&'static str>) {
    let cats = ["Boots", "Shoes", "Sandals"];
    let names: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{}/Sub/Brand{}/{}.{}.jpg",
                cats[i % 3],
                i % 4,
                1000 + i,
                i % 7
            )
        })
        .collect();
    std::fs::write(dir.join("filenames.json"), names.join("\n") + "\n").expect("names");
    std::fs::create_dir_all(dir.join("tripletlists")).expect("dirs");
    for s in ["train", "val", "test"] {
        let members: Vec<usize> = (0..n).filter(|&i| split(i) == Some(s)).collect();
        let lines: String = members
            .chunks(3)
            .map(|c| format!("{} {} {}\n", c[0], c[c.len() / 2], c[c.len() - 1]))
            .collect();
        for condition in ["class", "closure", "gender", "heel"] {
            let list = dir.join(format!("tripletlists/{condition}_tripletlist_{s}.txt"));
            std::fs::write(list, &lines).expect("list");
        }
    }
}

/// With CSN's triplet lists beside the images, training and evaluation use their
/// splits: the test triplets hold only CSN's test shoes.
#[test]
fn zappos_with_csn_lists_uses_their_splits() {
    let dir = tempfile::tempdir().expect("tmp");
    zappos_fixture(dir.path(), 150);
    let src = format!("zappos:{}", dir.path().display());
    let train = |name: &str| {
        let ckpt = dir.path().join(format!("{name}.safetensors"));
        let mut args = vec!["train", "--data", &src, "--json", "-o"];
        args.push(ckpt.to_str().expect("utf8"));
        args.extend(SMALL);
        (modtrain(&args), ckpt)
    };
    let eval = |ckpt: &Path| modtrain(&["eval", ckpt.to_str().expect("utf8"), "--json"]);
    // First without the lists: split by hash.
    let (o, hashed) = train("hashed");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("splits drawn by a hash"),
        "{}",
        stderr(&o)
    );

    let split = |i: usize| match i {
        149 => None,
        i if i % 5 == 0 => Some("test"),
        i if i % 10 == 1 => Some("val"),
        _ => Some("train"),
    };
    csn_fixture(dir.path(), 150, split);
    let (o, ckpt) = train("csn");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let loaded = "149 images (104 train, 15 val, 30 test)";
    assert!(err.contains(loaded), "{err}");
    assert!(err.contains("splits from CSN's triplet lists in"), "{err}");
    // 149 is in no list: a warning of its own, beside 999999-1's (no image).
    let unlisted = |l: &str| {
        l.contains("warning: 1 of the 151 shoes read from") && l.contains("in none of CSN's lists")
    };
    assert!(err.lines().any(unlisted), "{err}");
    let trained: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let triplets = std::fs::read_to_string(dir.path().join("csn.triplets.json")).expect("list");
    let triplets: serde_json::Value = serde_json::from_str(&triplets).expect("json");
    let mut files = 0;
    for rows in triplets["tasks"].as_object().expect("tasks").values() {
        for file in rows
            .as_array()
            .expect("rows")
            .iter()
            .flat_map(|r| r.as_array().expect("row"))
        {
            let name = file.as_str().expect("name");
            let name = name.rsplit('/').next().expect("name");
            let cid: usize = name
                .split('.')
                .next()
                .expect("cid")
                .parse()
                .expect("number");
            assert_eq!(split(cid - 1000), Some("test"), "{name}");
            files += 1;
        }
    }
    assert_eq!(files, 4 * 10 * 3);
    // eval reads the same lists again, and scores what training did.
    let o = eval(&ckpt);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(loaded), "{}", stderr(&o));
    let evaluated: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(evaluated["mean_accuracy"], trained["mean_accuracy"]);
    // The run split by hash is not evaluated on CSN's splits, nor the other way.
    // Each refusal comes before the images load.
    let refused = |o: &std::process::Output, what: &str| {
        let err = stderr(o);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains(what), "{err}");
        assert!(!err.contains("loading ") && !err.contains(loaded), "{err}");
    };
    refused(&eval(&hashed), "was trained on UT-Zappos50K split by hash");
    // Nor is it started from (only-mask takes its data and tasks).
    let masked = dir.path().join("masked.safetensors");
    let mut args = vec!["train", "--variant", "only-mask", "--init-from"];
    args.extend([
        hashed.to_str().expect("utf8"),
        "-o",
        masked.to_str().expect("utf8"),
    ]);
    args.extend(SMALL);
    let o = modtrain(&args);
    refused(&o, "split by hash");
    refused(&o, "away to start from it");
    assert!(!masked.exists());
    // Nor resumed.
    let h = hashed.to_str().expect("utf8");
    let o = modtrain(&["train", "--resume", h, "--epochs", "9", "-o", h]);
    refused(&o, "away to evaluate or resume it");
    std::fs::rename(dir.path().join("tripletlists"), dir.path().join("away")).expect("mv");
    refused(&eval(&ckpt), "was trained on CSN's splits");
    // A folder that is not there: the loader names what is missing; the
    // splits are not blamed.
    let c = ckpt.to_str().expect("utf8");
    let o = modtrain(&["eval", c, "--data", "zappos:/no/such/dir"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("meta-data.csv") && !err.contains("put them back"),
        "{err}"
    );
    let o = eval(&hashed);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `scripts/table6.sh`, scaled down: the four methods of the paper's Table 6
/// trained on the fixture's CSN splits and reported side by side.
#[test]
fn table6_script_reports_the_four_methods() {
    let dir = tempfile::tempdir().expect("tmp");
    let zap = dir.path().join("zappos");
    zappos_fixture(&zap, 150);
    csn_fixture(&zap, 150, |i| {
        Some(["train", "train", "val", "test"][i % 4])
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/table6.sh");
    let out = dir.path().join("t6");
    let o = Command::new("bash")
        .arg(&script)
        .args([&zap, &out])
        .env("MODTRAIN", env!("CARGO_BIN_EXE_modtrain"))
        .envs([("SPEC", "tiny"), ("EPOCHS", "1"), ("TRIPLETS", "8")])
        .envs([("TEST", "10"), ("BATCH", "4")])
        .output()
        .expect("runs bash");
    let (report, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(o.status.success(), "{err}");
    assert!(err.contains("splits from CSN's triplet lists"), "{err}");
    for name in ["fsn", "itn", "csn", "ours"] {
        assert!(
            out.join(format!("runs/{name}.safetensors")).is_file(),
            "{name}"
        );
        assert!(report.contains(name), "{name}: {report}");
    }
    for task in ["category", "gender", "heel_height", "closure"] {
        assert!(report.contains(task), "{task}: {report}");
    }
    assert!(out.join("runs/report/report.md").is_file());
    // A missing data folder, or flags where OUT_DIR goes: usage, not a half-run.
    let absent = dir.path().join("absent");
    for (args, want) in [
        ([absent.as_os_str(), out.as_os_str()], "is not a directory"),
        ([zap.as_os_str(), "--epochs".as_ref()], "give OUT_DIR"),
    ] {
        let o = Command::new("bash")
            .arg(&script)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("runs bash");
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains(want), "{}", stderr(&o));
    }
    assert!(!dir.path().join("--epochs").exists());
}

#[test]
fn zappos_and_folder_data_train_and_evaluate() {
    let dir = tempfile::tempdir().expect("tmp");
    let zap = dir.path().join("zappos");
    zappos_fixture(&zap, 150);
    let ckpt = dir.path().join("shoes.safetensors");
    let c = ckpt.to_str().expect("utf8");
    let src = format!("zappos:{}", zap.display());
    let mut small = SMALL.to_vec();
    small.push("--json");
    let mut args = vec!["train", "--data", &src, "-o", c];
    args.extend(&small);
    let o = modtrain(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("150 images"), "{}", stderr(&o));
    // 999999-1 has no image: left out, and said so.
    assert!(
        stderr(&o).contains("warning: 1 of the 151 shoes read from"),
        "{}",
        stderr(&o)
    );
    let trained: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    // The paper's four tasks by default.
    for task in ["category", "gender", "heel_height", "closure"] {
        assert!(trained["accuracy"][task].is_number(), "{task}: {trained}");
    }
    let o = modtrain(&["eval", c, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eval: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(eval["mean_accuracy"], trained["mean_accuracy"]);

    // The same shoes as a folder with labels.csv: every column a task.
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(&folder).expect("dir");
    let mut csv = String::from("file,category,heel,split\n");
    for i in 0..60 {
        let src = zap.join(format!(
            "ut-zap50k-images/{}/Sub/Brand{}/{}.{}.jpg",
            ["Boots", "Shoes", "Sandals"][i % 3],
            i % 4,
            1000 + i,
            i % 7
        ));
        std::fs::copy(&src, folder.join(format!("{i}.jpg"))).expect("copy");
        let split = ["train", "train", "train", "test"][i % 4];
        csv.push_str(&format!("{i}.jpg,{},{},{split}\n", i % 3, (i / 3) % 2));
    }
    std::fs::write(folder.join("labels.csv"), csv).expect("csv");
    let out = dir.path().join("folder.safetensors");
    let src = format!("folder:{}", folder.display());
    let mut args = vec!["train", "--data", &src, "-o", out.to_str().expect("utf8")];
    args.extend(&small);
    let o = modtrain(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let trained: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(
        trained["accuracy"]["category"].is_number() && trained["accuracy"]["heel"].is_number(),
        "{trained}"
    );
    // A relative --data is recorded absolute: `eval` finds it from elsewhere.
    let mut args = vec!["train", "--data", "folder:folder", "-o", "rel.safetensors"];
    args.extend(&small);
    let o = Command::new(env!("CARGO_BIN_EXE_modtrain"))
        .args(&args)
        .current_dir(dir.path())
        .output()
        .expect("runs modtrain");
    assert!(o.status.success(), "{}", stderr(&o));
    let rel = dir.path().join("rel.safetensors");
    let o = modtrain(&["eval", rel.to_str().expect("utf8"), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));

    for (data, want) in [
        (
            format!("zappos:{}", dir.path().display()),
            "ut-zap50k-data/meta-data.csv",
        ),
        (format!("folder:{}", zap.display()), "labels.csv"),
    ] {
        fails_with(&["train", "--data", &data, "-o", c], want);
    }
}

#[test]
fn only_mask_continues_a_branch_run_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let branch = dir.path().join("ib.safetensors");
    let masked = dir.path().join("mask.safetensors");
    let (b, m) = (
        branch.to_str().expect("utf8"),
        masked.to_str().expect("utf8"),
    );
    let small = SMALL;
    let mut args = vec![
        "train",
        "--synth-images",
        "150",
        "--variant",
        "branch:4",
        "--widths",
        "4,8,8,8,8",
        "--embedding",
        "8",
        "--tasks",
        "smiling,bangs",
        "-o",
        b,
    ];
    args.extend(small);
    let o = modtrain(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // Network, data and tasks come from the branch run.
    let mut args = vec![
        "train",
        "--variant",
        "only-mask",
        "--init-from",
        b,
        "--json",
        "-o",
        m,
    ];
    args.extend(small);
    let o = modtrain(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(report["variant"], "only-mask");
    assert!(report["accuracy"]["bangs"].is_number(), "{report}");
    let ckpt = modkit_models::Checkpoint::load(&masked).expect("ckpt");
    assert_eq!(ckpt.header.spec.widths, [4, 8, 8, 8, 8]);
    assert!(ckpt.header.train_config["init_from"].is_string());

    for (args, want) in [
        (
            vec!["train", "--variant", "only-mask", "-o", m],
            "--init-from CKPT",
        ),
        (
            vec!["train", "--variant", "shared", "--init-from", b, "-o", m],
            "is for --variant only-mask",
        ),
        (
            vec![
                "train",
                "--variant",
                "only-mask",
                "--init-from",
                "/nonexistent.safetensors",
                "-o",
                m,
            ],
            "/nonexistent.safetensors",
        ),
        (
            vec![
                "train",
                "--variant",
                "only-mask",
                "--init-from",
                b,
                "--spec",
                "paper",
                "-o",
                m,
            ],
            "--spec paper: --init-from",
        ),
        (
            vec!["train", "--variant", "only-mask", "--init-from", b, "-o", b],
            "is the --init-from checkpoint",
        ),
        // `ib` would share `ib.safetensors`'s log and test triplets.
        (
            vec!["train", "-o", b.strip_suffix(".safetensors").expect("name")],
            "are those of the checkpoint",
        ),
        (
            vec!["train", "-o", &format!("{b}/x.safetensors")],
            "is a file, not a folder",
        ),
        // Resumed, the only-mask run's -o may not be its --init-from either.
        (
            vec!["train", "--resume", m, "--epochs", "2", "-o", b],
            "is the --init-from checkpoint",
        ),
    ] {
        fails_with(&args, want);
    }
    let ckpt = modkit_models::Checkpoint::load(&branch).expect("the branch run is kept");
    assert_eq!(ckpt.header.train_config["variant"], "branch:4");
}
