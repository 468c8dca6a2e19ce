#!/usr/bin/env bash
# Regenerates models/pretrained/: the tiny-spec modulated network trained on the
# built-in synthetic faces, its compiled package, and its model card.
# The shipped files were made with RAYON_NUM_THREADS=1 (one core; the card
# records the seconds it took here).
#
#   bash scripts/pretrain.sh            # writes models/pretrained/*
set -euo pipefail
cd "$(dirname "$0")/.."
dst=models/pretrained
work=${WORK:-$(mktemp -d)}
images=${IMAGES:-6000}
epochs=${EPOCHS:-10}
seed=${SEED:-0}
train_flags=(--variant modulated --spec tiny --optimizer adam --lr 0.003 --mining pooled
    --batch-per-task 2 --triplets-per-task 250 --epochs "$epochs" --seed "$seed")

cargo build --release -p modkit-trainer --bin modtrain -p modkit-compiler --bin modc
modtrain=target/release/modtrain
modc=target/release/modc
"$modtrain" synth --out "$work/data" --n "$images" --size 48 --seed "$seed"
start=$(date +%s)
"$modtrain" train --data "celeba:$work/data" "${train_flags[@]}" -o "$work/tiny-faces.safetensors"
seconds=$(( $(date +%s) - start ))
"$modc" compile "$work/tiny-faces.safetensors" -o "$work/tiny-faces.modpack"
"$modc" verify "$work/tiny-faces.modpack" --against "$work/tiny-faces.safetensors"
mkdir -p "$dst"
cp "$work/tiny-faces.safetensors" "$work/tiny-faces.modpack" "$dst/"

metrics=$(tail -n 1 "$work/tiny-faces.metrics.jsonl")
inspect=$("$modc" inspect "$dst/tiny-faces.modpack" --json)
{
    echo "# Model card: tiny-faces"
    echo
    echo "The modulated network (Zhao et al., ECCV 2018) at modkit's \`tiny\` spec, trained"
    echo "on modkit's built-in synthetic faces. It exists so that \`modrt\` runs without"
    echo "training first; it is not a model of real faces."
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| files | \`tiny-faces.modpack\` (runtime switch, f32), \`tiny-faces.safetensors\` (checkpoint) |"
    echo "| spec | tiny: 3×48×48 → widths 8/16/32/32/32 → 32-d L2-normalised embedding, BatchNorm |"
    echo "| variant | modulated from block 4 and after fc (ReLU'd channel vectors) |"
    echo "| tasks | $(jq -r '.test_accuracy | keys_unsorted | join(", ")' <<<"$metrics") |"
    echo "| data | \`modtrain synth --n $images --size 48 --seed $seed\` (80/10/10 split) |"
    echo "| training | \`modtrain train ${train_flags[*]}\`, ${seconds} s here |"
    echo "| package | $(jq -r '.file_bytes' <<<"$inspect") bytes |"
    echo "| mean test triplet accuracy | $(jq -r '.mean_accuracy * 100 | . * 100 | round / 100' <<<"$metrics")% |"
    echo
    echo "Test triplet accuracy per task (500 fixed test triplets each; chance is 50%):"
    echo
    echo "| task | accuracy |"
    echo "|---|---|"
    jq -r '.test_accuracy | to_entries[] | "| \(.key) | \(.value * 100 | . * 100 | round / 100)% |"' <<<"$metrics"
    echo
    echo "Regenerate with \`bash scripts/pretrain.sh\` (another CPU model, or a build that"
    echo "sums the convolutions' weight gradients otherwise, rounds differently and trains"
    echo "to slightly different numbers)."
} > "$dst/MODEL_CARD.md"
echo "wrote $dst/ (model card: $dst/MODEL_CARD.md)"
