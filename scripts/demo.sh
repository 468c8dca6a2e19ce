#!/usr/bin/env bash
# The main job on a fresh machine: generate the built-in synthetic faces, train the
# modulated network (tiny spec), compile it into a .modpack, check the package
# against the checkpoint, index a gallery of faces the model never saw, and answer
# one query for every task (`modrt query --task smiling,young,...`: the trunk once,
# a row per task on the contact sheet PNG), then score every gallery face as a
# query (`modrt eval`, precision@5 per task).
# Output goes to ${OUT:-out/demo}; N, EPOCHS, TRIPLETS, GALLERY and TASKS scale it.
# PROFILE=dev uses the debug build `cargo test` already made (CI runs it that way,
# scaled down; the trainer's kernels are optimized in it too).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/demo}
tasks=${TASKS:-smiling,young,bangs,mustache,bald,wavy_hair}
profile=${PROFILE:-release}
mkdir -p "$out"
cargo build --profile "$profile" -p modkit-trainer --bin modtrain -p modkit-compiler --bin modc \
    -p modkit-runtime --bin modrt
case $profile in
  dev | test) bin=target/debug ;;
  bench) bin=target/release ;;
  *) bin=target/$profile ;;
esac
"$bin/modtrain" synth --out "$out/data" --n "${N:-6000}" --size 48 --seed 0
"$bin/modtrain" train --data "celeba:$out/data" --variant modulated --spec tiny \
    --tasks "$tasks" --optimizer adam --lr 0.003 --mining batch-all --batch-per-task 4 \
    --epochs "${EPOCHS:-6}" --triplets-per-task "${TRIPLETS:-300}" \
    -o "$out/modulated.safetensors"
"$bin/modc" compile "$out/modulated.safetensors" -o "$out/model.modpack"
"$bin/modc" inspect "$out/model.modpack"
"$bin/modc" verify "$out/model.modpack" --against "$out/modulated.safetensors"
# A gallery the model never saw: another seed.
"$bin/modtrain" synth --out "$out/gallery" --n "${GALLERY:-1000}" --size 48 --seed 1
"$bin/modrt" index "$out/gallery" --model "$out/model.modpack" -o "$out/gallery.modidx"
# The demo's own sheet: one an earlier build wrote lacks the mark that lets
# modrt replace it, so it goes first.
rm -f "$out/query.png"
"$bin/modrt" query "$out/gallery/img_align_celeba/000001.png" --task "$tasks" \
    --model "$out/model.modpack" --index "$out/gallery.modidx" -k 5 \
    --sheet "$out/query.png"
# Not one query but all of them: each gallery face queries the other 999, per task.
"$bin/modrt" eval --index "$out/gallery.modidx" -k 5
echo "checkpoint: $out/modulated.safetensors"
echo "package: $out/model.modpack"
test -s "$out/query.png" || { echo "demo.sh: no contact sheet at $out/query.png" >&2; exit 1; }
echo "contact sheet: $out/query.png"
