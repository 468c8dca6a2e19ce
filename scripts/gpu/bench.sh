#!/usr/bin/env bash
# Checks and times the CUDA trainer on a lent GPU machine, in one device call:
#   here:  bash scripts/gpu/build.sh          (packs .gpu/: binaries built with --features cuda)
#   there: carry [".gpu"], command: bash scripts/gpu/bench.sh [CONFIG…]
#          (CONFIG = spec@size; default paper@150 paper@64 tiny@48)
# That machine has the NVIDIA driver, cuDNN and PyTorch (pip wheels) but no Rust:
# it runs the binaries built here, finding the CUDA libraries they load at run time.
# Runs, in order:
#   1. the GPU tests: cuDNN's convolution and BatchNorm and the pooling kernel
#      against the CPU kernels, the optimizers' update kernels against candle's
#      tensor ops, and a whole training step on the GPU (cuDNN and candle's own
#      kernels) against the CPU's;
#   2. per config, `modtrain bench-step --device cuda` with cuDNN (strict FP32, then
#      TF32 allowed), without it (MODTRAIN_CUDNN=0: candle's kernels), and the same
#      network in PyTorch (its defaults, then TF32 off), images/s side by side;
#   3. a short training run of the paper spec on the GPU.
# Output: logs, JSON and tables under $OUT. Env: STEPS (default 10), SKIP_TEST=1,
# SKIP_GENERIC=1 (no MODTRAIN_CUDNN=0 runs), SKIP_TRAIN=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/modkit-gpu-out}
mkdir -p "$out"
log() { echo "== $* ($(date +%T))"; }
[ -e .gpu/modtrain.xz ] || { echo "no .gpu/: run scripts/gpu/build.sh here and carry .gpu" >&2; exit 2; }
cat .gpu/MANIFEST

bin=/tmp/modkit-gpu
mkdir -p "$bin"
for f in modtrain trainer-tests; do
    xz -dc ".gpu/$f.xz" > "$bin/$f"
    chmod +x "$bin/$f"
done
cp .gpu/libcudart.so.13 "$bin/"

log libraries
# The driver's libcuda, and cuBLAS, cuRAND, NVRTC and cuDNN from a CUDA install or
# PyTorch's pip wheels: the folder of the first match of each.
dirs=$bin
for l in cuda.so.1 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudnn.so.9; do
    f=$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda* /opt /usr/local/lib \
        -name "lib$l" 2>/dev/null | grep -v stubs | sort | head -1 || true)
    [ -n "$f" ] || { echo "lib$l not found" >&2; exit 1; }
    echo "lib$l: $f"
    dirs="$dirs:$(dirname "$f")"
done
export LD_LIBRARY_PATH=$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$bin/modtrain" --version

if [ -z "${SKIP_TEST:-}" ]; then
    log "tests: the CUDA nodes, the update kernels and a GPU training step"
    "$bin/trainer-tests" --test-threads 1 cudnn cuda_step in_place_kernels 2>&1 \
        | tee "$out/tests.log" \
        | grep -e '^test ' -e 'test result' -e panicked -e differ -e '‖' || true
fi

log bench
steps=${STEPS:-10}
bench() {  # name, config, env…
    local name=$1 spec=${2%@*} size=${2#*@}
    shift 2
    env "$@" "$bin/modtrain" bench-step --spec "$spec" --size "$size" --device cuda \
        --steps "$steps" --json > "$out/$spec-$size-$name.json" 2> "$out/$spec-$size-$name.err" \
        || { echo "bench-step $spec@$size ($name) FAILED:"; tail -5 "$out/$spec-$size-$name.err"; return 1; }
    python3 - "$out/$spec-$size-$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["median"]
step = m["forward"] + m["backward"] + m["update"]
print(f"modtrain {sys.argv[2]:>8}: step {step * 1e3:7.1f} ms (forward {m['forward'] * 1e3:.1f}, "
      f"backward {m['backward'] * 1e3:.1f}, update {m['update'] * 1e3:.1f}), "
      f"{r['images_per_step'] / step:7.0f} images/s, {r['gemm_kernels']}")
PY
}
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(paper@150 paper@64 tiny@48)
for c in "${configs[@]}"; do
    echo "--- $c"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/mem-$c.txt" &
    mon=$!
    bench cudnn "$c" || true
    kill $mon
    echo "modtrain peak GPU memory (nvidia-smi, cuDNN run): $(sort -n "$out/mem-$c.txt" | tail -1) MiB"
    bench tf32 "$c" MODTRAIN_TF32=1 || true
    [ -n "${SKIP_GENERIC:-}" ] || bench generic "$c" MODTRAIN_CUDNN=0 || true
    json="$out/${c%@*}-${c#*@}-cudnn.json"
    [ -e "$json" ] || continue
    python3 scripts/torch_step.py "$json" | tee "$out/$c-torch.md" \
        | grep -e 'images per second' -e 'step (no' -e 'peak GPU' || true
    TORCH_TF32=0 python3 scripts/torch_step.py "$json" | grep -e 'images per second' -e 'step (no' \
        | sed 's/^/TF32 off: /' | tee -a "$out/$c-torch.md" || true
done

if [ -z "${SKIP_TRAIN:-}" ]; then
    log "train: the paper spec on the GPU"
    "$bin/modtrain" train --data synth --synth-images 3000 --spec paper --device cuda --epochs 2 \
        --triplets-per-task 200 --optimizer adam --lr 0.003 --mining batch-all \
        -o /tmp/modkit-gpu/paper.safetensors 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -8 \
        | tee "$out/train.log"
fi
log done
