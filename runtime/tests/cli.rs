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

/// The pretrained package and [`gallery`], indexed by `modrt index` (with `extra`
/// arguments) in a fresh temporary folder.
struct Indexed {
    tmp: tempfile::TempDir,
    images: PathBuf,
    model: String,
    idx: String,
    /// What `modrt index` printed.
    printed: String,
}

fn indexed(extra: &[&str]) -> Indexed {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = gallery(tmp.path());
    let model = pretrained().to_str().expect("path").to_string();
    let idx = tmp.path().join("g.modidx");
    let idx = idx.to_str().expect("path").to_string();
    let dir = tmp.path().to_str().expect("path");
    let mut args = vec!["index", dir, "-m", &model, "-o", &idx];
    args.extend_from_slice(extra);
    let printed = ok(&args);
    Indexed {
        tmp,
        images,
        model,
        idx,
        printed,
    }
}

impl Indexed {
    /// The gallery folder.
    fn dir(&self) -> &str {
        self.tmp.path().to_str().expect("path")
    }

    /// The path of gallery image `i`.
    fn image(&self, i: u32) -> String {
        let p = self.images.join(format!("{i:06}.png"));
        p.to_str().expect("path").to_string()
    }

    /// `modrt query IMAGE --task TASK -k K --json` (and `extra`), parsed.
    fn query_json(&self, image: &str, task: &str, k: &str, extra: &[&str]) -> serde_json::Value {
        let mut args = vec![
            "query",
            image,
            "--task",
            task,
            "-m",
            &self.model,
            "--index",
            &self.idx,
            "-k",
            k,
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).expect("json")
    }
}

#[test]
fn index_query_embed_and_bench_with_the_pretrained_package() {
    let g = indexed(&[]);
    assert!(
        g.printed
            .contains("indexed 12 images (12 new, 0 kept, 0 skipped)"),
        "{}",
        g.printed
    );
    // Appending finds nothing new.
    let out = ok(&[
        "index",
        g.dir(),
        "--model",
        &g.model,
        "-o",
        &g.idx,
        "--append",
    ]);
    assert!(out.contains("(0 new, 12 kept, 0 skipped)"), "{out}");

    let query = g.image(4);
    let sheet = g.tmp.path().join("sheet.png");
    let v = g.query_json(
        &query,
        "Smiling",
        "3",
        &["--sheet", sheet.to_str().expect("path")],
    );
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
        "query", &query, "--task", "smiling", "--model", &g.model, "--index", &g.idx, "-k", "3",
    ]);
    assert!(
        text.contains(results[0]["id"].as_str().expect("id")),
        "{text}"
    );
    assert!(text.contains("precision@3"), "{text}");

    let out = ok(&["embed", &query, "--model", &g.model, "--json"]);
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
        "bench", "--model", &g.model, "--runs", "2", "--tasks", "3", "--json",
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
    let text = ok(&["bench", "--model", &g.model, "--runs", "1", "--tasks", "2"]);
    assert!(
        text.contains("2 of ")
            && text.contains("(switch tails)")
            && text.contains("all tasks' tails, batched"),
        "{text}"
    );
}

