#!/bin/sh
# Distribution carrier benchmark: inet_tcp_dist vs inet_tls_dist vs trust_dist on loopback,
# plus the loss rows: inet_tcp and trust under 1 % loss and a 50 ms round trip, between
# two network namespaces joined by trust-dist-wire (scripts/faults-net.sh; needs root,
# the rows say why when they cannot run).
#
#   bench/run.sh [--quick] [--carriers inet_tcp,inet_tls,trust] [--no-loss] [--out DIR] [--keep]
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
# The impaired wire of the loss rows. A failed build is not fatal: those rows then read
# "n/a: wire not built" and the rest of the run goes on.
case " $* " in
  *" --no-loss "*) ;;
  *) cargo build --release --quiet -p trust_dist_wire ||
       echo "bench: trust-dist-wire did not build; the loss rows will be n/a" >&2 ;;
esac
# The orchestrator is not distributed: the nodes under test are started with peer
# (connection => standard_io) and halt on their own when this VM goes away.
# +Bd: Ctrl-C ends the orchestrator at once instead of opening the BREAK menu.
DIST_BENCH_ROOT="$ROOT" erl +Bd -noshell -noinput -pa "$WORK/ebin" \
    -eval 'dist_bench:main(init:get_plain_arguments())' -extra --tmp "$WORK/run" "$@"
