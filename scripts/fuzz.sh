#!/usr/bin/env bash
# `make fuzz` / scripts/fuzz.sh [SECONDS_PER_TARGET]: builds the cargo-fuzz targets of
# native/proto/fuzz, seeds their corpora from the captured vectors, runs each target for
# a bounded time (default 60 s) and prints executions and coverage (libFuzzer's final
# cov/ft). Exits non-zero if any target found a crash (inputs in fuzz/artifacts/).
#
# Installs cargo-fuzz when it is missing; builds with a nightly toolchain, or the stable
# one with RUSTC_BOOTSTRAP=1 when no nightly is installed.
# FUZZ_TARGETS="etf_walk control_decode" limits the run to some targets.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-${FUZZ_SECONDS:-60}}
targets=${FUZZ_TARGETS:-"etf_walk control_decode filter_decide frame_decoder hello_and_certificate handshake_name lane_copy"}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz() { cargo +nightly fuzz "$@"; }
else
  fuzz() { RUSTC_BOOTSTRAP=1 cargo fuzz "$@"; }
fi

scripts/fuzz-seed.sh
cd native/proto/fuzz
fuzz build
logs=$(mktemp -d -t trust_dist_fuzz.XXXXXX)
failed=0
summary=()
for t in $targets; do
  echo "== $t (${secs}s)"
  set +e
  fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=8192 -timeout=10 \
    -print_final_stats=1 >"$logs/$t.log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' | tail -1)
  last=$(grep -E '^#[0-9]+' "$logs/$t.log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  corp=$(grep -o 'corp: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  status=ok
  if [ "$rc" -ne 0 ]; then
    status="CRASH (exit $rc): $(grep -o 'Test unit written to .*' "$logs/$t.log" | tail -1)"
    grep -m1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$logs/$t.log" || true
    failed=1
  fi
  summary+=("$(printf '%-22s execs %-10s cov %-6s ft %-7s corpus %-6s %s' \
    "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$status")")
done
echo
echo "== fuzz summary (${secs}s per target; logs in $logs)"
printf '%s\n' "${summary[@]}"
exit "$failed"
