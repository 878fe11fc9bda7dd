#!/usr/bin/env bash
# The image, built and run as a user would, on a machine with a container engine and a
# registry (not part of the test command; on the project's CI machines, which have neither,
# ../shared/tools/container/check.sh builds it with podman on local stand-ins instead).
#
#   scripts/image-check.sh            # ENGINE=podman scripts/image-check.sh
#
# Checks: the build, the size (under 100 MB), a numeric non-root user, `check` reading the
# image's configuration, `run` answering /healthz and /readyz with a token, and a plain
# `stop` (10 s) ending the bridge cleanly (exit 0). Every container it starts is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${ENGINE:-docker}"
image="${IMAGE:-cometd-bridge:check}"
port="${PORT:-18080}"
name="cometd-bridge-check-$$"
passed=0; failed=0
ok() { echo "image-check: ok   $*"; passed=$((passed + 1)); }
bad() { echo "image-check: FAIL $*"; failed=$((failed + 1)); }
cleanup() { "$engine" rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

command -v "$engine" >/dev/null || { echo "image-check: $engine is not installed (set ENGINE=podman?)" >&2; exit 2; }
started=$(date +%s)
"$engine" build -t "$image" . || { echo "image-check: FAIL the build" >&2; exit 1; }
ok "built in $(( $(date +%s) - started )) s"

size=$("$engine" image inspect "$image" --format '{{.Size}}')
if [ "$size" -lt 100000000 ]; then ok "size $((size / 1000000)) MB"; else bad "size $((size / 1000000)) MB (over 100 MB)"; fi
user=$("$engine" image inspect "$image" --format '{{.Config.User}}')
if [[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]]; then ok "user $user"; else bad "user '$user' is not numeric and non-root"; fi

if "$engine" run --rm "$image" check >/dev/null; then ok "check reads the image's configuration"; else bad "check"; fi

"$engine" run -d --name "$name" -p "127.0.0.1:$port:8080" -e COMETD_BRIDGE__ADMIN__TOKEN=image-check "$image" >/dev/null
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null; then ok "/healthz"; else bad "/healthz"; fi
if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null; then ok "/readyz (no sources configured)"; else bad "/readyz"; fi
status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/api/v1/subscriptions")
if [ "$status" = 401 ]; then ok "the API asks for the token"; else bad "the API answered $status without a token"; fi
if "$engine" logs "$name" 2>&1 | grep -q $'\e\['; then bad "colour codes in the logs"; else ok "plain logs"; fi
stop_started=$(date +%s)
"$engine" stop "$name" >/dev/null
code=$("$engine" inspect "$name" --format '{{.State.ExitCode}}')
if [ "$code" = 0 ]; then ok "stop: exit 0 in $(( $(date +%s) - stop_started )) s"; else bad "stop: exit $code"; fi

echo "image-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
