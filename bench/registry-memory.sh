#!/usr/bin/env bash
# What a relay's in-memory registry copy costs per registered device: starts
# a release `relay serve` on a registry of 1 device and on one of N devices
# (rows added with sqlite3 in one transaction, keys of the real length), and
# prints the RSS of each after start-up. Each relay is stopped by its PID.
# Usage: bench/registry-memory.sh [N]   (default 100000; needs sqlite3 and
# target/release/relay from `cargo build --release -p relay`)
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-100000}"
relay=target/release/relay
command -v sqlite3 >/dev/null || { echo "needs sqlite3 (apt-get install sqlite3)" >&2; exit 1; }
[ -x "$relay" ] || { echo "build it first: cargo build --release -p relay" >&2; exit 1; }
work="$(mktemp -d -t registry-memory-XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$relay" device add seed --data-dir "$work/small" >/dev/null 2>&1
cp -a "$work/small" "$work/large"
key="$(printf 'A%.0s' $(seq 43))="
sqlite3 "$work/large/registry.sqlite" "
  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $devices)
  INSERT INTO devices (device_id, primary_key, secondary_key)
  SELECT printf('fleet-device-%07d', i), '$key', '$key' FROM n;"

resident() { # pid -> "VmRSS RssAnon" in KiB
  awk '/^VmRSS:/{r=$2} /^RssAnon:/{a=$2} END{print r, a}' "/proc/$1/status"
}
measure() { # data dir -> RSS line
  "$relay" serve --data-dir "$1" --listen 127.0.0.1:0 --no-mqtt >"$1.out" 2>"$1.log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 300); do grep -q "^Service connection string" "$1.out" && break; sleep 0.1; done
  sleep 5
  resident "$pid"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}
read -r small_rss small_anon < <(measure "$work/small")
read -r large_rss large_anon < <(measure "$work/large")
echo "relay RSS with 1 device: ${small_rss} KiB (anonymous ${small_anon} KiB)"
echo "relay RSS with $((devices + 1)) devices: ${large_rss} KiB (anonymous ${large_anon} KiB)"
awk -v a="$small_rss" -v b="$large_rss" -v n="$devices" \
  'BEGIN { printf "registry copy per device: %.0f bytes of RSS\n", (b - a) * 1024 / n }'
