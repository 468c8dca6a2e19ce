#!/usr/bin/env bash
# Packs what building the CUDA trainer on a lent GPU machine needs and that machine
# lacks (it has CUDA, cuDNN and PyTorch but no Rust and no network): the Rust
# toolchain this repo pins (rustc, cargo, the x86_64 std) and the vendored sources
# of the trainer's dependencies, as xz archives under .gpu/ (ignored by git).
# The toolchain does not fit the device tool's 64 MiB per call, so it is split:
#   .gpu/a/  first toolchain part            → call 1: scripts/gpu/bench.sh stage
#   .gpu/c/  the std's .rmeta files          → call 2: scripts/gpu/bench.sh stage
#   .gpu/b/  second part + vendored sources  → call 3: scripts/gpu/bench.sh
# Usage: scripts/gpu/pack.sh   (about 5 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/c
sysroot=$(rustc --print sysroot)
host=x86_64-unknown-linux-gnu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Toolchain: the compiler, cargo, and the host's std (no docs, no sanitizer runtimes).
(cd "$sysroot" && tar cf - bin/rustc bin/cargo lib/libLLVM* lib/librustc_driver* \
    "lib/rustlib/$host/bin" lib/rustlib/$host/lib/*.rlib) | xz -9 -T0 > "$tmp/toolchain.tar.xz"
split -b 58M "$tmp/toolchain.tar.xz" "$tmp/toolchain.tar.xz."
mv "$tmp/toolchain.tar.xz.aa" .gpu/a/
mv "$tmp"/toolchain.tar.xz.a? .gpu/b/
# The std's rlibs are metadata stubs; rustc reads the full metadata from the .rmeta.
(cd "$sysroot" && tar cf - lib/rustlib/$host/lib/*.rmeta) | xz -9 -T0 > .gpu/c/rmeta.tar.xz

# Vendored sources for the trainer alone (models + trainer), Windows-only crates
# emptied: they are never compiled on Linux, and they are most of the bytes.
mkdir "$tmp/ws"
cp -r models trainer third_party Cargo.lock "$tmp/ws/"
sed 's/^members = .*/members = ["models", "trainer"]/' Cargo.toml > "$tmp/ws/Cargo.toml"
(cd "$tmp/ws" && cargo vendor -q --versioned-dirs vendor > /dev/null)
for d in "$tmp"/ws/vendor/{winapi,windows,winsafe}*; do
    [ -d "$d" ] || continue
    find "$d" -type f ! -name Cargo.toml ! -name build.rs ! -name .cargo-checksum.json -delete
    mkdir -p "$d/src" && : > "$d/src/lib.rs"
    python3 - "$d/.cargo-checksum.json" <<'PY'
import json, sys
p = sys.argv[1]
j = json.load(open(p))
j["files"] = {}
json.dump(j, open(p, "w"))
PY
done
(cd "$tmp/ws" && tar cf - vendor) | xz -9 -T0 > .gpu/b/vendor.tar.xz
du -sh .gpu/a .gpu/b .gpu/c
