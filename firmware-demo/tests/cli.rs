//! `firmware-demo --once` with the shipped pretrained package: frames per query ×
//! task, k larger than the gallery, a gallery image gone since indexing, and
//! one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// `-m MODEL -i INDEX --queries QUERIES` then `rest`.
fn args<'a>(model: &'a Path, index: &'a Path, queries: &'a Path, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-m",
        model.to_str().expect("p"),
        "-i",
        index.to_str().expect("p"),
        "--queries",
        queries.to_str().expect("p"),
    ];
    args.extend_from_slice(rest);
    args
}

/// Four gallery images and two query images, distinct colour patterns, beside a
/// query file that is no image (the `._q0.jpg` a Mac leaves on a USB stick; it
/// sorts first).
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
    std::fs::write(queries.join("._q0.jpg"), b"\0\x05\x16\x07 not an image").expect("junk");
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
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skipping query 1 of 3") && err.contains("._q0.jpg"),
        "{err}"
    );
    // g2.png is in every ranking of 4: said once, as gone since indexing.
    assert_eq!(
        err.matches("1 of 4 result images are not under").count(),
        1,
        "{err}"
    );
    assert!(err.contains("removed since indexing?"), "{err}");
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
    let (gallery, queries, idx) = setup(tmp.path());
    let model = pretrained();
    let m = model.to_str().expect("p");
    let i = idx.to_str().expect("p");
    let q = queries.to_str().expect("p");
    let none = tmp.path().join("none");
    let none = none.to_str().expect("p");
    let text = tmp.path().join("text");
    std::fs::write(&text, "hello\n").expect("text");
    let text = text.to_str().expect("p");
    let junk = tmp.path().join("junk");
    std::fs::create_dir_all(&junk).expect("mkdir");
    std::fs::write(junk.join("a.png"), b"not a png").expect("junk");
    let junk = junk.to_str().expect("p");
    let onto_index = format!("png:{i}");
    let onto_query = format!("png:{}", queries.join("q1.png").display());
    let nowhere = format!("png:{}/nowhere/{{}}.png", tmp.path().display());
    let no_fb = format!("fb:{}", tmp.path().join("fb9").display());
    let cases: [(&[&str], &str); 16] = [
        (
            &["-m", m, "-i", i, "--queries", q, "--gpio", none],
            "/sys/class/gpio/export",
        ),
        (
            &["-m", m, "-i", i, "--queries", q, "--gpio", text],
            "not 0 or 1",
        ),
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
            "--task \"smile\": the package",
        ),
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--task",
                "young,Young",
                "--once",
            ],
            "\"young\" is asked for twice",
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
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--size",
                "8192x8192",
                "--once",
            ],
            "from 160x120 to 4096x4096",
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
                "png:",
                "--once",
            ],
            "names no file; give a path",
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
                &no_fb,
                "--once",
            ],
            "fb9: no such framebuffer; name one that `ls /dev/fb*` lists",
        ),
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--gallery",
                none,
                "--once",
            ],
            "none\": no such folder; give the folder the index was built from",
        ),
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--gallery",
                text,
                "--once",
            ],
            "text\" is a file; give the folder the index was built from",
        ),
        (
            &["-m", m, "-i", i, "--queries", none, "--once"],
            "a query image or a folder of them",
        ),
        (
            &["-m", m, "-i", q, "--queries", q, "--once"],
            "Is a directory",
        ),
        // A frame never replaces an input.
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--display",
                &onto_index,
                "--once",
            ],
            "is the index, an input",
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
                &onto_query,
                "--once",
            ],
            "is a query image, an input",
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
                &nowhere,
                "--once",
            ],
            "does not exist",
        ),
    ];
    for (args, want) in cases {
        let out = demo(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Options that would be ignored are refused by the parser.
    let frame = format!("png:{}", tmp.path().join("frame.png").display());
    let ignored: [(&[&str], &str); 2] = [
        (
            &[
                "-m",
                m,
                "-i",
                i,
                "--queries",
                q,
                "--display",
                &frame,
                "--json",
            ],
            "--once",
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
                &frame,
                "--threads",
                "1000",
                "--once",
            ],
            "1000 is not in 1..=64",
        ),
    ];
    for (args, want) in ignored {
        let out = demo(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Nor an image of the gallery (a PNG modkit did not write: refused as one
    // before the gallery is read).
    let image = gallery.join("g2.png");
    let before = std::fs::read(&image).expect("read");
    let onto = format!("png:{}", image.display());
    let out = demo(&[
        "-m",
        m,
        "-i",
        i,
        "--queries",
        q,
        "--display",
        &onto,
        "--once",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a PNG image modkit wrote"), "{err}");
    assert_eq!(std::fs::read(&image).expect("read"), before);
    // Found before any work where only a later frame would land on one: q1's
    // frame is an image of this gallery, q0's (drawn first) is not.
    let shelf = tmp.path().join("shelf");
    std::fs::create_dir_all(&shelf).expect("mkdir");
    std::fs::copy(gallery.join("g0.png"), shelf.join("q1-smiling.png")).expect("copy");
    std::fs::copy(gallery.join("g1.png"), shelf.join("other.png")).expect("copy");
    let loaded = Model::load(&model).expect("pretrained");
    let tasks = loaded.select_tasks(&[]).expect("tasks");
    let (shelf_idx, _) = index::build(&loaded, &shelf, &tasks, None, &|_, _| {}).expect("index");
    let shelf_i = tmp.path().join("shelf.modidx");
    shelf_idx.save(&shelf_i).expect("save");
    let into = format!("png:{}/{{}}.png", shelf.display());
    let out = demo(&[
        "-m",
        m,
        "-i",
        shelf_i.to_str().expect("p"),
        "--queries",
        q,
        "--task",
        "smiling",
        "--display",
        &into,
        "--once",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("q1-smiling.png\" is an image of the gallery"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&shelf).expect("ls").count(),
        2,
        "no frame written"
    );
    // No readable query at all: the skip, then the error.
    let out = demo(&["-m", m, "-i", i, "--queries", junk, "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.trim().lines().collect();
    assert!(
        lines.len() == 2
            && lines[0].contains("skipping query 1 of 1")
            && lines[1].contains("none of the 1 query images"),
        "{err}"
    );
}

#[test]
fn gallery_moved_is_found_through_gallery_and_missing_images_are_said_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (gallery, queries, idx) = setup(tmp.path());
    // The indexed folder, moved into a CelebA layout (as `modtrain synth` writes).
    let moved = tmp.path().join("moved");
    std::fs::create_dir_all(&moved).expect("mkdir");
    std::fs::rename(&gallery, moved.join("img_align_celeba")).expect("mv");
    let model = pretrained();
    let frames = format!("png:{}", tmp.path().join("f-{}.png").display());
    let run = |gallery: Option<&Path>| {
        let mut args = args(
            &model,
            &idx,
            &queries,
            &["--task", "smiling,young", "--once", "--display", &frames],
        );
        if let Some(g) = gallery {
            args.extend(["--gallery", g.to_str().expect("p")]);
        }
        let out = demo(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{gallery:?}: {err}");
        err
    };
    // Not where indexed: said once for 4 frames, with what to do.
    let err = run(None);
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("result images are not under"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(
        said[0].contains("4 of 4") && said[0].contains("pass --gallery with the folder"),
        "{err}"
    );
    assert_eq!(err.matches("frame: ").count(), 4, "{err}");
    // The CelebA-layout root, as `modrt index` takes it, or its image folder.
    for g in [moved.clone(), moved.join("img_align_celeba")] {
        let err = run(Some(&g));
        assert!(!err.contains("not under"), "{g:?}: {err}");
    }
}

#[test]
fn frames_of_two_queries_never_go_to_one_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (gallery, _, idx) = setup(tmp.path());
    let queries = tmp.path().join("same");
    std::fs::create_dir_all(&queries).expect("mkdir");
    let img = image::open(gallery.join("g0.png")).expect("png").to_rgb8();
    img.save(queries.join("a.png")).expect("png");
    img.save(queries.join("a.jpg")).expect("jpg");
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let display = format!("png:{}", out_dir.join("dd-{}.png").display());
    let model = pretrained();
    let out = demo(&args(
        &model,
        &idx,
        &queries,
        &["--task", "smiling", "--once", "--display", &display],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("queries \"a.jpg\" and \"a.png\" would both be written to")
            && err.contains("dd-a-smiling.png")
            && err.contains("rename one of them"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&out_dir).expect("ls").count(),
        0,
        "no frame written"
    );
}

#[test]
fn a_task_the_package_lacks_is_not_a_task_to_index() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (gallery, queries, _) = setup(tmp.path());
    // An index of two of the package's tasks.
    let loaded = Model::load(&pretrained()).expect("pretrained");
    let tasks = loaded
        .select_tasks(&["smiling".into(), "young".into()])
        .expect("tasks");
    let (sub, _) = index::build(&loaded, &gallery, &tasks, None, &|_, _| {}).expect("index");
    let sub_i = tmp.path().join("sub.modidx");
    sub.save(&sub_i).expect("save");
    let model = pretrained();
    let run = |task: &str| {
        let out = demo(&args(&model, &sub_i, &queries, &["--task", task, "--once"]));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{task}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    // Not in the package: no index can hold it; the package's tasks are listed.
    let err = run("nope");
    assert!(
        err.contains("--task \"nope\": the package")
            && err.contains("has no such task")
            && err.contains("bald")
            && !err.contains("rebuild"),
        "{err}"
    );
    // In the package, not in the index: rebuilding the index is the fix.
    let err = run("bald");
    assert!(err.contains("`--tasks smiling,young,bald`"), "{err}");
}

#[test]
fn a_button_keeps_the_demo_running_without_stdin_and_pipes_may_close() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_, queries, idx) = setup(tmp.path());
    let model = pretrained();
    let gpio = tmp.path().join("value");
    std::fs::write(&gpio, "1\n").expect("gpio");
    let frames = tmp.path().join("frame-{}.png");
    let display = format!("png:{}", frames.display());
    let mut args = vec![
        "-m",
        model.to_str().expect("p"),
        "-i",
        idx.to_str().expect("p"),
        "--queries",
        queries.to_str().expect("p"),
        "--task",
        "smiling,young",
        "--no-timings",
        "--display",
        &display,
    ];
    // Interactive, stdin at its end (as under systemd), a button polled: the first
    // frame is drawn, the demo keeps running, and a press shows the next task.
    let mut gpio_args = args.clone();
    gpio_args.extend(["--gpio", gpio.to_str().expect("p")]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_firmware-demo"))
        .args(&gpio_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let wait_for = |name: &str| {
        let path = tmp.path().join(name);
        let start = Instant::now();
        while !path.exists() && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        path.exists()
    };
    let first = wait_for("frame-q0-smiling.png");
    std::thread::sleep(Duration::from_millis(300));
    let running = child.try_wait().expect("try_wait").is_none();
    std::fs::write(&gpio, "0\n").expect("press");
    let pressed = wait_for("frame-q0-young.png");
    // The value file gone (the pin unexported): said once, not every poll.
    std::fs::remove_file(&gpio).expect("rm");
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        first && running && pressed,
        "first {first}, running {running}, pressed {pressed}: {err}"
    );
    assert_eq!(err.matches("--gpio").count(), 1, "{err}");
    assert!(
        err.contains("the button does nothing until the file reads again"),
        "{err}"
    );

    // Without a button, the end of stdin quits (exit 0).
    let o = Command::new(env!("CARGO_BIN_EXE_firmware-demo"))
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // `--once | head -0` with k far past the gallery: no panic, exit 0.
    args.extend(["--once", "-k", "100000000000"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_firmware-demo"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains("panicked"), "{err}");
}
