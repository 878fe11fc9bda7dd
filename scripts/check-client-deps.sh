#!/usr/bin/env bash
# The client crate's dependency boundary: `bayeux-client` must build without any of the
# daemon's own dependencies. Lists its normal (non-dev) dependency tree and fails naming
# any of them found. `tower` is the one exception, and only as reqwest's (reqwest 0.13
# builds its HTTP client on tower and tower-http): it fails if anything else pulls it in.
# Called from .ci/run; run it alone after changing crates/bayeux-client/Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

client=bayeux-client
forbidden=(axum redb async-nats prometheus-client utoipa clap config tower)

tree="$(cargo tree -p "$client" -e normal --prefix none --offline 2>/dev/null \
  || cargo tree -p "$client" -e normal --prefix none)"
names="$(awk '{print $1}' <<<"$tree" | sort -u)"

found=()
for name in "${forbidden[@]}"; do
  grep -qx -- "$name" <<<"$names" || continue
  if [ "$name" = tower ]; then
    # Who depends on tower directly, within the client's tree.
    users="$(cargo tree -p "$client" -e normal --prefix none --invert tower --depth 1 --offline 2>/dev/null \
      | awk 'NR > 1 {print $1}' | sort -u)"
    others="$(grep -vx -e reqwest -e tower-http <<<"$users" || true)"
    [ -z "$others" ] && continue
    found+=("tower (through $(tr '\n' ' ' <<<"$others"| sed 's/ $//'))")
    continue
  fi
  found+=("$name")
done

if [ "${#found[@]}" -gt 0 ]; then
  echo "check-client-deps: $client depends on the daemon's ${found[*]}" >&2
  echo "  (see: cargo tree -p $client -e normal -i <name>)" >&2
  exit 1
fi
echo "check-client-deps: $client is free of ${forbidden[*]} ($(wc -l <<<"$names") crates in its tree)"
