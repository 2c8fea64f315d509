#!/bin/sh
# Where devstreams' CPU time goes under one of the benchmark's own workloads.
#
# Records every CPU with perf's cpu-clock event (a software timer: it works
# in VMs without hardware counters) while `bench --only devstreams
# --workload WORKLOAD` runs, then writes one flat profile per process
# (relay, device-proxy, service-proxy: self time by library and symbol,
# kernel included) using the PIDs the bench prints.
#
# Usage: bench/profile.sh WORKLOAD [OUT_DIR] [more bench arguments...]
#   WORKLOAD: bulk | creations | setup | ping-pong | idle
#   e.g. bench/profile.sh bulk /tmp/profile-bulk
#        bench/profile.sh creations /tmp/profile-creations --quick
# Needs perf (apt-get install linux-perf) and root or perf_event_paranoid <= 0.
set -eu
workload=${1:?usage: bench/profile.sh WORKLOAD [OUT_DIR] [bench arguments...]}
out=${2:-/tmp/devstreams-profile-$workload}
[ $# -ge 2 ] && shift 2 || shift $#
command -v perf >/dev/null || { echo "profile.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$out"
(cd "$root" && cargo build --release -p bench -p relay -p device-proxy -p service-proxy --target-dir "$target")
perf record -e cpu-clock -F 999 -a -o "$out/perf.data" -- \
    "$target/release/bench" --no-build --binaries "$target/release" --only "${SYSTEM:-devstreams}" --workload "$workload" --bulk-same-processes "$@" \
    >"$out/report.md" 2>"$out/bench.log"
echo "== share of all samples by process (swapper = idle CPU)"
perf report -i "$out/perf.data" --stdio --no-children --sort comm 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 12
for name in relay device-proxy service-proxy; do
    pid=$(sed -n "s/^bench: $name pid \([0-9]*\)\$/\1/p" "$out/bench.log" | head -n 1)
    [ -n "$pid" ] || { echo "profile.sh: no pid for $name in $out/bench.log" >&2; continue; }
    perf report -i "$out/perf.data" --stdio --no-children --pid "$pid" --percentage relative \
        --sort dso,symbol --percent-limit 0.7 2>/dev/null |
        sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' >"$out/$name.txt"
    echo "== $name (pid $pid): $out/$name.txt"
    grep -v '^#' "$out/$name.txt" | grep -v '^$' | head -n 25
done
