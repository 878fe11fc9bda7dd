#!/usr/bin/env bash
# The full-subscription outages of tests/outage.rs at the issue's length: a webhook down for
# 3 minutes (45 of faye's session timeouts) behind a 64 KiB quota, beside a healthy
# subscription of another source and of the same source. The test command runs them for
# 30 s; this runs them for COMETD_BRIDGE_OUTAGE_SECS (180). Not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
COMETD_BRIDGE_OUTAGE_SECS="${COMETD_BRIDGE_OUTAGE_SECS:-180}" \
  cargo test --test outage full_subscription -- --nocapture
