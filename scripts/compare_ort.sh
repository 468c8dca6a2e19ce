#!/usr/bin/env bash
# modrt (tract) against onnxruntime on the same network and weights, batch 1, in
# one run: the paper spec (150×150) with 20 tasks, briefly trained so that its
# BatchNorm statistics are real. onnxruntime runs `modc export-onnx`'s one-task
# model (image → embedding, BatchNorm and the task folded in); modrt runs the same
# task from a package folded for it (trunk + folded tail, two tract plans) and all
# 20 tasks from the switch package (trunk once + one batched tail call). Rounds
# alternate the two runtimes so that both see the same machine noise; the ratios
# are per round.
#
# Usage: scripts/compare_ort.sh
# Env:   OUT (default out/ort-compare), THREADS (default "1 2"), ROUNDS (default 3),
#        RUNS (timed calls per measurement, default 20), SPEC (default paper),
#        PYTHON (default python3; a venv with onnxruntime is made under OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/ort-compare}
threads=${THREADS:-1 2}
rounds=${ROUNDS:-3}
runs=${RUNS:-20}
spec=${SPEC:-paper}
mkdir -p "$out"

venv="$out/venv"
if ! "$venv/bin/python" -c 'import onnxruntime' 2>/dev/null; then
    echo "installing onnxruntime from PyPI into $venv…" >&2
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install -q onnxruntime numpy >&2
fi
cargo build --release -q -p modkit-trainer -p modkit-compiler -p modkit-runtime --bins
bin=target/release

ckpt="$out/$spec.safetensors"
if [ ! -f "$ckpt" ]; then
    echo "training one small epoch of the $spec spec (20 tasks) for real BatchNorm statistics…" >&2
    "$bin/modtrain" train --spec "$spec" --synth-images 200 --epochs 1 --triplets-per-task 1 \
        --batch-per-task 1 --test-triplets 1 -o "$ckpt" > "$out/train.log"
fi
"$bin/modc" compile "$ckpt" -o "$out/switch.modpack" > /dev/null
"$bin/modc" compile "$ckpt" --tasks smiling --fold-tasks smiling -o "$out/smiling.modpack" > /dev/null
"$bin/modc" export-onnx "$ckpt" --task smiling -o "$out/smiling.onnx" > /dev/null

field() { "$venv/bin/python" -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
printf '%-6s %-7s %14s %16s %10s %18s %12s\n' round threads "ort 1 task ms" "modrt 1 task ms" "modrt÷ort" "modrt 20 tasks ms" "÷ ort 1 task"
for r in $(seq 1 "$rounds"); do
    for t in $threads; do
        ort_ms=$("$venv/bin/python" scripts/ort_bench.py "$out/smiling.onnx" "$t" "$runs" | field median_ms)
        one_ms=$("$bin/modrt" bench --model "$out/smiling.modpack" --threads "$t" --runs "$runs" \
            --gallery 1000 --json | field one_task_ms)
        all_ms=$("$bin/modrt" bench --model "$out/switch.modpack" --threads "$t" --runs "$runs" \
            --gallery 1000 --json | field all_tasks_ms)
        python3 -c "
o, m, a = $ort_ms, $one_ms, $all_ms
print(f'{$r:<6} {$t:<7} {o:14.1f} {m:16.1f} {m / o:10.2f} {a:18.1f} {a / o:12.2f}')"
    done
done
echo "onnxruntime $("$venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)'), $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
