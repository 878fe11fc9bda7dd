#!/usr/bin/env bash
# Runs every test, after installing what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --all-targets "$@"
cargo test --doc
