#!/usr/bin/env bash
# `make demo`: two nodes of unequal trust on this machine, keys generated on the spot.
# my_desktop (tier admin) drives ec2_node (tier worker) over the trust_dist carrier; then
# ec2_node tries to run code on, stop and flood the desktop, and is refused.
# Exits 0 only if every step held; leaves no process behind.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d -t trust_dist_demo.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

suffix=$$
desktop="my_desktop${suffix}@127.0.0.1"
server="ec2_node${suffix}@127.0.0.1"

echo "== keys, certificates and configs (bin/trust-dist dev-cluster)"
bin/trust-dist dev-cluster "$work/deploy" "$desktop:admin" "$server:worker" \
  --ebin "$PWD/_build/${MIX_ENV:-dev}/lib/trust_dist/ebin"
mkdir -p "$work/ebin"
erlc -o "$work/ebin" examples/demo/trust_dist_demo.erl
epmd -daemon

echo "== starting $server"
erl -args_file "$work/deploy/ec2_node${suffix}/vm.args" -pa "$work/ebin" -noshell \
  -eval 'trust_dist_demo:serve()' >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 50); do
  epmd -names 2>/dev/null | grep -q "ec2_node${suffix} " && break
  sleep 0.1
done

echo "== starting $desktop"
status=0
timeout 60 erl -args_file "$work/deploy/my_desktop${suffix}/vm.args" -pa "$work/ebin" -noshell \
  -eval "trust_dist_demo:run(['$server'])" || status=$?
wait "$server_pid" 2>/dev/null || true
server_pid=""
exit "$status"
