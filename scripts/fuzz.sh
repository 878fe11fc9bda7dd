#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every target in fuzz/: builds them
# once, then runs each for a time or a number of executions, one process at a time at
# the lowest priority, and prints the executions per target. Needs the nightly toolchain
# (`rustup toolchain install nightly`); installs cargo-fuzz when it is missing.
#
#   scripts/fuzz.sh                 60 seconds per target
#   scripts/fuzz.sh 600             600 seconds per target
#   scripts/fuzz.sh -runs=10000000  ten million executions per target
#   scripts/fuzz.sh 60 payload data only these targets
#
# New interesting inputs go to fuzz/target/corpus/<target>/ (not committed); with
# FUZZ_MERGE=1 they are merged into the committed corpus fuzz/corpus/<target>/, which is
# minimised again (as `cargo fuzz cmin` does, then capped at 300 files and 1 MB: see
# merge below) and which `cargo test` replays (tests/it/fuzz_corpus.rs);
# `FUZZ_MERGE=1 scripts/fuzz.sh -runs=0` merges what earlier runs found without fuzzing.
# A crash stops its target, is saved under fuzz/artifacts/<target>/ and makes the script
# exit 1; reproduce it with `cargo +nightly fuzz run <target> <file>` in fuzz/, minimise
# it with `cargo +nightly fuzz tmin <target> <file>`. FUZZ_SANITIZER (default: none)
# picks a sanitizer (address, memory, ...); the crate forbids unsafe code, so one would
# check only the dependencies, at a lower rate.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

budget="${1:-60}"
case "$budget" in
  -runs=[0-9]*) limit=("$budget") ;;
  [0-9]*) limit=("-max_total_time=$budget") ;;
  *) echo "usage: scripts/fuzz.sh [seconds-per-target | -runs=N] [target...]" >&2; exit 2 ;;
esac
shift || true
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for file in fuzz_targets/*.rs; do targets+=("$(basename "$file" .rs)"); done
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing: rustup toolchain install nightly" >&2
  exit 2
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz (cargo install --locked)"
  nice -n 19 cargo install cargo-fuzz --locked
fi

sanitizer="${FUZZ_SANITIZER:-none}"
# Release builds with debug assertions and overflow checks (-a); one target, or all.
build=(nice -n 19 cargo +nightly fuzz build -a -s "$sanitizer")
if [ "${#targets[@]}" -eq 1 ]; then build+=("${targets[0]}"); fi
"${build[@]}"
host="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bin="target/$host/release"

# Replaces corpus/<target> by a small set covering what it and <work> cover: libFuzzer's
# set-cover merge (edges, not hit counts), then the inputs adding the most coverage first,
# up to 300 files and 1 MB. Named inputs (hand-made seeds, fixed crashes) always stay.
merge() {
  local target="$1" work="$2" merged="target/merged/$1" control="target/merge-$1.control"
  rm -rf "$merged" "$control" && mkdir -p "$merged"
  nice -n 19 "$bin/$target" -set_cover_merge=1 -use_counters=0 -merge_control_file="$control" \
    "$merged" "corpus/$target" "$work" >"target/merge-$target.log" 2>&1
  python3 - "$control" "corpus/$target" "$merged" <<'PY'
import hashlib, os, re, shutil, sys
control, corpus, merged = sys.argv[1:]
lines = open(control).read().split("\n")
count = int(lines[0])
paths = lines[2:2 + count]
features = {}
for line in lines[2 + count:]:
    parts = line.split()
    if parts and parts[0] == "FT":
        features[int(parts[1])] = set(map(int, parts[2:]))
size = {index: os.path.getsize(path) for index, path in enumerate(paths)}
named = lambda path: not re.fullmatch(r"[0-9a-f]{40}", os.path.basename(path))
chosen = [i for i in features if paths[i].startswith(corpus + "/") and named(paths[i])]
covered = set().union(set(), *(features[i] for i in chosen))
total = sum(size[i] for i in chosen)
while len(chosen) < 300:
    gains = [(len(f - covered), -size[i], i) for i, f in features.items() if i not in chosen]
    gain, _, best = max(gains, default=(0, 0, None))
    if gain == 0 or total + size[best] > 1_000_000:
        break
    chosen.append(best)
    covered |= features[best]
    total += size[best]
inputs = {}
for i in chosen:
    data = open(paths[i], "rb").read()
    name = os.path.basename(paths[i]) if named(paths[i]) else hashlib.sha1(data).hexdigest()
    inputs[name] = data
shutil.rmtree(corpus)
os.makedirs(corpus)
for name, data in inputs.items():
    open(os.path.join(corpus, name), "wb").write(data)
every = set().union(set(), *features.values())
print(f"merge: {len(inputs)} inputs, {total} bytes, {len(covered)} of {len(every)} features")
PY
}

status=0
summary=()
for target in "${targets[@]}"; do
  work="target/corpus/$target"
  mkdir -p "$work" "artifacts/$target"
  log="target/fuzz-$target.log"
  echo "fuzz: $target (${limit[*]})"
  set +e
  # Long-polling payloads past 4 KiB take other paths (the message count estimate, the
  # carried message joined 4 KiB at a time).
  case "$target" in payload) max_len=(-max_len=16384) ;; *) max_len=() ;; esac
  nice -n 19 "$bin/$target" "$work" "corpus/$target" "${limit[@]}" "${max_len[@]}" -timeout=30 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="artifacts/$target/" >"$log" 2>&1
  code=$?
  set -e
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  seconds="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
  if [ "$code" -ne 0 ]; then
    status=1
    grep -m 1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" >&2 || true
    echo "fuzz: $target failed (exit $code); see fuzz/$log and fuzz/artifacts/$target/" >&2
  fi
  if [ "${FUZZ_MERGE:-0}" = 1 ] && [ "$code" -eq 0 ]; then
    merge "$target" "$work"
  fi
  files="$(find "corpus/$target" -type f | wc -l)"
  bytes="$(find "corpus/$target" -type f -exec cat {} + | wc -c)"
  summary+=("$(printf '%-10s %12s executions %6ss  crashes: %s  corpus: %s files, %s bytes' \
    "$target" "${runs:-?}" "${seconds:-?}" "$([ "$code" -eq 0 ] && echo 0 || echo 1)" "$files" "$bytes")")
done
printf '%s\n' "${summary[@]}"
exit "$status"
