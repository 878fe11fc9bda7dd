#!/usr/bin/env bash
# The soak tests (tests/soak.rs), not part of scripts/test.sh:
# - a webhook down for 10 minutes while faye publishes 100 messages a second to the bridge
#   (60,000 spooled), then back; each arrives exactly once, no dead letter, no lost session,
#   the daemon under 50 MB of RSS (SOAK_SECONDS, SOAK_RATE, SOAK_MAX_RSS_MB);
# - an hour with a webhook flapping (down 5 min, up 1 min) at 100 msg/s of 1 KB into a
#   replay subscription with a 16 MiB quota: 0 lost, no lost session, RSS flat
#   (SOAK_FLAP_SECONDS, SOAK_DOWN_SECONDS, SOAK_UP_SECONDS, SOAK_QUOTA).
# Arguments filter the tests by name: `scripts/soak.sh flapping` runs the second alone.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --test soak -- --nocapture --test-threads 1 "$@"
