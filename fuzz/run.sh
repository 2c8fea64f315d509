#!/bin/sh
# Runs fuzz targets one after another, each for a bounded time, and prints
# the lines FUZZING.md records. Usage (from anywhere):
#   fuzz/run.sh [SECONDS] [TARGET...]     default: 120 s, every target
# Stable toolchain: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags.
# Logs go to fuzz/logs/<target>.log; the grown corpus to fuzz/corpus/<target>/
# (seeded from fuzz/seeds/<target>/); crashes to fuzz/artifacts/<target>/.
set -eu
cd "$(dirname "$0")"
seconds=${1:-120}
[ $# -gt 0 ] && shift
targets=${*:-$(cargo fuzz list)}
mkdir -p logs
for target in $targets; do
    mkdir -p "corpus/$target"
    status=0
    RUSTC_BOOTSTRAP=1 nice -n 10 cargo fuzz run --debug-assertions --sanitizer address "$target" \
        "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"logs/$target.log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$target.log")
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "logs/$target.log")
    coverage=$(grep -a -o 'cov: [0-9]*' "logs/$target.log" | tail -n 1)
    echo "$target: exit $status, ${seconds}s, $runs executions ($speed/s), $coverage"
done
