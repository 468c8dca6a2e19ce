#!/usr/bin/env bash
# Times one training step of modtrain and of the same network in PyTorch (CPU), in
# one run, for the paper spec at 64×64 and 150×150 and the tiny spec (the trainer
# speed targets: modtrain's step ≤ 1.2× PyTorch's, ≤ 3× its own forward, ≥ 50% of
# the GEMM peak). Installs Debian's python3-torch when it is missing.
#
# Usage: scripts/compare_torch.sh [CONFIG…]   CONFIG = spec@size, e.g. paper@64
# Env:   THREADS (default 2), STEPS (timed steps per config; default 30 for the tiny
#        spec, whose 50–90 ms steps a median of 5 left at the mercy of one noisy
#        second, and 5 for the paper spec), OUT (default out/torch-compare),
#        PYTHON (default /usr/bin/python3: Debian's, which python3-torch installs into)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
out=${OUT:-out/torch-compare}
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(tiny@48 paper@64 paper@150)

py=${PYTHON:-/usr/bin/python3}
if ! "$py" -c 'import torch' 2>/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing python3-torch (Debian's PyTorch CPU build)…" >&2
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q python3-torch >&2
fi
cargo build --release -q -p modkit-trainer --bin modtrain
mkdir -p "$out"
for c in "${configs[@]}"; do
    spec=${c%@*}
    size=${c#*@}
    steps=${STEPS:-5}
    [ -n "${STEPS:-}" ] || [ "$spec" != tiny ] || steps=30
    json="$out/$spec-$size.json"
    RAYON_NUM_THREADS=$threads target/release/modtrain bench-step --spec "$spec" --size "$size" \
        --steps "$steps" --json > "$json"
    "$py" scripts/torch_step.py "$json" | tee "$out/$spec-$size.md"
    echo
done
