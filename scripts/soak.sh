#!/usr/bin/env bash
# The soak test: a webhook down for 10 minutes while faye publishes 100 messages a second
# to the bridge (60,000 spooled), then back; checks that each arrives exactly once, with no
# dead letter, no lost session, and the daemon under 50 MB of RSS. Not part of
# scripts/test.sh. SOAK_SECONDS, SOAK_RATE and SOAK_MAX_RSS_MB change the scenario.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --test soak -- --nocapture --test-threads 1
