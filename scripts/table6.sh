#!/usr/bin/env bash
# The paper's Table 6 on UT-Zappos50K (section 4.3): its four tasks (the shoe's
# category, closure, gender and heel height) trained jointly by a fully shared
# network (FSN), independent networks (ITN), CSN and the modulated network, on
# CSN's splits where ZAPPOS_DIR/tripletlists holds them (README, `--data
# zappos:DIR`). Ends with `modtrain report` of the four: per-task test accuracy
# on stdout, plots in OUT_DIR/runs/report.
#
# Usage: scripts/table6.sh ZAPPOS_DIR OUT_DIR [extra modtrain train flags…]
#
# The paper states its training settings for CelebA only, and this script
# assumes them for UT-Zappos50K: the network of Table 2 (150×150), Adagrad at
# 0.01 and about 40 epochs (§4.2), 8 triplets per task in each minibatch (§4.2:
# 168 images for 7 tasks), 30000 training and 10000 test triplets per task
# (§4.1). That is days on a CPU and hours on a GPU (DEVICE=cuda builds with
# `--features cuda`). Environment variables replace them, since modtrain takes
# each flag once: SPEC, EPOCHS, TRIPLETS, TEST, BATCH, DEVICE; MODTRAIN=path
# uses that binary instead of building one.
set -euo pipefail
usage="usage: scripts/table6.sh ZAPPOS_DIR OUT_DIR [modtrain train flags…]"
if [ $# -lt 2 ] || [[ $2 == -* ]]; then
  echo "$usage" >&2
  echo "(give OUT_DIR, where the runs go, before any modtrain flags)" >&2
  exit 2
fi
if [ ! -d "$1" ]; then
  echo "$usage" >&2
  echo "ZAPPOS_DIR is UT-Zappos50K as unpacked (ut-zap50k-images*/, ut-zap50k-data/); $1 is not a directory" >&2
  exit 2
fi
data=$(CDPATH='' cd -- "$1" && pwd)
mkdir -p -- "$2"
out=$(CDPATH='' cd -- "$2" && pwd)
shift 2
device=${DEVICE:-cpu}
# MODTRAIN as given, from here: a path (made absolute before the cd) or a command.
case ${MODTRAIN:-} in
  '') ;;
  /*) modtrain=$MODTRAIN ;;
  */*) modtrain=$PWD/$MODTRAIN ;;
  *) modtrain=$(command -v -- "$MODTRAIN") || { echo "MODTRAIN=$MODTRAIN: no such command" >&2; exit 2; } ;;
esac
CDPATH='' cd -- "$(dirname -- "$0")/.."
if [ -z "${MODTRAIN:-}" ]; then
  if [[ $device == cuda* ]]; then
    cargo build --release -q -p modkit-trainer --bin modtrain --features cuda
  else
    cargo build --release -q -p modkit-trainer --bin modtrain
  fi
  modtrain=$PWD/target/release/modtrain
fi
common=(--data "zappos:$data" --spec "${SPEC:-paper}" --device "$device"
  --optimizer adagrad --lr 0.01 --batch-per-task "${BATCH:-8}"
  --epochs "${EPOCHS:-40}" --triplets-per-task "${TRIPLETS:-30000}"
  --test-triplets "${TEST:-10000}")
run() {
  local name=$1
  shift
  echo "== $name" >&2
  "$modtrain" train "${common[@]}" "$@" -o "$out/runs/$name.safetensors" 2>&1 \
    | grep --line-buffered -v ": step " >&2
}
run fsn --variant shared "$@"
run itn --variant independent "$@"
run csn --variant csn "$@"
run ours --variant modulated "$@"
"$modtrain" report "$out/runs"
