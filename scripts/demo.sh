#!/usr/bin/env bash
# The cometd-bridge demo, end to end on loopback: starts nats-server, a faye Bayeux server
# and a webhook receiver, runs the bridge with config/demo.toml (free ports substituted),
# publishes a few CometD messages, and shows them arriving on NATS and at the webhook.
# Everything it starts is stopped when it ends. Set COMETD_BRIDGE_BIN to use a built
# binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n== %s\n' "$*"; }
fail() { echo "demo: $*" >&2; exit 1; }

say "installing what the demo needs (scripts/setup.sh)"
scripts/setup.sh
bin=${COMETD_BRIDGE_BIN:-}
if [ -z "$bin" ]; then
  cargo build --quiet
  bin="$root/target/debug/cometd-bridge"
fi
python="$root/.tools/venv/bin/python"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Waits (at most 20 s) until FILE contains a line matching PATTERN.
wait_for_line() {
  local file=$1 pattern=$2
  for _ in $(seq 200); do
    grep -q -- "$pattern" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "timed out waiting for '$pattern' in $file: $(cat "$file" 2>/dev/null)"
}
wait_for_port() {
  for _ in $(seq 200); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "nothing listens on port $1"
}

nats_port=$(free_port); admin_port=$(free_port); hook_port=$(free_port)
secret="whsec_$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(24)).decode())')"

say "starting nats-server on 127.0.0.1:$nats_port"
"$root/.tools/bin/nats-server" -a 127.0.0.1 -p "$nats_port" -l "$work/nats-server.log" &
pids+=($!)
wait_for_port "$nats_port"

say "starting faye (a Bayeux server)"
node tests/peers/faye-server.js '{"timeout": 5}' > "$work/faye.out" &
pids+=($!)
wait_for_line "$work/faye.out" LISTENING
faye_port=$(awk '/LISTENING/ {print $2}' "$work/faye.out")
faye_url="http://127.0.0.1:$faye_port/bayeux"
echo "faye at $faye_url"

say "starting a webhook receiver on 127.0.0.1:$hook_port"
python3 scripts/demo/webhook_echo.py "$hook_port" "$secret" > "$work/webhook.out" &
pids+=($!)
wait_for_port "$hook_port"

sed -e "s#127.0.0.1:8080#127.0.0.1:$admin_port#" -e "s#127.0.0.1:4222#127.0.0.1:$nats_port#" \
    -e "s#127.0.0.1:8000#127.0.0.1:$faye_port#" -e "s#127.0.0.1:9000#127.0.0.1:$hook_port#" \
    -e "s#data/demo-state#$work/state#" config/demo.toml > "$work/config.toml"
say "starting the bridge: cometd-bridge run --config config/demo.toml (ports substituted)"
DEMO_HOOK_SECRET="$secret" "$bin" run --config "$work/config.toml" 2> "$work/bridge.log" &
pids+=($!)
for _ in $(seq 200); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$admin_port/readyz', timeout=1)" 2>/dev/null && break
  sleep 0.1
done
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$admin_port/readyz').read().decode())" \
  || fail "the bridge did not become ready: $(cat "$work/bridge.log")"

say "adding a subscription through the admin API"
command -v curl >/dev/null || fail "curl is needed for the demo's REST call (apt-get install curl)"
body='{"id": "orders", "source": "demo", "channel": "/orders/**", "sink": {"type": "nats", "subject": "cometd.{source}.{channel}"}}'
echo "curl -X POST http://127.0.0.1:$admin_port/api/v1/subscriptions -H 'content-type: application/json' -d '$body'"
curl -sS --fail-with-body -X POST "http://127.0.0.1:$admin_port/api/v1/subscriptions" \
  -H 'content-type: application/json' -d "$body" || fail "the subscription was not added"
echo

"$python" scripts/demo/nats_tail.py "nats://127.0.0.1:$nats_port" 'cometd.>' 3 > "$work/nats.out" &
tail_pid=$!
pids+=($tail_pid)
wait_for_line "$work/nats.out" READY

say "publishing on CometD: cometd-bridge publish $faye_url CHANNEL JSON"
for n in 1 2 3; do
  "$bin" publish "$faye_url" /orders/eu/new "{\"order\": $n}" > /dev/null
  echo "published {\"order\": $n} on /orders/eu/new"
done
"$bin" publish "$faye_url" /alerts '{"level": "high"}' > /dev/null
echo 'published {"level": "high"} on /alerts'

say "what arrived on NATS (subject, payload, headers)"
wait "$tail_pid" || fail "the NATS subscriber failed"
grep '^NATS' "$work/nats.out"

say "what arrived at the webhook"
wait_for_line "$work/webhook.out" WEBHOOK
cat "$work/webhook.out"

say "forwarding metrics (http://127.0.0.1:$admin_port/metrics)"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$admin_port/metrics').read().decode())" \
  | grep '^cometd_bridge_messages_forwarded_total'

say "where to look next"
cat <<TXT
- the configuration: config/demo.toml, and every key in config/default.toml
- while the bridge runs: /api/v1/subscriptions, /api/v1/sources, /api/v1/dead-letters,
  /metrics, /readyz on its admin address; the API is described at /api/v1/openapi.json
- cometd-bridge listen URL CHANNEL shows CometD traffic; cometd-bridge check --config FILE validates
TXT
say "demo done; stopping everything it started"