#[test]
fn bad_input_is_one_line_with_exit_status_2() {
    let g = indexed(&["--tasks", "young"]);
    let (model, idx_s) = (g.model.as_str(), g.idx.as_str());
    let q = &g.image(1);

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
    // Several tasks, one not indexed: the advice keeps the indexed ones.
    fails(
        &[
            "query",
            q,
            "--task",
            "young,smiling",
            "-m",
            model,
            "--index",
            idx_s,
        ],
        "--tasks young,smiling",
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
    // Past what any machine has: refused before a thread starts (it panicked in
    // tract where the system could not start them).
    let many = ["embed", q, "-m", model, "--threads", "100000"];
    fails(&many, "--threads 100000: at most");
    fails(&["bench", "-m", model, "--tasks", "999"], "--tasks 999");
    fails(
        &["bench", "-m", model, "--gallery", "18446744073709551615"],
        "--gallery 18446744073709551615",
    );
    fails(&["bench", "-m", model, "--gallery", "0"], "--gallery 0");
    for runs in ["0", "18446744073709551615"] {
        fails(
            &["bench", "-m", model, "--runs", runs],
            "calls per measurement",
        );
    }
    let empty = g.tmp.path().join("empty.png");
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
        let path = g.tmp.path().join(name);
        std::fs::write(&path, &bytes).expect("write");
        fails(&["embed", q, "-m", path.to_str().expect("path")], want);
    }
    // A package whose checksum is right but whose graph makes tract panic (a
    // Conv's `pads` ints turned into floats): one line, not a panic.
    let kind = modkit_models::package::KIND;
    let (payload, version, _) =
        modkit_models::container::unframe(&kind, &original, Path::new("p")).expect("unframe");
    let mut payload = payload.to_vec();
    let at = payload
        .windows(7)
        .position(|w| w == b"\n\x04padsB")
        .expect("a Conv's pads")
        + 6;
    payload[at] = 0x3a;
    let bad_graph = g.tmp.path().join("bad-graph.modpack");
    std::fs::write(
        &bad_graph,
        // At the pretrained package's own version, whose layout the payload has.
        modkit_models::container::frame(
            &modkit_models::container::Kind { version, ..kind },
            &payload,
        ),
    )
    .expect("write");
    fails(
        &["embed", q, "-m", bad_graph.to_str().expect("path")],
        "malformed graph",
    );
    let out = modrt(&["embed", q, "-m", g.dir()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("Is a directory").count(), 1, "{err}");
    // An index of another embedding size (its fingerprint right) is refused,
    // not searched for nothing.
    let mut other = modkit_runtime::index::GalleryIndex::load(Path::new(idx_s)).expect("load");
    other.dim /= 2;
    for t in &mut other.tasks {
        t.rows.truncate(other.ids.len() * other.dim);
    }
    let other_s = g.tmp.path().join("other.modidx");
    other.save(&other_s).expect("save");
    fails(
        &[
            "query",
            q,
            "--task",
            "young",
            "-m",
            model,
            "--index",
            other_s.to_str().expect("path"),
        ],
        "rebuild the index with this package",
    );
    // A damaged index is refused, not half-read.
    let mut bytes = std::fs::read(idx_s).expect("read");
    bytes.truncate(bytes.len() - 9);
    std::fs::write(idx_s, &bytes).expect("write");
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
    let g = indexed(&[]);
    let idx_s = g.idx.as_str();

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
        let r = g.query_json(&g.image(i), "smiling", "3", &[]);
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
    fails(
        &["eval", "--index", idx_s, "--tasks", "young,YOUNG"],
        "\"young\" is asked for twice",
    );
    // k past the 11 other labelled images is capped, and the table says so.
    let text = ok(&["eval", "--index", idx_s, "-k", "50"]);
    let smiling = text
        .lines()
        .find(|l| l.starts_with("smiling"))
        .expect("a smiling row");
    assert_eq!(smiling.split_whitespace().nth(2), Some("11"), "{text}");
    assert!(
        !text.contains("precision@50") && text.contains("capped"),
        "{text}"
    );
}

#[test]
fn one_query_answers_several_tasks_as_single_task_queries_would() {
    let g = indexed(&[]);
    let q = g.image(4);
    let one_sheet = g.tmp.path().join("smiling.png");
    let two_sheet = g.tmp.path().join("both.png");
    let smiling = g.query_json(
        &q,
        "smiling",
        "3",
        &["--sheet", one_sheet.to_str().expect("path")],
    );
    let young = g.query_json(&q, "young", "3", &[]);
    let both = g.query_json(
        &q,
        "smiling,Young",
        "3",
        &["--sheet", two_sheet.to_str().expect("path")],
    );
    assert_eq!(both["gallery_images"], 12);
    let tasks = both["tasks"].as_array().expect("a list of tasks");
    assert_eq!(tasks.len(), 2, "{both}");
    // The same results as one-task queries; the distances agree to rounding (the
    // tails ran as a batch of two, not one).
    for (got, want) in tasks.iter().zip([&smiling, &young]) {
        for key in ["task", "query_label", "precision"] {
            assert_eq!(got[key], want[key], "{key}");
        }
        let (g, w) = (
            got["results"].as_array().expect("results"),
            want["results"].as_array().expect("results"),
        );
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            for key in ["rank", "id", "path", "label"] {
                assert_eq!(a[key], b[key], "{key}");
            }
            let (da, db) = (a["distance"].as_f64(), b["distance"].as_f64());
            assert!((da.expect("d") - db.expect("d")).abs() < 1e-6, "{a} vs {b}");
        }
    }
    // Each task searched with its own embedding.
    let distances = |v: &serde_json::Value| -> Vec<f64> {
        v["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["distance"].as_f64().expect("distance"))
            .collect()
    };
    assert_ne!(distances(&smiling), distances(&young));

    // The sheet stacks a row per task; its first row is the one-task sheet.
    let one = image::open(&one_sheet).expect("PNG").to_rgb8();
    let two = image::open(&two_sheet).expect("PNG").to_rgb8();
    assert_eq!(two.width(), one.width());
    assert!(two.height() > one.height() * 19 / 10, "{}", two.height());
    let row = one.height() - 8;
    for y in 0..row {
        for x in 0..one.width() {
            assert_eq!(one.get_pixel(x, y), two.get_pixel(x, y), "({x}, {y})");
        }
    }

    let text = ok(&[
        "query",
        &q,
        "--task",
        "smiling,young",
        "-m",
        &g.model,
        "--index",
        &g.idx,
    ]);
    assert!(
        text.contains("(smiling: yes)") && text.contains("(young: no)"),
        "{text}"
    );
    fails(
        &[
            "query",
            &q,
            "--task",
            "smiling,Smiling",
            "-m",
            &g.model,
            "--index",
            &g.idx,
        ],
        "\"smiling\" is asked for twice",
    );
}

#[test]
fn a_sheet_never_overwrites_an_input_and_is_bounded() {
    let g = indexed(&[]);
    let q = g.image(4);
    let before = std::fs::read(&q).expect("read");
    let other = g.image(5);
    let query = |sheet: &str, k: &str, want: &str| {
        fails(
            &[
                "query", &q, "--task", "smiling", "-m", &g.model, "--index", &g.idx, "-k", k,
                "--sheet", sheet,
            ],
            want,
        )
    };
    query(&q, "5", "is the query image");
    // A gallery image is a PNG modkit did not write.
    query(&other, "5", "exists and is not a PNG image modkit wrote");
    query(&g.idx, "5", "is the index");
    query(&g.model, "5", "is the package");
    // Nor a file of another kind, nor a folder.
    let labels = g.tmp.path().join("Anno/list_attr_celeba.txt");
    let labels_before = std::fs::read(&labels).expect("labels");
    query(
        labels.to_str().expect("path"),
        "5",
        "exists and is not a PNG image",
    );
    assert_eq!(std::fs::read(&labels).expect("labels"), labels_before);
    query(g.dir(), "5", "is a folder");
    assert_eq!(std::fs::read(&q).expect("read"), before);
    // More than 50 results a row: refused where the gallery has them (a
    // 12-image gallery is drawn whole).
    let fresh = g.tmp.path().join("new.png");
    let fresh = fresh.to_str().expect("path");
    g.query_json(&q, "smiling", "100", &["--sheet", fresh]);
    assert!(std::path::Path::new(fresh).exists());
    // A sheet is replaced by the next one; a photo outside the gallery is not.
    g.query_json(&q, "smiling", "3", &["--sheet", fresh]);
    let photo = g.tmp.path().join("holiday.png");
    std::fs::copy(&q, &photo).expect("copy");
    query(
        photo.to_str().expect("path"),
        "5",
        "exists and is not a PNG image modkit wrote",
    );
    assert_eq!(std::fs::read(&photo).expect("photo"), before);
    let mut rows = String::from("51\nSmiling\n");
    let big = g.tmp.path().join("big");
    let big_images = big.join("img_align_celeba");
    std::fs::create_dir_all(&big_images).expect("mkdir");
    std::fs::create_dir_all(big.join("Anno")).expect("mkdir");
    let img = image::open(&q).expect("png");
    for i in 0..51 {
        img.save(big_images.join(format!("{i:03}.png")))
            .expect("png");
        rows.push_str(&format!("{i:03}.png 1\n"));
    }
    std::fs::write(big.join("Anno/list_attr_celeba.txt"), rows).expect("attr");
    let big_idx = g.tmp.path().join("big.modidx");
    let big_idx = big_idx.to_str().expect("path");
    ok(&[
        "index",
        big.to_str().expect("path"),
        "-m",
        &g.model,
        "-o",
        big_idx,
    ]);
    let sheet = g.tmp.path().join("big.png");
    fails(
        &[
            "query",
            &q,
            "--task",
            "smiling",
            "-m",
            &g.model,
            "--index",
            big_idx,
            "-k",
            "51",
            "--sheet",
            sheet.to_str().expect("path"),
        ],
        "at most 50 results",
    );
    assert!(!sheet.exists());
    // A sheet indexed into the gallery is a gallery image, though modrt wrote it.
    let indexed_sheet = g.images.join("sheet.png");
    std::fs::copy(fresh, &indexed_sheet).expect("copy");
    ok(&["index", g.dir(), "-m", &g.model, "-o", &g.idx, "--append"]);
    let before = std::fs::read(&indexed_sheet).expect("sheet");
    query(
        indexed_sheet.to_str().expect("path"),
        "5",
        "is an image of the gallery",
    );
    assert_eq!(std::fs::read(&indexed_sheet).expect("sheet"), before);
}

/// The ids of a `query --json` answer's results, in rank order.
fn result_ids(v: &serde_json::Value) -> Vec<&str> {
    v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect()
}

/// A linked folder pointing outside the gallery is listed under the link's name,
/// and a query named through the link is recognised as the gallery's own image.
#[test]
fn an_image_in_a_linked_folder_outside_is_found_through_the_link() {
    let g = indexed(&[]);
    let outside = g.tmp.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::copy(g.image(4), outside.join("z.png")).expect("copy");
    std::os::unix::fs::symlink(&outside, g.images.join("ext")).expect("symlink");
    let out = ok(&["index", g.dir(), "-m", &g.model, "-o", &g.idx, "--append"]);
    assert!(out.contains("(1 new, 12 kept, 0 skipped)"), "{out}");
    let via_link = g.images.join("ext/z.png");
    let v = g.query_json(via_link.to_str().expect("path"), "smiling", "12", &[]);
    let ids = result_ids(&v);
    assert_eq!(ids.len(), 12, "{v}");
    assert!(!ids.contains(&"ext/z.png"), "{ids:?}");
    // With --include-self it is back, at distance 0 beside the image it copies.
    let v = g.query_json(
        via_link.to_str().expect("path"),
        "smiling",
        "2",
        &["--include-self"],
    );
    let mut top = result_ids(&v);
    top.sort();
    assert_eq!(top, ["000004.png", "ext/z.png"], "{v}");
}

#[test]
fn one_gallery_named_two_ways_is_indexed_once() {
    let g = indexed(&[]);
    // Through `..` and through a symbolic link: the same 12 images.
    let dotted = format!("{}/img_align_celeba/..", g.dir());
    let link = g.tmp.path().join("link");
    std::os::unix::fs::symlink(g.tmp.path(), &link).expect("symlink");
    for dir in [dotted.as_str(), link.to_str().expect("path")] {
        let out = ok(&["index", dir, "-m", &g.model, "-o", &g.idx, "--append"]);
        assert!(out.contains("(0 new, 12 kept, 0 skipped)"), "{dir}: {out}");
    }
    // A link loop inside the gallery is listed once, not followed forever, and
    // an image reached through it is still the gallery's own (left out of its
    // results, its value known).
    std::os::unix::fs::symlink(&g.images, g.images.join("loop")).expect("symlink");
    // So is an image linked under another name inside the gallery; a link to a
    // file the walk does not list (content-addressed storage names files by
    // hash, with no extension) is the image.
    std::os::unix::fs::symlink(g.images.join("000004.png"), g.images.join("alias.png"))
        .expect("symlink");
    std::fs::create_dir(g.images.join(".cache")).expect("mkdir");
    std::fs::copy(g.image(5), g.images.join(".cache/ab12")).expect("copy");
    std::os::unix::fs::symlink(g.images.join(".cache/ab12"), g.images.join("stored.png"))
        .expect("symlink");
    let out = ok(&["index", g.dir(), "-m", &g.model, "-o", &g.idx, "--append"]);
    assert!(out.contains("(1 new, 12 kept, 0 skipped)"), "{out}");
    let via_alias = g.query_json(
        g.images.join("alias.png").to_str().expect("path"),
        "smiling",
        "11",
        &[],
    );
    assert_eq!(via_alias["query_label"], true, "{via_alias}");
    let via_loop = g.images.join("loop/000004.png");
    let v = g.query_json(via_loop.to_str().expect("path"), "smiling", "11", &[]);
    assert_eq!(v["query_label"], true, "{v}");
    let ids = result_ids(&v);
    assert_eq!(ids.len(), 11);
    assert!(!ids.contains(&"000004.png"), "{ids:?}");

    // A dataset whose image folder is a link elsewhere: its `Anno/` is found
    // beside the link, and appending finds nothing new.
    let data = g.tmp.path().join("linked");
    std::fs::create_dir_all(data.join("Anno")).expect("mkdir");
    std::fs::copy(
        g.tmp.path().join("Anno/list_attr_celeba.txt"),
        data.join("Anno/list_attr_celeba.txt"),
    )
    .expect("copy");
    std::os::unix::fs::symlink(&g.images, data.join("img_align_celeba")).expect("symlink");
    let linked_idx = g.tmp.path().join("linked.modidx");
    let linked_idx = linked_idx.to_str().expect("path");
    let data = data.to_str().expect("path");
    // The 12 and `stored.png`, which has no attribute values.
    let out = ok(&["index", data, "-m", &g.model, "-o", linked_idx]);
    assert!(out.contains("(13 new, 0 kept, 0 skipped)"), "{out}");
    let out = ok(&["index", data, "-m", &g.model, "-o", linked_idx, "--append"]);
    assert!(out.contains("(0 new, 13 kept, 0 skipped)"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "eval", "--index", linked_idx, "--tasks", "smiling", "--json",
    ]))
    .expect("json");
    assert_eq!(v["tasks"][0]["queries"], 12, "{v}");

    // The image folder given as `.` from inside it still finds its attributes.
    let idx = g.tmp.path().join("dot.modidx");
    let out = Command::new(env!("CARGO_BIN_EXE_modrt"))
        .current_dir(&g.images)
        .args([
            "index",
            ".",
            "-m",
            &g.model,
            "-o",
            idx.to_str().expect("path"),
        ])
        .output()
        .expect("run modrt");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--index",
        idx.to_str().expect("path"),
        "--tasks",
        "smiling",
        "--json",
    ]))
    .expect("json");
    assert_eq!(v["tasks"][0]["queries"], 12, "{v}");
}

