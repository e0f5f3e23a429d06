#!/usr/bin/env bash
# `make demo`: three tiers of trust on this machine, keys generated on the spot.
#
#   my_desktop (tier admin) > ec2_node (tier worker) > bob_colo (tier edge)
#
# Each node is its own VM on loopback over the trust_dist carrier, with the policy in
# examples/demo/config/. my_desktop runs the scenario (examples/demo/trust_dist_demo.erl):
# it drives both servers, has each of them attack it and checks that nothing happened,
# shows what its policy allows, then does the same one tier down (ec2_node over bob_colo)
# and prints every node's link counters.
#
# Node logs go to files; the refusals they record are shown under the steps. Exits 0 only
# if every step held, and leaves no process behind. TRUST_DIST_DEMO_KEEP=1 keeps the
# working directory (keys, configs, logs); it is kept anyway when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
ebin="$root/_build/${MIX_ENV:-dev}/lib/trust_dist/ebin"
if [ ! -x bin/trust-dist ] || [ ! -f "$ebin/trust_dist.beam" ]; then
  echo "demo: trust_dist is not built; run \`make build\` (or \`make demo\`)" >&2
  exit 2
fi

work=$(mktemp -d -t trust_dist_demo.XXXXXX)
vm_pids=()
started_epmd=0
status=1

cleanup() {
  # Every VM we started, by its pid: asked first, then killed; bounded.
  local p
  for p in "${vm_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 30); do
    local alive=0
    for p in "${vm_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${vm_pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  # epmd only if this script started it, and only if no node is registered with it
  # (`epmd -kill` refuses otherwise), so other users of this machine keep theirs.
  if [ "$started_epmd" = 1 ]; then epmd -kill >/dev/null 2>&1 || true; fi
  if [ "$status" != 0 ] || [ -n "${TRUST_DIST_DEMO_KEEP:-}" ]; then
    echo "demo: keys, configs and node logs kept in $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'status=130; echo "demo: interrupted"; exit 130' INT TERM

if ! epmd -names >/dev/null 2>&1; then
  epmd -daemon
  started_epmd=1
  for _ in $(seq 1 20); do epmd -names >/dev/null 2>&1 && break; sleep 0.1; done
fi

# The three names as they are, unless another run of the demo holds them in EPMD.
suffix=""
if epmd -names 2>/dev/null | grep -qE "^name (my_desktop|ec2_node|bob_colo) "; then
  suffix="_$$"
fi
desktop="my_desktop$suffix"
ec2="ec2_node$suffix"
bob="bob_colo$suffix"
host=127.0.0.1

echo "== keys, certificates and configs: bin/trust-dist dev-cluster --tiers admin,worker,edge"
bin/trust-dist dev-cluster "$work/deploy" "$desktop@$host:admin" "$ec2@$host:worker" \
  "$bob@$host:edge" --tiers admin,worker,edge --ebin "$ebin" >"$work/dev-cluster.out"
for n in "$desktop" "$ec2" "$bob"; do
  printf '   %-12s %s\n' "$n" "$(grep -E "^node $n@" "$work/dev-cluster.out" | sed -E 's/^node [^ ]+ //')"
done
echo "   policies: examples/demo/config/{my_desktop,ec2_node,bob_colo}.config"

mkdir -p "$work/ebin"
erlc -o "$work/ebin" examples/demo/demo_results.erl examples/demo/trust_dist_demo.erl

# Per node: its own sys.config (from dev-cluster), the demo's policy for its role, and a
# third config that sends its log to a file. Sets the array `args`.
node_args() {
  local node=$1 role=$2
  cat >"$work/$node-log.config" <<EOF
[{kernel, [{logger, [{handler, default, logger_std_h,
                      #{config => #{file => "$work/$node.log"}}}]}]}].
EOF
  args=(-args_file "$work/deploy/$node/vm.args"
        -config "$root/examples/demo/config/$role.config" -config "$work/$node-log.config"
        -pa "$work/ebin" -noshell)
}

echo "== starting $ec2 and $bob (logs: $work/<node>.log)"
for pair in "$ec2:ec2_node" "$bob:bob_colo"; do
  node=${pair%%:*} role=${pair##*:}
  node_args "$node" "$role"
  erl "${args[@]}" -eval "trust_dist_demo:serve('$desktop@$host')" \
    >"$work/$node.out" 2>&1 &
  vm_pids+=($!)
done
for node in "$ec2" "$bob"; do
  for _ in $(seq 1 100); do
    epmd -names 2>/dev/null | grep -q "^name $node " && break
    sleep 0.1
  done
done

echo "== starting $desktop"
status=0
node_args "$desktop" my_desktop
timeout 60 erl "${args[@]}" \
  -eval "trust_dist_demo:run([\"$work\", '$ec2@$host', '$bob@$host'])" &
vm_pids+=($!)
wait "${vm_pids[2]}" || status=$?
if [ "$status" = 124 ]; then echo "demo: FAIL: did not finish within 60 s"; fi

# The desktop stopped both servers at the end; give them a moment to finish.
for _ in $(seq 1 50); do
  kill -0 "${vm_pids[0]}" 2>/dev/null || kill -0 "${vm_pids[1]}" 2>/dev/null || break
  sleep 0.1
done
if [ "$status" != 0 ]; then
  for node in "$desktop" "$ec2" "$bob"; do
    for f in "$work/$node.out" "$work/$node.log"; do
      [ -s "$f" ] && { echo "--- last lines of $f"; tail -n 15 "$f"; }
    done
  done
fi
exit "$status"
