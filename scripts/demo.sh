#!/usr/bin/env bash
# The main job, as far as the pipeline exists today: generate the built-in
# synthetic face dataset, train the modulated network (tiny spec) on its 20
# attribute tasks, evaluate it, compile it into a .modpack and check the package
# against the checkpoint. Output goes to ${OUT:-out/demo}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/demo}
mkdir -p "$out"
cargo build --release -p modkit-trainer --bin modtrain -p modkit-compiler --bin modc
bin=target/release/modtrain
modc=target/release/modc
"$bin" synth --out "$out/data" --n "${N:-6000}" --size 48 --seed 0
"$bin" train --data "celeba:$out/data" --variant modulated --spec tiny \
    --epochs "${EPOCHS:-3}" --triplets-per-task "${TRIPLETS:-300}" -o "$out/modulated.safetensors"
"$bin" eval "$out/modulated.safetensors" --data "celeba:$out/data"
"$modc" compile "$out/modulated.safetensors" -o "$out/model.modpack"
"$modc" inspect "$out/model.modpack"
"$modc" verify "$out/model.modpack" --against "$out/modulated.safetensors"
echo "checkpoint: $out/modulated.safetensors"
echo "package: $out/model.modpack"
echo "per-epoch metrics: $out/modulated.metrics.jsonl"
