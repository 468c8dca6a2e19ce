#!/usr/bin/env bash
# The paper's Table 1 on the built-in faces (tiny spec): smiling, mouth_slightly_open
# and young trained jointly by a fully shared network (FSN), by independent
# networks (ITN), by the modulated network, and by the modulated network with the
# task-relation regulariser of eq. 8 (smiling is closer to mouth_slightly_open than
# to young); UCR measured on every minibatch for the runs with shared weights.
# Ends with `modtrain report` of the four (tables on stdout, plots in OUT/runs/report).
# Usage: scripts/table1.sh [OUT_DIR] [extra modtrain train flags…]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/table1}
shift || true
mkdir -p "$out"
cargo build --release -q -p modkit-trainer --bin modtrain
bin=target/release/modtrain
[ -d "$out/data" ] || "$bin" synth --out "$out/data" --n "${N:-6000}" --size 48 --seed 0
common=(--data "celeba:$out/data" --spec tiny --tasks smiling,mouth_slightly_open,young
  --optimizer adam --lr 0.003 --mining batch-all --batch-per-task 4
  --epochs "${EPOCHS:-6}" --triplets-per-task "${TRIPLETS:-300}")
run() {
  local name=$1
  shift
  echo "== $name" >&2
  "$bin" train "${common[@]}" "$@" -o "$out/runs/$name.safetensors" 2>&1 \
    | grep -v ": step " >&2
}
run itn --variant independent "$@"
run fsn --variant shared --ucr-every 1 "$@"
run ours --variant modulated --ucr-every 1 "$@"
run ours-eq8 --variant modulated --ucr-every 1 \
  --task-relation smiling,mouth_slightly_open,young "$@"
"$bin" report "$out/runs"
