#!/usr/bin/env bash
# A/B of modtrain builds on one noisy machine: runs `bench-step` with each build in
# turn, ROUNDS times, and prints the min and median of forward, backward and step
# per build, and the median and best of each run's paired fraction of the GEMM peak
# (each step against the better of the matmuls timed just before and after it).
# Alternating spreads the machine's slow moments over both builds; only compare
# builds timed in the same call.
#
# Usage: scripts/ab_step.sh SPEC SIZE BUILD...   e.g. scripts/ab_step.sh tiny 48 /tmp/old target/release/modtrain
# Env:   ROUNDS (default 4), STEPS per run (default 8), THREADS (default 2)
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,10p "$0" >&2; exit 2; }
spec=$1 size=$2
shift 2
for _ in $(seq "${ROUNDS:-4}"); do
    for build in "$@"; do
        RAYON_NUM_THREADS=${THREADS:-2} "$build" bench-step --spec "$spec" --size "$size" \
            --steps "${STEPS:-8}" 2>&1 |
            awk -v b="$build" '/^forward /{f=$2} /^backward /{w=$2} /^step /{s=$2}
                /paired per step/{p=$1; sub("%", "", p)} END{print b, f, w, s, (p == "" ? "nan" : p)}'
    done
done | python3 -c '
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in sys.stdin:
    build, *t = line.split()
    runs[build].append([float(v) for v in t])
def paired(c):
    c = [p for p in c if p == p]  # builds older than the paired peak print none
    if not c:
        return ""
    return f" paired % of peak median/max {statistics.median(c):.0f}/{max(c):.0f}"
for build, v in runs.items():
    cols = list(zip(*v))
    print(build, "  ".join(f"{n} min/median {min(c):.1f}/{statistics.median(c):.1f} ms"
                           for n, c in zip(("forward", "backward", "step"), cols)),
          paired(cols[3]))
'
