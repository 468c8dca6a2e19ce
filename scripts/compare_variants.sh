#!/usr/bin/env bash
# Trains modulated, shared (FSN) and independent (ITN) on the built-in dataset with
# the same data, epochs, triplets and seed, then prints the per-task test triplet
# accuracy of each side by side (the paper's Table 3 comparison, tiny spec).
# Usage: scripts/compare_variants.sh [OUT_DIR] [extra modtrain train flags…]
# PARALLEL=1 trains the three at once, one thread each (RAYON_NUM_THREADS=1; a
# seed and thread count fix the numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/compare}
shift || true
mkdir -p "$out"
cargo build --release -q -p modkit-trainer --bin modtrain
train() {
  target/release/modtrain train --data synth --variant "$1" --json "${@:2}" \
    -o "$out/$1.safetensors" > "$out/$1.json" 2> "$out/$1.log"
  tail -n 2 "$out/$1.log" >&2
}
if [ "${PARALLEL:-0}" = 1 ]; then
  export RAYON_NUM_THREADS=1
  pids=()
  for v in modulated shared independent; do train "$v" "$@" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
else
  for v in modulated shared independent; do train "$v" "$@"; done
fi
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
runs = {v: json.load(open(f"{out}/{v}.json")) for v in ["modulated", "shared", "independent"]}
tasks = list(runs["modulated"]["accuracy"].keys())
print(f"| task | modulated | shared (FSN) | independent (ITN) |")
print(f"|---|---|---|---|")
for t in tasks:
    print(f"| {t} | " + " | ".join(f"{100*runs[v]['accuracy'][t]:.2f}%" for v in runs) + " |")
print(f"| **mean** | " + " | ".join(f"**{100*runs[v]['mean_accuracy']:.2f}%**" for v in runs) + " |")
PY