#[test]
fn an_index_never_replaces_the_package_an_image_or_a_label_list() {
    let g = indexed(&[]);
    let labels = g.tmp.path().join("Anno/list_attr_celeba.txt");
    let labels = labels.to_str().expect("path");
    let image = g.image(3);
    let keep = [&g.model, labels, &image].map(|p| std::fs::read(p).expect("read"));
    let index = |out: &str, want: &str| fails(&["index", g.dir(), "-m", &g.model, "-o", out], want);
    index(&g.model, "is the package, an input");
    index(&image, "exists and is not a modkit gallery index");
    index(labels, "exists and is not a modkit gallery index");
    index(g.dir(), "is a folder");
    let nowhere = g.tmp.path().join("nowhere/g.modidx");
    index(nowhere.to_str().expect("path"), "does not exist");
    for (p, bytes) in [&g.model, labels, &image].iter().zip(&keep) {
        assert_eq!(&std::fs::read(p).expect("read"), bytes, "{p} changed");
    }
    // The old index is rebuilt in place.
    ok(&["index", g.dir(), "-m", &g.model, "-o", &g.idx]);
}

#[test]
fn appending_keeps_the_indexs_tasks_and_takes_task_lists_as_typed() {
    let g = indexed(&["--tasks", "young,smiling"]);
    let append = |extra: &[&str]| {
        let mut args = vec!["index", g.dir(), "-m", &g.model, "-o", &g.idx, "--append"];
        args.extend_from_slice(extra);
        ok(&args)
    };
    // Without --tasks, or with the same tasks in another order or spacing.
    for extra in [
        &[][..],
        &["--tasks", "smiling, young"],
        &["--tasks", "Young,Smiling"],
    ] {
        let out = append(extra);
        assert!(
            out.contains("(0 new, 12 kept, 0 skipped) x 2 tasks"),
            "{extra:?}: {out}"
        );
    }
    // Another set is refused, saying what to do.
    fails(
        &[
            "index",
            g.dir(),
            "-m",
            &g.model,
            "-o",
            &g.idx,
            "--append",
            "--tasks",
            "smiling",
        ],
        "leave out --tasks",
    );
    // A stray comma is named as such, everywhere a task list is read.
    let q = g.image(2);
    fails(
        &["eval", "--index", &g.idx, "--tasks", "smiling,"],
        "empty task name",
    );
    fails(
        &[
            "query", &q, "--task", "smiling,", "-m", &g.model, "--index", &g.idx,
        ],
        "empty task name",
    );
    let v = g.query_json(&q, " smiling , young", "3", &[]);
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(2), "{v}");
}

