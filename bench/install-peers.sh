#!/bin/sh
# Installs the open peers the benchmark compares against into bench/peers/
# (gitignored), so nothing lands in ~/.cargo/bin:
#   rathole  — `cargo install rathole`, WITHOUT --locked: its lock file pins a
#              `time` version that no longer builds on current Rust. Default
#              features (native TLS via OpenSSL: needs libssl-dev, pkg-config).
#   bore     — `cargo install bore-cli` (plain TCP only).
# The bench finds them at bench/peers/bin/{rathole,bore}; a peer that is
# missing is skipped with a printed reason. Re-running is cheap: cargo skips
# what is already installed. Usage: bench/install-peers.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root="$here/peers"
mkdir -p "$root"
# A separate build directory, so installing does not touch the workspace's target/.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/bench-peers-target}"
status=0
cargo install rathole --root "$root" || { echo "install-peers: rathole failed to build (needs libssl-dev and pkg-config)" >&2; status=1; }
cargo install bore-cli --root "$root" || { echo "install-peers: bore-cli failed to build" >&2; status=1; }
ls -l "$root/bin"
exit $status
