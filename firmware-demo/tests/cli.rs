//! `firmware-demo --once` with the shipped pretrained package: frames per query ×
//! task, k larger than the gallery, a gallery image gone since indexing, and
//! one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use modkit_runtime::{Model, index};

fn pretrained() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/pretrained/tiny-faces.modpack")
}

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_firmware-demo"))
        .args(args)
        .output()
        .expect("run firmware-demo")
}

/// Four gallery images and two query images, distinct colour patterns.
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let gallery = dir.join("gallery");
    let queries = dir.join("queries");
    std::fs::create_dir_all(&gallery).expect("mkdir");
    std::fs::create_dir_all(&queries).expect("mkdir");
    let pattern = |i: u32| {
        image::RgbImage::from_fn(64, 64, move |x, y| {
            image::Rgb([
                (x * 3 + i * 50) as u8,
                (y * 4) as u8,
                ((x ^ y) * (i + 1)) as u8,
            ])
        })
    };
    for i in 0..4 {
        pattern(i)
            .save(gallery.join(format!("g{i}.png")))
            .expect("png");
    }
    for i in 0..2 {
        pattern(10 + i)
            .save(queries.join(format!("q{i}.png")))
            .expect("png");
    }
    let model = Model::load(&pretrained()).expect("pretrained");
    let tasks = model.select_tasks(&[]).expect("tasks");
    let (idx, _) = index::build(&model, &gallery, &tasks, None, &|_, _| {}).expect("index");
    let path = dir.join("g.modidx");
    idx.save(&path).expect("save");
    (gallery, queries, path)
}

#[test]
fn once_draws_every_query_and_task_and_survives_k_and_missing_images() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (gallery, queries, idx) = setup(tmp.path());
    std::fs::remove_file(gallery.join("g2.png")).expect("rm");
    let frames = tmp.path().join("frame-{}.png");
    let model = pretrained();
    let display = format!("png:{}", frames.display());
    let args = [
        "-m",
        model.to_str().expect("p"),
        "-i",
        idx.to_str().expect("p"),
        "--queries",
        queries.to_str().expect("p"),
        "--task",
        "smiling,young",
        "-k",
        "10",
        "--once",
        "--no-timings",
        "--display",
        &display,
        "--size",
        "320x240",
        "--json",
    ];
    let out = demo(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let screens = v.as_array().expect("array");
    assert_eq!(screens.len(), 4, "2 queries × 2 tasks");
    for s in screens {
        let results = s["results"].as_array().expect("results");
        assert_eq!(results.len(), 4, "k=10 over a gallery of 4");
        let png = tmp.path().join(format!(
            "frame-{}-{}.png",
            s["query"].as_str().expect("q").trim_end_matches(".png"),
            s["task"].as_str().expect("t")
        ));
        let img = image::open(&png).expect("frame written");
        assert_eq!((img.width(), img.height()), (320, 240));
    }
    // The same run twice draws the same frames (no timings): reproducible.
    let before = std::fs::read(tmp.path().join("frame-q0-smiling.png")).expect("read");
    let again = demo(&args);
    assert!(again.status.success());
    let after = std::fs::read(tmp.path().join("frame-q0-smiling.png")).expect("read");
    assert!(before == after, "the frame changed between identical runs");
    // Without --json: a readable ranking per screen.
    let text = demo(&args[..args.len() - 1]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("q0.png smiling:") && text.contains(".png"),
        "{text}"
    );
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_, queries, idx) = setup(tmp.path());
    let model = pretrained();
    let m = model.to_str().expect("p");
    let i = idx.to_str().expect("p");
    let q = queries.to_str().expect("p");
    let none = tmp.path().join("none");
    let none = none.to_str().expect("p");
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--task",
                "smile",
                "--once",
            ],
            "smile",
        ),
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--display",
                "hdmi",
                "--once",
            ],
            "png:PATH or fb:/dev/fb0",
        ),
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--size",
                "10x10",
                "--once",
            ],
            "--size",
        ),
        (&["-m", m, "-i", i, "--queries", none, "--once"], "none"),
        (&["-m", m, "-i", q, "--queries", q, "--once"], "queries"),
    ];
    for (args, want) in cases {
        let out = demo(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
