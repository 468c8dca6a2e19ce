#!/usr/bin/env bash
# Builds modtrain with `--features cuda` on a lent GPU machine (see the device tool
# of this workplace) and times its training step against PyTorch on the same GPU.
# That machine has CUDA, cuDNN and PyTorch but no Rust and no network: the toolchain
# and the vendored sources travel as archives made by scripts/gpu/pack.sh, in three
# calls because one call carries at most 64 MiB (the machine stays warm 30 s between):
#   call 1, carry [".gpu/a"]:  bash scripts/gpu/bench.sh stage
#   call 2, carry [".gpu/c"]:  bash scripts/gpu/bench.sh stage
#   call 3, carry [".gpu/b"]:  bash scripts/gpu/bench.sh [CONFIG…]   (default paper@150 paper@64 tiny@48)
# Output: a table per config, the CUDA-vs-CPU test, a short CUDA training run;
# logs and JSON under $OUT. Env: STEPS (default 20), SKIP_TEST=1, SKIP_TRAIN=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=/opt/modkit-stage
out=${OUT:-/tmp/modkit-out}
mkdir -p "$stage" "$out"

if [ "${1:-}" = stage ]; then
    cp .gpu/*/* "$stage/"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null || true
    command -v cc gcc python3 || true
    ls "$stage"
    exit 0
fi
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(paper@150 paper@64 tiny@48)
log() { echo "== $* ($(date +%T))"; }

log toolchain
if [ ! -e /opt/rust/.complete ]; then
    mkdir -p /opt/rust
    cp .gpu/b/* "$stage/"
    cat "$stage"/toolchain.tar.xz.a? | xz -d -T0 | tar x -C /opt/rust
    # The sysroot's rlibs are metadata stubs: rustc needs the .rmeta beside them.
    xz -d -T0 < "$stage/rmeta.tar.xz" | tar x -C /opt/rust
    touch /opt/rust/.complete
fi
export PATH=/opt/rust/bin:$PATH
rustc --version

log CUDA
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc 2>/dev/null | head -1)
[ -n "$nvcc" ] || { echo "no nvcc on this machine" >&2; exit 1; }
export PATH=$(dirname "$nvcc"):$PATH
export CUDA_HOME=$(dirname "$(dirname "$nvcc")")
nvcc --version | tail -2
# cudarc links -lcuda -lcublas -lcublasLt -lcurand -lnvrtc: find each (system CUDA,
# the driver's folder or PyTorch's pip wheels) and give the linker unversioned names.
libs=/opt/modkit-cudalibs
mkdir -p "$libs"
ld_dirs=""
for l in cuda cublas cublasLt curand nvrtc; do
    f=$(find "$CUDA_HOME" /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 /opt /usr/local/lib \
        \( -name "lib$l.so" -o -name "lib$l.so.[0-9]*" \) 2>/dev/null | grep -v -e stubs -e "$libs" | sort | head -1)
    [ -n "$f" ] || { echo "lib$l.so not found" >&2; exit 1; }
    echo "lib$l: $f"
    ln -sf "$f" "$libs/lib$l.so"
    ld_dirs="$ld_dirs:$(dirname "$f")"
done
export LIBRARY_PATH=$libs${LIBRARY_PATH:+:$LIBRARY_PATH}
export LD_LIBRARY_PATH=$libs$ld_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
export CUDA_COMPUTE_CAP=${cap:-90}

log sources
ws=/opt/modkit-ws
if [ ! -d /opt/modkit-vendor/vendor ]; then
    mkdir -p /opt/modkit-vendor
    xz -d -T0 < "$stage/vendor.tar.xz" | tar x -C /opt/modkit-vendor
fi
mkdir -p "$ws/.cargo"
rm -rf "$ws/models" "$ws/trainer" "$ws/third_party"
cp -r models trainer third_party Cargo.lock "$ws/"
sed 's/^members = .*/members = ["models", "trainer"]/' Cargo.toml > "$ws/Cargo.toml"
cat > "$ws/.cargo/config.toml" <<'TOML'
[source.crates-io]
replace-with = "vendored-sources"
[source.vendored-sources]
directory = "/opt/modkit-vendor/vendor"
[net]
offline = true
TOML

log build
(cd "$ws" && cargo build --release -p modkit-trainer --features cuda --bin modtrain 2>&1 | tail -30)
bin=$ws/target/release/modtrain
"$bin" --version

if [ -z "${SKIP_TEST:-}" ]; then
    log "test: a CUDA step matches the CPU's"
    (cd "$ws" && cargo test --release -p modkit-trainer --features cuda --lib cuda_step_matches_cpu \
        -- --nocapture 2>&1 | grep -v '^ *Compiling' | tail -12) | tee "$out/cuda-test.log" \
        || echo "TEST FAILED (log: $out/cuda-test.log)"
fi

log bench
for c in "${configs[@]}"; do
    spec=${c%@*}
    size=${c#*@}
    json="$out/$spec-$size.json"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "/tmp/mem-$spec-$size.txt" &
    mon=$!
    "$bin" bench-step --spec "$spec" --size "$size" --device cuda --steps "${STEPS:-20}" --json \
        > "$json" || { kill $mon; echo "bench-step $c FAILED"; continue; }
    kill $mon
    echo "$c: modtrain's peak GPU memory (nvidia-smi): $(sort -n "/tmp/mem-$spec-$size.txt" | tail -1) MiB"
    python3 scripts/torch_step.py "$json" | tee "$out/$spec-$size.md"
    TORCH_TF32=0 python3 scripts/torch_step.py "$json" | grep -e 'images per second' -e 'step (no' \
        | sed 's/^/TF32 off: /' | tee -a "$out/$spec-$size.md"
done

if [ -z "${SKIP_TRAIN:-}" ]; then
    log "train: paper spec on the GPU"
    "$bin" train --data synth --synth-images 3000 --spec paper --device cuda --epochs 2 \
        --triplets-per-task 200 --optimizer adam --lr 0.003 --mining batch-all \
        -o /tmp/modkit-gpu/paper.safetensors 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -12 \
        | tee "$out/train.log"
fi
log done
