#!/usr/bin/env bash
# Builds the CUDA trainer here, on a machine with no GPU and no CUDA install, and
# packs what a lent GPU machine runs into .gpu/ (ignored by git), so that the whole
# GPU check is one device call (the device tool's carry limit is 64 MiB a call):
#   carry [".gpu"], command: bash scripts/gpu/bench.sh [CONFIG…]
# .gpu/ holds modtrain and the trainer's test binary, both `--features cuda`,
# stripped and xz-compressed (~15 MB together), libcudart.so.13 (the one library
# they link; the others load at run time) and a manifest naming the commit.
#
# CUDA comes from PyPI (scripts/gpu/env.sh, once, ~105 MB). A cold build takes
# ~10 minutes on 2 cores (candle's kernels through nvcc), a rebuild ~1.
# Env: CUDA_COMPUTE_CAP (default 90, the H100/H200).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/gpu/env.sh
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
target=target/cuda
cargo build --release --target-dir "$target" -p modkit-trainer --features cuda --bin modtrain
tests=$(cargo test --release --target-dir "$target" -p modkit-trainer --features cuda --lib \
    --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
[ -x "$tests" ] || { echo "scripts/gpu/build.sh: no test binary built" >&2; exit 1; }

rm -rf .gpu && mkdir .gpu
for pair in "$target/release/modtrain:modtrain" "$tests:trainer-tests"; do
    src=${pair%%:*}
    name=${pair##*:}
    objcopy --strip-debug "$src" ".gpu/$name"
    xz -T0 -6 -f ".gpu/$name"
done
cp "$CUDA_HOME/lib/libcudart.so.13" .gpu/
{
    echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- trainer models third_party || echo ' + uncommitted changes')"
    echo "built $(date -u +%FT%TZ) with $(nvcc --version | tail -1), sm_${CUDA_COMPUTE_CAP}"
} > .gpu/MANIFEST
cat .gpu/MANIFEST
du -ch .gpu/* | tail -1
