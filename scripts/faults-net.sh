#!/usr/bin/env bash
# Two network namespaces joined through an impaired wire, for fault-injection tests
# (`make faults`) and for benchmarks under loss and delay. Needs root.
#
#   ns tdf<ID>a              ns tdf<ID>w                        ns tdf<ID>b
#   eth0 10.77.0.1/24 ── veth ── wa  [trust-dist-wire]  wb ── veth ── eth0 10.77.0.2/24
#
# The kernels this project runs on have no netem qdisc, so loss, delay, reordering and
# partitions come from native/wire (trust-dist-wire), a user-space layer-2 bridge
# between wa and wb; it is used even where netem exists, so every run has one code path.
# The addresses exist only inside these namespaces; nothing of the host is touched.
#
#   scripts/faults-net.sh check             root? network namespaces and veth usable?
#   scripts/faults-net.sh up ID             create the namespaces of run ID (an owner pid)
#   scripts/faults-net.sh wire ID [ARGS]    run trust-dist-wire for ID in the foreground
#   scripts/faults-net.sh down ID           kill what runs inside and delete them
#   scripts/faults-net.sh clean             delete those left by runs whose owner is gone
#   scripts/faults-net.sh run [WIRE ARGS] -- CMD [ARGS]
#       up, the wire in the background (SIGUSR1 partitions, SIGUSR2 heals), CMD with
#       TD_NS_A TD_NS_B TD_NS_W TD_ADDR_A TD_ADDR_B TD_WIRE_PID in its environment, down.
#       Example, a 50 ms round trip with 1 % loss each way, a server in one namespace
#       and a client in the other:
#       scripts/faults-net.sh run --delay-ms 25 --loss 1 -- sh -c \
#           'ip netns exec $TD_NS_B ./server & ip netns exec $TD_NS_A ./client $TD_ADDR_B'
#
# ID is the pid of the process that owns the run, so `clean` can tell runs that are still
# going from runs that were killed before they could tidy up.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
WIRE=${TRUST_DIST_WIRE:-${CARGO_TARGET_DIR:-$root/target}/release/trust-dist-wire}
ADDR_A=10.77.0.1
ADDR_B=10.77.0.2

die() { echo "faults-net: $*" >&2; exit 1; }

ns_names() { echo "tdf${1}a tdf${1}b tdf${1}w"; }

check() {
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, veth and raw sockets); run as root"
  command -v ip >/dev/null || die "ip (iproute2) is missing; run scripts/install-deps.sh"
  local probe="tdf-probe-$$"
  ip netns add "$probe" 2>/dev/null || die "cannot create a network namespace (ip netns add failed)"
  if ! ip -n "$probe" link add p0 type veth peer name p1 2>/dev/null; then
    ip netns del "$probe"
    die "cannot create veth pairs (kernel without CONFIG_VETH?)"
  fi
  ip netns del "$probe"
}

# Frames must cross the wire as they would cross a cable: one packet each, with a full
# checksum. veth offloads would hand the wire 64 KB GSO super-frames (one loss decision
# for many packets, too big to write out again) and packets whose checksum the receiving
# kernel expects someone else to fill in.
no_offloads() {
  local ns=$1 dev=$2
  ip netns exec "$ns" ethtool -K "$dev" tx off sg off tso off gso off gro off \
    tx-udp-segmentation off >/dev/null 2>&1 ||
    ip netns exec "$ns" ethtool -K "$dev" tx off gso off gro off >/dev/null 2>&1 || true
}

up() {
  local id=$1 a b w
  command -v ethtool >/dev/null || die "ethtool is missing; run scripts/install-deps.sh"
  read -r a b w <<<"$(ns_names "$id")"
  for ns in $a $b $w; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  ip -n "$a" link add eth0 type veth peer name wa netns "$w"
  ip -n "$b" link add eth0 type veth peer name wb netns "$w"
  # The wire's side has no address and no IPv6 of its own: it only carries frames.
  ip netns exec "$w" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
  ip -n "$a" addr add "$ADDR_A/24" dev eth0
  ip -n "$b" addr add "$ADDR_B/24" dev eth0
  for pair in "$a eth0" "$b eth0" "$w wa" "$w wb"; do
    set -- $pair
    no_offloads "$1" "$2"
    ip -n "$1" link set "$2" up
  done
  ip -n "$w" link set wa promisc on
  ip -n "$w" link set wb promisc on
}

down() {
  local id=$1 ns pids
  for ns in $(ns_names "$id"); do
    ip netns list | grep -qw "^$ns" || continue
    # Whatever still runs inside (nodes of a failed test, the wire): it was started for
    # this run only.
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

clean() {
  local ns id
  for ns in $(ip netns list | awk '{print $1}' | grep -E '^tdf[0-9]+[abw]$' || true); do
    id=${ns#tdf}
    id=${id%?}
    if ! kill -0 "$id" 2>/dev/null; then
      echo "faults-net: removing $ns, left by run $id" >&2
      down "$id"
    fi
  done
}

wire() {
  local id=$1
  shift
  [ -x "$WIRE" ] || die "$WIRE not built; run: cargo build --release -p trust_dist_wire"
  exec ip netns exec "tdf${id}w" "$WIRE" --a wa --b wb "$@"
}

run() {
  local args=() id=$$ wire_pid
  while [ $# -gt 0 ] && [ "$1" != -- ]; do args+=("$1"); shift; done
  [ "${1:-}" = -- ] || die "usage: run [WIRE ARGS] -- CMD [ARGS]"
  shift
  [ $# -gt 0 ] || die "usage: run [WIRE ARGS] -- CMD [ARGS]"
  check
  clean
  trap 'down '"$id" EXIT
  trap 'exit 130' INT TERM
  up "$id"
  [ -x "$WIRE" ] || die "$WIRE not built; run: cargo build --release -p trust_dist_wire"
  ip netns exec "tdf${id}w" "$WIRE" --a wa --b wb --control signals "${args[@]}" </dev/null &
  wire_pid=$!
  sleep 0.2
  kill -0 "$wire_pid" 2>/dev/null || die "trust-dist-wire did not start"
  local status=0
  TD_NS_A="tdf${id}a" TD_NS_B="tdf${id}b" TD_NS_W="tdf${id}w" TD_ADDR_A=$ADDR_A \
    TD_ADDR_B=$ADDR_B TD_WIRE_PID=$wire_pid "$@" || status=$?
  kill -TERM "$wire_pid" 2>/dev/null || true
  wait "$wire_pid" 2>/dev/null || true
  return $status
}

cmd=${1:-}
shift || true
case "$cmd" in
  check) check ;;
  up) [ $# -eq 1 ] || die "usage: up ID"; check; up "$1" ;;
  down) [ $# -eq 1 ] || die "usage: down ID"; down "$1" ;;
  clean) clean ;;
  wire) [ $# -ge 1 ] || die "usage: wire ID [WIRE ARGS]"; wire "$@" ;;
  run) run "$@" ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
