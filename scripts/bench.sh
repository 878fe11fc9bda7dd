#!/usr/bin/env bash
# The benchmarks: installs what they need (the test servers, aiocometd, the CometD JS
# client), builds in release mode, starts faye and nats-server on loopback, runs every
# scenario a few times, and writes bench/RESULTS.md and bench/results.json.
# Bounded: each load loop has a message count and a time limit; the whole run takes a few
# minutes on 2 cores. Not part of the test command.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
peers=bench/peers
stamp="$peers/node_modules/.installed-lock"
if ! { [ -f "$stamp" ] && cmp -s "$peers/package-lock.json" "$stamp"; }; then
  echo "bench: installing the CometD JS client (npm ci in bench/peers)"
  (cd "$peers" && npm ci --no-audit --no-fund --loglevel=error) || { echo "bench: npm ci failed in $peers" >&2; exit 1; }
  cp "$peers/package-lock.json" "$stamp"
fi
cargo build --release --bin cometd-bridge --example bench
exec target/release/examples/bench "$@"
