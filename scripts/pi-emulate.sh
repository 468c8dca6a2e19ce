#!/usr/bin/env bash
# Cross-builds firmware-demo for the Raspberry Pi (aarch64-unknown-linux-gnu), runs
# it under qemu-aarch64 to render a frame to PNG, and checks that
#   * the aarch64 run ranks the gallery exactly as the x86-64 run does, and
#   * its frame equals the golden frame (UPDATE_GOLDEN=1 rewrites the golden).
# Installs what it needs: the rustup target, Debian's gcc-aarch64-linux-gnu and
# qemu-user. Output in ${OUT:-out/pi}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/pi}
model=${MODEL:-models/pretrained/tiny-faces.modpack}
golden=firmware-demo/golden/frame-480x320.png
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu

cargo build --profile pi --target aarch64-unknown-linux-gnu -p modkit-firmware-demo
pi_bin=target/aarch64-unknown-linux-gnu/pi/firmware-demo
cargo build -p modkit-trainer --bin modtrain -p modkit-runtime --bin modrt \
    -p modkit-firmware-demo --bin firmware-demo
host=target/debug

rm -rf "$out" && mkdir -p "$out"
"$host/modtrain" synth --out "$out/gallery" --n 300 --size 48 --seed 7 >/dev/null
"$host/modtrain" synth --out "$out/queries" --n 3 --size 48 --seed 8 >/dev/null
"$host/modrt" index "$out/gallery" --model "$model" -o "$out/gallery.modidx"
args=(--model "$model" --index "$out/gallery.modidx" --queries "$out/queries/img_align_celeba"
    --task smiling,young,bangs --once --json --no-timings)

"$host/firmware-demo" "${args[@]}" --display "png:$out/frame-x86_64.png" > "$out/x86_64.json"
qemu-aarch64 -L /usr/aarch64-linux-gnu "$pi_bin" "${args[@]}" \
    --display "png:$out/frame-aarch64.png" > "$out/aarch64.json"

python3 - "$out/x86_64.json" "$out/aarch64.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
assert len(a) == len(b) and a, "same number of screens"
worst = 0.0
for x, y in zip(a, b):
    assert (x["query"], x["task"]) == (y["query"], y["task"])
    ids = lambda s: [r["id"] for r in s["results"]]
    assert ids(x) == ids(y), f"{x['query']} {x['task']}: {ids(x)} != {ids(y)}"
    for r, s in zip(x["results"], y["results"]):
        worst = max(worst, abs(r["distance"] - s["distance"]))
assert worst < 1e-4, f"distances differ by {worst}"
print(f"aarch64 == x86_64: {len(a)} screens, same rankings, distances within {worst:.1e}")
EOF

if [ "${UPDATE_GOLDEN:-0}" = 1 ]; then
    mkdir -p "$(dirname "$golden")"
    cp "$out/frame-aarch64.png" "$golden"
    echo "golden frame rewritten: $golden"
fi
cmp "$out/frame-x86_64.png" "$golden" || { echo "x86_64 frame differs from $golden (UPDATE_GOLDEN=1 rewrites it)"; exit 1; }
cmp "$out/frame-aarch64.png" "$golden" || { echo "aarch64 frame differs from $golden (UPDATE_GOLDEN=1 rewrites it)"; exit 1; }
echo "frames equal the golden: $golden"

# One screen with real timings, as on the device.
qemu-aarch64 -L /usr/aarch64-linux-gnu "$pi_bin" --model "$model" --index "$out/gallery.modidx" \
    --queries "$out/queries/img_align_celeba/000001.png" --task smiling --once \
    --display "png:$out/frame-timed.png"
echo "aarch64 binary: $pi_bin ($(stat -c %s "$pi_bin") bytes, stripped)"
echo "frames: $out/frame-aarch64.png $out/frame-timed.png"
