//! `modrt` end to end with the shipped pretrained package: index, query (text,
//! JSON, contact sheet), embed, bench, and one-line errors with exit status 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pretrained() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/pretrained/tiny-faces.modpack")
}

fn modrt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modrt"))
        .args(args)
        .output()
        .expect("run modrt")
}

fn ok(args: &[&str]) -> String {
    let out = modrt(args);
    assert!(
        out.status.success(),
        "modrt {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// Exit status 2 and one line on stderr that contains `want`.
fn fails(args: &[&str], want: &str) {
    let out = modrt(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "modrt {args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(want), "modrt {args:?}: {err}");
}

/// A CelebA-layout gallery of 12 colour patterns with a `smiling` column.
fn gallery(dir: &Path) -> PathBuf {
    let images = dir.join("img_align_celeba");
    std::fs::create_dir_all(&images).expect("mkdir");
    std::fs::create_dir_all(dir.join("Anno")).expect("mkdir");
    let mut attr = String::from("12\nSmiling Young\n");
    for i in 0..12u32 {
        let img = image::RgbImage::from_fn(60, 48, |x, y| {
            image::Rgb([
                (x * 4 + i * 20) as u8,
                (y * 5) as u8,
                ((x + y) * (i + 1) % 256) as u8,
            ])
        });
        let name = format!("{i:06}.png");
        img.save(images.join(&name)).expect("png");
        attr.push_str(&format!(
            "{name} {} -1\n",
            if i % 2 == 0 { " 1" } else { "-1" }
        ));
    }
    std::fs::write(dir.join("Anno/list_attr_celeba.txt"), attr).expect("attr");
    images
}

#[test]
fn index_query_embed_and_bench_with_the_pretrained_package() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = gallery(tmp.path());
    let model = pretrained();
    let model = model.to_str().expect("path");
    let idx = tmp.path().join("g.modidx");
    let idx_s = idx.to_str().expect("path");
    let out = ok(&[
        "index",
        tmp.path().to_str().expect("path"),
        "--model",
        model,
        "-o",
        idx_s,
    ]);
    assert!(
        out.contains("indexed 12 images (12 new, 0 kept, 0 skipped)"),
        "{out}"
    );
    // Appending finds nothing new.
    let out = ok(&[
        "index",
        tmp.path().to_str().expect("path"),
        "--model",
        model,
        "-o",
        idx_s,
        "--append",
    ]);
    assert!(out.contains("(0 new, 12 kept, 0 skipped)"), "{out}");

    let query = images.join("000004.png");
    let sheet = tmp.path().join("sheet.png");
    let out = ok(&[
        "query",
        query.to_str().expect("path"),
        "--task",
        "Smiling",
        "--model",
        model,
        "--index",
        idx_s,
        "-k",
        "3",
        "--json",
        "--sheet",
        sheet.to_str().expect("path"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["task"], "smiling");
    assert_eq!(v["query_label"], true);
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|r| r["id"] != "000004.png"),
        "the query itself is left out"
    );
    let d: Vec<f64> = results
        .iter()
        .map(|r| r["distance"].as_f64().expect("d"))
        .collect();
    assert!(d.windows(2).all(|w| w[0] <= w[1]), "{d:?}");
    assert!(results.iter().all(|r| r["label"].is_boolean()));
    assert!(v["precision"].is_number());
    let png = image::open(&sheet).expect("sheet is a PNG");
    assert!(png.width() > 4 * 112 && png.height() > 112);

    // The text form ranks the same images.
    let text = ok(&[
        "query",
        query.to_str().expect("path"),
        "--task",
        "smiling",
        "--model",
        model,
        "--index",
        idx_s,
        "-k",
        "3",
    ]);
    assert!(
        text.contains(results[0]["id"].as_str().expect("id")),
        "{text}"
    );
    assert!(text.contains("precision@3"), "{text}");

    let out = ok(&[
        "embed",
        query.to_str().expect("path"),
        "--model",
        model,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let map = v.as_object().expect("object");
    assert!(map.contains_key("smiling") && map.len() > 1);
    for e in map.values() {
        let norm: f64 = e
            .as_array()
            .expect("vector")
            .iter()
            .map(|x| x.as_f64().expect("number").powi(2))
            .sum();
        assert!((norm - 1.0).abs() < 1e-3, "L2-normalised: {norm}");
    }

    let out = ok(&[
        "bench", "--model", model, "--runs", "2", "--tasks", "3", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    for key in [
        "trunk_ms",
        "one_tail_ms",
        "all_tails_ms",
        "naive_ms",
        "all_over_one",
        "naive_over_all",
    ] {
        assert!(v[key].as_f64().expect(key) > 0.0, "{key}: {v}");
    }
    assert_eq!(v["tasks"], 3);
}

#[test]
fn bad_input_is_one_line_with_exit_status_2() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = gallery(tmp.path());
    let model = pretrained();
    let model = model.to_str().expect("path");
    let idx = tmp.path().join("g.modidx");
    let idx_s = idx.to_str().expect("path");
    let q = images.join("000001.png");
    let q = q.to_str().expect("path");
    ok(&[
        "index",
        tmp.path().to_str().expect("path"),
        "-m",
        model,
        "-o",
        idx_s,
        "--tasks",
        "young",
    ]);

    fails(
        &["query", q, "--task", "smile", "-m", model, "--index", idx_s],
        "available tasks",
    );
    fails(
        &[
            "query", q, "--task", "smiling", "-m", model, "--index", idx_s,
        ],
        "no embeddings for task \"smiling\"",
    );
    fails(
        &[
            "query", q, "--task", "young", "-m", model, "--index", idx_s, "-k", "0",
        ],
        "-k 0",
    );
    fails(&["embed", q, "-m", "nope.modpack"], "nope.modpack");
    fails(&["embed", q, "-m", idx_s], "not a modkit package");
    fails(&["embed", q, "-m", model, "--threads", "0"], "--threads 0");
    fails(&["bench", "-m", model, "--tasks", "999"], "--tasks 999");
    let empty = tmp.path().join("empty.png");
    std::fs::write(&empty, b"").expect("write");
    fails(
        &["embed", empty.to_str().expect("path"), "-m", model],
        "JPEG or PNG",
    );
    // A package from a newer modkit, and one with a flipped byte: refused, saying
    // what to do; the same for an error with a cause (a folder given as the
    // package), named once.
    let original = std::fs::read(pretrained()).expect("read");
    for (name, at, value, want) in [
        (
            "future.modpack",
            8,
            Some(9u8),
            "newer than this build supports",
        ),
        ("flipped.modpack", original.len() / 2, None, "is corrupt"),
    ] {
        let mut bytes = original.clone();
        bytes[at] = value.unwrap_or(bytes[at] ^ 0x40);
        let path = tmp.path().join(name);
        std::fs::write(&path, &bytes).expect("write");
        fails(&["embed", q, "-m", path.to_str().expect("path")], want);
    }
    let folder = tmp.path().to_str().expect("path");
    let out = modrt(&["embed", q, "-m", folder]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("Is a directory").count(), 1, "{err}");
    // A damaged index is refused, not half-read.
    let mut bytes = std::fs::read(&idx).expect("read");
    bytes.truncate(bytes.len() - 9);
    std::fs::write(&idx, &bytes).expect("write");
    fails(
        &["query", q, "--task", "young", "-m", model, "--index", idx_s],
        "truncated",
    );
    let nothing = tempfile::tempdir().expect("tmp");
    fails(
        &[
            "index",
            nothing.path().to_str().expect("path"),
            "-m",
            model,
            "-o",
            idx_s,
        ],
        "holds no images",
    );
}

#[test]
fn eval_scores_the_gallery_as_query_would_one_image_at_a_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = gallery(tmp.path());
    let model = pretrained();
    let model = model.to_str().expect("path");
    let idx = tmp.path().join("g.modidx");
    let idx_s = idx.to_str().expect("path");
    ok(&[
        "index",
        tmp.path().to_str().expect("path"),
        "-m",
        model,
        "-o",
        idx_s,
    ]);

    let v: serde_json::Value =
        serde_json::from_str(&ok(&["eval", "--index", idx_s, "-k", "3", "--json"])).expect("json");
    let tasks = v["tasks"].as_array().expect("tasks");
    // Only the attribute file's columns have values: smiling (6 with, 6 without)
    // and young (all without).
    let names: Vec<&str> = tasks
        .iter()
        .map(|t| t["task"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["smiling", "young"], "{v}");
    let smiling = &tasks[0];
    assert_eq!(
        (smiling["queries"].as_u64(), smiling["k"].as_u64()),
        (Some(12), Some(3))
    );
    let chance = smiling["chance"].as_f64().expect("chance");
    assert!((chance - 60.0 / 132.0).abs() < 1e-9, "{chance}");
    assert_eq!(tasks[1]["precision"].as_f64(), Some(1.0));

    // The same number from `modrt query`, one gallery image at a time.
    let mut matches = 0;
    for i in 0..12 {
        let q = images.join(format!("{i:06}.png"));
        let r: serde_json::Value = serde_json::from_str(&ok(&[
            "query",
            q.to_str().expect("path"),
            "--task",
            "smiling",
            "-m",
            model,
            "--index",
            idx_s,
            "-k",
            "3",
            "--json",
        ]))
        .expect("json");
        let want = r["query_label"].as_bool().expect("label");
        matches += r["results"]
            .as_array()
            .expect("results")
            .iter()
            .filter(|h| h["label"].as_bool() == Some(want))
            .count();
    }
    let precision = smiling["precision"].as_f64().expect("precision");
    assert!(
        (precision - matches as f64 / 36.0).abs() < 1e-9,
        "{precision} vs {matches}/36"
    );

    fails(
        &["eval", "--index", idx_s, "--tasks", "bangs"],
        "no attribute values for \"bangs\"",
    );
    fails(&["eval", "--index", idx_s, "-k", "0"], "-k 0");
}