#[test]
fn precision_is_over_the_results_whose_value_is_known() {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = gallery(tmp.path());
    // An image the label list does not know.
    std::fs::copy(images.join("000001.png"), images.join("000099.png")).expect("copy");
    let model = pretrained();
    let m = model.to_str().expect("path");
    let idx = tmp.path().join("g.modidx");
    let i = idx.to_str().expect("path");
    ok(&[
        "index",
        tmp.path().to_str().expect("path"),
        "-m",
        m,
        "-o",
        i,
    ]);
    let q = images.join("000004.png");
    let q = q.to_str().expect("path");
    let args = [
        "query", q, "--task", "smiling", "-m", m, "--index", i, "-k", "12",
    ];
    let text = ok(&args);
    assert!(
        text.contains("12 nearest of 12 images (itself left out)")
            && text.contains("over the 11 of 12 results whose smiling value is known"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&[&args[..], &["--json"]].concat())).expect("json");
    assert_eq!(v["labelled"], 11);
    // Besides the query, 5 labelled images smile and 6 do not: 5 of 11.
    let p = v["precision"].as_f64().expect("precision");
    assert!((p - 5.0 / 11.0).abs() < 1e-9, "{p}");
}

/// An image whose file name is not UTF-8 is left out and said so (an id is a
/// string); a gallery of nothing else is refused with the reason.
#[test]
fn images_with_non_utf8_names_are_skipped_with_the_reason() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let images = gallery(tmp.path());
    let bad = std::ffi::OsStr::from_bytes(b"bad\xff\xfename.png");
    std::fs::copy(images.join("000001.png"), images.join(bad)).expect("copy");
    let model = pretrained().to_str().expect("path").to_string();
    let idx = tmp.path().join("g.modidx");
    let args = ["index", tmp.path().to_str().expect("path"), "-m", &model];
    let out = modrt(&[&args[..], &["-o", idx.to_str().expect("path")]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(12 new, 0 kept, 1 skipped)"),
        "{err}"
    );
    assert!(
        err.contains("skipped bad") && err.contains("file name is not UTF-8"),
        "{err}"
    );
    let only = tmp.path().join("only");
    std::fs::create_dir_all(&only).expect("mkdir");
    std::fs::copy(images.join("000001.png"), only.join(bad)).expect("copy");
    let only = only.to_str().expect("path");
    fails(
        &[
            "index",
            only,
            "-m",
            &model,
            "-o",
            idx.to_str().expect("path"),
        ],
        "every image's file name is not UTF-8",
    );
    // The attribute list: not UTF-8, or a folder, is named, not read as none.
    let attr = tmp.path().join("Anno/list_attr_celeba.txt");
    std::fs::write(&attr, b"12\nSmiling Young\n000001.png 1 \xff\n").expect("attr");
    let again = [&args[..], &["-o", idx.to_str().expect("path")]].concat();
    fails(&again, "line 3: is not UTF-8 text; save the file as UTF-8");
    std::fs::remove_file(&attr).expect("rm");
    std::fs::create_dir(&attr).expect("mkdir");
    fails(&again, "list_attr_celeba.txt\" is not a file");
}
