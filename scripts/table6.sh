#!/usr/bin/env bash
# The paper's Table 6 on UT-Zappos50K (section 4.3): its four tasks (the shoe's
# category, closure, gender and heel height) trained jointly by a fully shared
# network (FSN), independent networks (ITN), CSN and the modulated network, on
# CSN's splits where ZAPPOS_DIR/tripletlists holds them (README, `--data
# zappos:DIR`). Ends with `modtrain report` of the four: per-task test accuracy
# on stdout, plots in OUT_DIR/runs/report.
# Usage: scripts/table6.sh ZAPPOS_DIR [OUT_DIR] [extra modtrain train flags…]
# The defaults are the paper's (§4.2): the paper spec at 150×150, Adagrad at
# 0.01, 8 triplets per task in each minibatch, 30000 training and 10000 test
# triplets per task, 40 epochs: days on a CPU, hours on a GPU (DEVICE=cuda with
# a `--features cuda` build). SPEC=tiny EPOCHS=… TRIPLETS=… TEST=… BATCH=… scale it
# down; MODTRAIN=path uses that binary instead of building one.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
  echo "usage: scripts/table6.sh ZAPPOS_DIR [OUT_DIR] [modtrain train flags…]" >&2
  echo "ZAPPOS_DIR is UT-Zappos50K as unpacked (ut-zap50k-images*/, ut-zap50k-data/)${1:+; $1 is not a directory}" >&2
  exit 2
fi
data=$(cd "$1" && pwd)
out=${2:-out/table6}
shift 2 || shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
if [ -z "${MODTRAIN:-}" ]; then
  cargo build --release -q -p modkit-trainer --bin modtrain
  MODTRAIN=target/release/modtrain
fi
common=(--data "zappos:$data" --spec "${SPEC:-paper}" --device "${DEVICE:-cpu}"
  --optimizer adagrad --lr 0.01 --batch-per-task "${BATCH:-8}"
  --epochs "${EPOCHS:-40}" --triplets-per-task "${TRIPLETS:-30000}"
  --test-triplets "${TEST:-10000}")
run() {
  local name=$1
  shift
  echo "== $name" >&2
  "$MODTRAIN" train "${common[@]}" "$@" -o "$out/runs/$name.safetensors" 2>&1 \
    | grep -v ": step " >&2
}
run fsn --variant shared "$@"
run itn --variant independent "$@"
run csn --variant csn "$@"
run ours --variant modulated "$@"
"$MODTRAIN" report "$out/runs"
