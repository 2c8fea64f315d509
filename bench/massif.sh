#!/bin/sh
# Where the relay's memory per idle stream goes: runs `relay serve` under
# valgrind's massif heap profiler while the bench holds idle streams through
# devstreams, then prints the allocation sites of the peak heap.
#
# The bench finds the relay in a wrapper directory whose `relay` execs
# valgrind for `serve` (registry subcommands run plain); the proxies are the
# ordinary release binaries. The relay is stopped with SIGTERM, so massif
# writes its output.
#
# Usage: bench/massif.sh [STREAMS] [OUT_DIR]     (default: 1000 streams)
# Needs valgrind (apt-get install valgrind).
set -eu
streams=${1:-1000}
out=${2:-/tmp/devstreams-massif}
command -v valgrind >/dev/null || { echo "massif.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
(cd "$root" && cargo build --release -p bench -p relay -p device-proxy -p service-proxy --target-dir "$target")
mkdir -p "$out/bin"
cat >"$out/bin/relay" <<WRAPPER
#!/bin/sh
if [ "\$1" = "serve" ]; then
    exec valgrind --tool=massif --massif-out-file="$out/relay.massif" --threshold=1.0 "$target/release/relay" "\$@"
fi
exec "$target/release/relay" "\$@"
WRAPPER
chmod +x "$out/bin/relay"
ln -sf "$target/release/device-proxy" "$target/release/service-proxy" "$out/bin/"
"$target/release/bench" --no-build --binaries "$out/bin" --only devstreams --workload idle \
    --idle-streams "$streams" >"$out/report.md" 2>"$out/bench.log"
grep -E '^devstreams' "$out/bench.log" || true
ms_print "$out/relay.massif" >"$out/relay.txt"
# The peak snapshot's top-level allocation sites.
peak=$(sed -n 's/.*[ ,[]\([0-9][0-9]*\) (peak).*/\1/p' "$out/relay.txt" | head -n 1)
awk -v n="$peak" '$1 == n && !found { found = 1; next } found && /^->/ { print } found && /^----------/ { exit }' \
    "$out/relay.txt" | cut -c1-160
echo "full report: $out/relay.txt"
