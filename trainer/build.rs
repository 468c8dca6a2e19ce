//! With the `cuda` feature, compiles the trainer's own CUDA kernels
//! (`src/ops/maxpool.cu`, `src/inplace.cu`) to PTX with nvcc, for `ops::maxpool`
//! and `inplace` to embed (`$OUT_DIR/maxpool.ptx`, `inplace.ptx`). nvcc is taken
//! from `$CUDA_HOME/bin` or `PATH`; `. scripts/gpu/env.sh` provides one on a machine
//! without CUDA. Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for (src, ptx) in [
        ("src/ops/maxpool.cu", "maxpool.ptx"),
        ("src/inplace.cu", "inplace.ptx"),
    ] {
        println!("cargo::rerun-if-changed={src}");
        // compute_75 (Turing), the oldest CUDA 12 and 13 both target: the driver
        // JIT-compiles the PTX for whatever newer GPU runs it.
        let status = Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_75", "-O3", src, "-o"])
            .arg(out.join(ptx))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{} failed on {src} ({s})", nvcc.display()),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc ({}: {e}); `. scripts/gpu/env.sh` fetches one",
                nvcc.display()
            ),
        }
    }
}
