#!/bin/sh
# Distribution carrier benchmark: inet_tcp_dist vs inet_tls_dist vs trust_dist on loopback.
#
#   bench/run.sh [--quick] [--carriers inet_tcp,inet_tls,trust] [--out DIR] [--keep]
#
# Needs a built tree (`mix compile`: bin/trust-dist, priv/native, _build/dev/.../ebin).
# Writes bench/results/latest.md and bench/results/latest.json (override with --out).
# Exit status: 0 when the run completed (failed cells are reported in the table),
# 2 when the harness itself aborted, 64 on bad arguments.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dist_bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
mkdir "$WORK/ebin"
erlc -o "$WORK/ebin" "$ROOT/bench/dist_bench.erl"
cd "$ROOT"
# The raw-quinn reference column: the transport alone, built with the carrier's settings.
cargo build --release --quiet -p trust_dist_net --example raw_quinn
# The orchestrator is not distributed: the nodes under test are started with peer
# (connection => standard_io) and halt on their own when this VM goes away.
# +Bd: Ctrl-C ends the orchestrator at once instead of opening the BREAK menu.
DIST_BENCH_ROOT="$ROOT" erl +Bd -noshell -noinput -pa "$WORK/ebin" \
    -eval 'dist_bench:main(init:get_plain_arguments())' -extra --tmp "$WORK/run" "$@"
