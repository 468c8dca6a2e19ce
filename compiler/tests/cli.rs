//! The `modc` command line.

use std::process::{Command, Output};

use modkit_models::Variant;

mod common;

fn modc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modc"))
        .args(args)
        .output()
        .expect("runs modc")
}

/// Exit status 2 and one line on stderr that contains `want`.
fn fails(args: &[&str], want: &str) {
    let out = modc(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        err.trim().lines().count() == 1 && err.contains(want),
        "{args:?}: {err}"
    );
}

/// A small modulated checkpoint over smiling and young, `m.safetensors` in a
/// fresh folder.
fn checkpoint_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let ckpt = dir.path().join("m.safetensors");
    common::checkpoint(&common::small(), Variant::Modulated, &["smiling", "young"])
        .save(&ckpt)
        .expect("save");
    (dir, ckpt)
}

#[test]
fn compile_inspect_verify_export() {
    let (dir, ckpt) = checkpoint_file();
    let c = ckpt.to_str().expect("utf8");
    let pkg = dir.path().join("m.modpack");
    let p = pkg.to_str().expect("utf8");

    let o = modc(&["compile", c, "-o", p, "--fold-tasks", "young"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = modc(&["inspect", p, "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(r["mode"], "mixed");
    assert_eq!(r["vectors_per_task"]["params"], 8 + 8 + 8);
    // The text names what a folded task costs too.
    let o = modc(&["inspect", p]);
    let text = String::from_utf8_lossy(&o.stdout);
    let folded = r["folded_tails"][0][1]["params"].as_u64().expect("params");
    assert!(
        text.contains(&format!(
            "a folded one adds its tail as well: {folded} parameters"
        )),
        "{text}"
    );

    let o = modc(&["verify", p, "--against", c]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("ok: all 2 tasks"),
        "{out}"
    );
    // A task asked for twice, in any spelling, is refused, not compiled twice.
    let twice = dir.path().join("twice.modpack");
    let t = twice.to_str().expect("utf8");
    for list in [
        ["--tasks", "smiling,Smiling"],
        ["--fold-tasks", "young,young"],
    ] {
        let o = modc(&["compile", c, "-o", t, list[0], list[1]]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("is asked for twice"), "{err}");
        assert!(!twice.exists());
    }

    // An f16 package passes with the default tolerance for its precision; no images
    // or a negative tolerance is an error, not a pass.
    let half = dir.path().join("half.modpack");
    let h = half.to_str().expect("utf8");
    let o = modc(&["compile", c, "-o", h, "--precision", "f16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = modc(&["verify", h, "--against", c]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("within 2.0e-2"), "{out}");
    for (arg, want) in [
        ("--images=0", "--images 1"),
        ("--images=18446744073709551615", "at most 64"),
        ("--tolerance=-1", "finite number ≥ 0"),
        ("--tolerance=inf", "--tolerance inf: give a finite number"),
    ] {
        let o = modc(&["verify", p, "--against", c, arg]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains(want) && err.trim().lines().count() == 1,
            "{err}"
        );
    }

    // `modc verify … | head -0`: the reader is gone before the table; not a panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_modc"))
        .args(["verify", p, "--against", c])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs modc");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("waits");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains("panicked"), "{err}");

    // Against a different checkpoint of the same shape: verify fails with exit 2.
    let other = dir.path().join("other.safetensors");
    let mut ck = common::checkpoint(&common::small(), Variant::Modulated, &["smiling", "young"]);
    for t in ck.tensors.values_mut() {
        t.data.iter_mut().for_each(|v| *v *= 1.5);
    }
    ck.save(&other).expect("save");
    let o = modc(&["verify", p, "--against", other.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("exceeds --tolerance") && err.contains("name that one with --against"),
        "{err}"
    );
    // `--fold-tasks ALL` is `all` (task names are case-insensitive), and a
    // package written to /dev/null is reported at its real size.
    let o = modc(&["compile", c, "-o", "/dev/null", "--fold-tasks", "ALL"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let size: usize = err
        .split_once("tasks, ")
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .expect("size");
    let all = dir.path().join("all.modpack");
    let o = modc(&[
        "compile",
        c,
        "-o",
        all.to_str().expect("utf8"),
        "--fold-tasks",
        "all",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(size as u64, std::fs::metadata(&all).expect("all").len());

    let onnx = dir.path().join("smiling.onnx");
    let o = modc(&[
        "export-onnx",
        c,
        "--task",
        "smiling",
        "-o",
        onnx.to_str().expect("utf8"),
    ]);
    assert!(
        o.status.success() && onnx.exists(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn bad_input_gets_one_line_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let junk = dir.path().join("junk.modpack");
    std::fs::write(&junk, b"not a package at all").expect("write");
    let j = junk.to_str().expect("utf8");
    let fresh = dir.path().join("fresh.modpack");
    let f = fresh.to_str().expect("utf8");
    let cases: [(&[&str], &str); 4] = [
        (&["inspect", j], "not a modkit package"),
        (
            &["compile", "/nonexistent.safetensors", "-o", f],
            "/nonexistent.safetensors",
        ),
        (&["compile", j, "-o", j, "--precision", "int4"], "int4"),
        // Junk handed over as the checkpoint: no safetensors file.
        (
            &["compile", j, "-o", f],
            "not a modkit checkpoint (not a safetensors file)",
        ),
    ];
    for (args, want) in cases {
        fails(args, want);
    }
}

#[test]
fn outputs_never_replace_an_input_or_another_kind_of_file() {
    let (dir, ckpt) = checkpoint_file();
    let before = std::fs::read(&ckpt).expect("read");
    let c = ckpt.to_str().expect("utf8");
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("sub");
    let image = dir.path().join("face.png");
    std::fs::write(&image, b"\x89PNG\r\n\x1a\n and the rest").expect("png");
    let other_spelling = sub.join("../m.safetensors");
    let o = |p: &std::path::Path| p.to_str().expect("utf8").to_string();
    let (again, img, folder) = (o(&other_spelling), o(&image), o(&sub));
    let cases: [(&[&str], &str); 7] = [
        (&["compile", c, "-o", c], "is the checkpoint, an input"),
        (&["compile", c, "-o", &again], "is the checkpoint, an input"),
        (
            &["export-onnx", c, "--task", "smiling", "-o", c],
            "is the checkpoint",
        ),
        (
            &["compile", c, "-o", &img],
            "exists and is not a modkit package",
        ),
        (
            &["export-onnx", c, "--task", "smiling", "-o", &img],
            "is not an ONNX model",
        ),
        (&["compile", c, "-o", &folder], "is a folder"),
        (
            &["compile", c, "-o", "/nonexistent/dir/m.modpack"],
            "does not exist",
        ),
    ];
    for (args, want) in cases {
        fails(args, want);
    }
    assert_eq!(std::fs::read(&ckpt).expect("read"), before);
    // An old package and an old export are replaced: that is how a rerun updates them.
    let pkg = dir.path().join("m.modpack");
    let onnx = dir.path().join("m.onnx");
    for _ in 0..2 {
        let out = modc(&["compile", c, "-o", &o(&pkg)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = modc(&["export-onnx", c, "--task", "young", "-o", &o(&onnx)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
