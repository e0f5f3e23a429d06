#!/usr/bin/env bash
# `make releases`: builds examples/mix_release (mix release) and examples/rebar3_release
# (rebar3/relx) from scratch, generates keys with `bin/trust-dist dev-cluster`, boots two
# nodes of each release on loopback (tiers admin and worker; one in embedded mode, one in
# interactive mode), and checks over the trust_dist carrier:
#   - the nodes connect (net_adm:ping, a call to the other node's registered greeter,
#     trust_dist:links() showing the link as restricted on the admin side);
#   - the code loading mode of each node;
#   - a remote shell (`bin/hello_rel remote`, `bin/trust-console remote_console`) runs a
#     command on the node, driven through a pseudo-terminal;
#   - the relx helpers run after a node's boot (the same setup as its boot-time pings)
#     leave the vm.args and sys.config it booted from alone;
#   - `stop` ends each node.
# Every wait is bounded; no process is left behind (whatever started under the work
# directory is killed on exit). Exits 0 only if every check held.
# RELEASES_KEEP=1 keeps the work directory; RELEASES_CLEAN=0 reuses the examples' builds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export MIX_HOME="${MIX_HOME:-$root/_build/mix_home}" HEX_OFFLINE=1
mkdir -p "$MIX_HOME"

work=$(mktemp -d -t trust_dist_releases.XXXXXX)
started=$(date +%s)
failures=0

# Every process of this run has $work on its command line (configs, pipes, logs).
leftovers() {
  local pid
  for pid in $(ps -eo pid=); do
    [ "$pid" = "$$" ] && continue
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$work" && echo "$pid"
  done
  return 0
}
cleanup() {
  local pids
  pids=$(leftovers)
  if [ -n "$pids" ]; then
    echo "releases: killing leftover processes: $(echo $pids)" >&2
    kill -9 $pids 2>/dev/null || true
  fi
  if [ "${RELEASES_KEEP:-0}" = 1 ]; then echo "releases: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

step() { echo "== [$(($(date +%s) - started))s] $*"; }
ok() { echo "   ok: $*"; }
fail() { echo "   FAILED: $*" >&2; failures=$((failures + 1)); }
# check DESCRIPTION OUTPUT PATTERN...: every (extended regex) pattern must occur.
check() {
  local what=$1 out=$2 p
  shift 2
  for p in "$@"; do
    if ! grep -Eq -- "$p" <<<"$out"; then
      fail "$what: no /$p/ in:"
      sed 's/^/      | /' <<<"$out" >&2
      return 0
    fi
  done
  ok "$what"
}
# show_logs DIR: the end of each log a node left in DIR, so that CI's output says why.
show_logs() {
  local f
  for f in "$1"/*; do
    [ -f "$f" ] || continue
    echo "      --- the end of $f:" >&2
    tail -n 40 "$f" | sed 's/^/      | /' >&2
  done
  echo "      --- epmd -names:" >&2
  { epmd -names 2>&1 || true; } | sed 's/^/      | /' >&2
}
# until_ok SECONDS COMMAND...: retries COMMAND (each try bounded) until it succeeds.
until_ok() {
  local deadline=$(($(date +%s) + $1))
  shift
  until timeout 20 "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 0.5
  done
}
# wait_gone SECONDS PID: waits for a process to end.
wait_gone() {
  local deadline=$(($(date +%s) + $1))
  while kill -0 "$2" 2>/dev/null; do
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}

# pty_session NAME COMMAND PROMPT_REGEX INPUT DONE_REGEX: runs COMMAND in a
# pseudo-terminal (util-linux `script`; remote shells need a terminal), waits for the
# prompt, types INPUT, waits for DONE_REGEX, then leaves with Ctrl-G q (the local
# helper node quits; the remote node stays). Prints the transcript.
pty_session() {
  local name=$1 cmd=$2 prompt=$3 input=$4 done_re=$5
  local in="$work/$name.in" out="$work/$name.out" pid deadline
  mkfifo "$in"
  : >"$out"
  script -qfec "$cmd" /dev/null <"$in" >"$out" 2>&1 &
  pid=$!
  exec 3>"$in"
  deadline=$(($(date +%s) + 40))
  until grep -Eq -- "$prompt" "$out"; do
    [ "$(date +%s)" -ge "$deadline" ] || ! kill -0 "$pid" 2>/dev/null && break
    sleep 0.2
  done
  printf '%s\n' "$input" >&3
  until grep -Eq -- "$done_re" "$out"; do
    [ "$(date +%s)" -ge "$deadline" ] || ! kill -0 "$pid" 2>/dev/null && break
    sleep 0.2
  done
  printf '\007' >&3
  sleep 0.3
  printf 'q\n' >&3
  exec 3>&-
  wait_gone 15 "$pid" || kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  tr -d '\r' <"$out"
}

# ---------------------------------------------------------------------------------
step "build: mix release (examples/mix_release) and rebar3 release (examples/rebar3_release)"
command -v rebar3 >/dev/null || { echo "releases: rebar3 missing (scripts/install-deps.sh)" >&2; exit 1; }
command -v script >/dev/null || { echo "releases: script (util-linux) missing" >&2; exit 1; }
if [ "${RELEASES_CLEAN:-1}" = 1 ]; then
  rm -rf examples/mix_release/_build examples/mix_release/deps examples/rebar3_release/_build
fi
t0=$(date +%s)
(cd examples/mix_release && MIX_ENV=prod mix release --overwrite --quiet) >"$work/mix_build.log" 2>&1 \
  || { cat "$work/mix_build.log" >&2; echo "releases: mix release failed" >&2; exit 1; }
echo "   mix release: $(($(date +%s) - t0)) s"
t0=$(date +%s)
(cd examples/rebar3_release && rebar3 release) >"$work/rebar3_build.log" 2>&1 \
  || { cat "$work/rebar3_build.log" >&2; echo "releases: rebar3 release failed" >&2; exit 1; }
echo "   rebar3 release: $(($(date +%s) - t0)) s"
mixrel="$root/examples/mix_release/_build/prod/rel/hello_rel"
rebarrel="$root/examples/rebar3_release/_build/default/rel/hello_rel"

# ---------------------------------------------------------------------------------
step "keys: bin/trust-dist dev-cluster, a console certificate per node"
s=$$
host=127.0.0.1
mix_a="mixa$s" mix_b="mixb$s" reb_a="rebara$s" reb_b="rebarb$s"
bin/trust-dist dev-cluster "$work/keys" "$mix_a@$host:admin" "$mix_b@$host:worker" \
  "$reb_a@$host:admin" "$reb_b@$host:worker" \
  --ebin "$root/examples/mix_release/_build/prod/lib/trust_dist/ebin" >/dev/null
# Each node's trust directory: the authority, the node's key and certificate, and the
# identity of its helper nodes (remote shells, rpc): a certificate for r*-NODE of the
# node's own tier, so helpers are peers of the node (a full link both ways).
for spec in "$mix_a:admin" "$mix_b:worker" "$reb_a:admin" "$reb_b:worker"; do
  n=${spec%%:*} tier=${spec##*:}
  d="$work/keys/$n"
  cp "$work/keys/authority/authority.pub" "$d/"
  bin/trust-dist node new "r*-$n@$host" --tier "$tier" --authority "$work/keys/authority" \
    --out "$d" >/dev/null
  mv "$d/r_-$n.key" "$d/console.key"
  mv "$d/r_-$n.cert" "$d/console.cert"
done
ok "keys for $mix_a, $mix_b, $reb_a, $reb_b in $work/keys"
epmd -daemon

# ---------------------------------------------------------------------------------
step "mix release: boot $mix_a (admin, embedded) and $mix_b (worker, interactive)"
mix_env() { # mix_env NAME MODE: the environment bin/hello_rel of the Mix release needs
  echo RELEASE_NODE="$1@$host" RELEASE_TRUST_DIR="$work/keys/$1" RELEASE_TMP="$work/mix_tmp_$1" \
    RELEASE_MODE="$2"
}
mixcmd() { # mixcmd NAME MODE ARGS...
  local n=$1 m=$2
  shift 2
  env $(mix_env "$n" "$m") timeout 30 "$mixrel/bin/hello_rel" "$@"
}
mixcmd "$mix_a" embedded daemon
mixcmd "$mix_b" interactive daemon
for n in "$mix_a" "$mix_b"; do
  until_ok 40 env $(mix_env "$n" embedded) "$mixrel/bin/hello_rel" rpc 'IO.puts(:up)' \
    || { fail "$n did not come up"; show_logs "$work/mix_tmp_$n/log"; }
done
mix_pid_a=$(mixcmd "$mix_a" embedded pid | tr -d '\r' | tail -n1)
mix_pid_b=$(mixcmd "$mix_b" interactive pid | tr -d '\r' | tail -n1)

out=$(mixcmd "$mix_a" embedded rpc "
  IO.inspect({:mode, :code.get_mode(), :init.get_argument(:mode)})
  IO.inspect({:ping, Node.ping(:\"$mix_b@$host\")})
  IO.inspect({:call, HelloRel.Greeter.hello(:\"$mix_b@$host\")})
  IO.inspect({:links, for(l <- :trust_dist.links(), do: {l.node, l.tier, l.mode})}, limit: :infinity)
" 2>&1) || true
check "mix $mix_a: embedded mode" "$out" "\{:mode, :embedded, \{:ok, \[\['embedded'\]\]\}\}"
check "mix $mix_a -> $mix_b: ping and greeter call over trust_dist" "$out" \
  "\{:ping, :pong\}" "from: :\"$mix_b@$host\""
check "mix $mix_a: link to $mix_b restricted (worker)" "$out" \
  "\{:\"$mix_b@$host\", \"worker\", :restricted\}"
out=$(mixcmd "$mix_b" interactive rpc "
  IO.inspect({:mode, :code.get_mode()})
  IO.inspect({:call, HelloRel.Greeter.hello(:\"$mix_a@$host\")})
  IO.inspect({:links, for(l <- :trust_dist.links(), do: {l.node, l.tier, l.mode})}, limit: :infinity)
" 2>&1) || true
check "mix $mix_b: interactive mode" "$out" "\{:mode, :interactive\}"
check "mix $mix_b -> $mix_a: greeter call allowed by the policy, link full" "$out" \
  "from: :\"$mix_a@$host\"" "\{:\"$mix_a@$host\", \"admin\", :full\}"

step "mix release: bin/hello_rel remote (IEx remote shell over trust_dist)"
for spec in "$mix_a:embedded" "$mix_b:interactive"; do
  n=${spec%%:*} m=${spec##*:}
  out=$(pty_session "remote_$n" "env $(mix_env "$n" "$m") $mixrel/bin/hello_rel remote" \
    "iex\($n@$host\)1>" \
    'IO.puts(Enum.join(["REMSH", "OK", node(), :code.get_mode(), node(:erlang.group_leader())], " "))' \
    "REMSH OK")
  check "mix remote shell on $n" "$out" "REMSH OK $n@$host $m rem-[0-9a-f]+-$n@$host"
done

step "mix release: stop"
for spec in "$mix_a:$mix_pid_a" "$mix_b:$mix_pid_b"; do
  n=${spec%%:*} pid=${spec##*:}
  mixcmd "$n" embedded stop >/dev/null 2>&1 || true
  if [[ "$pid" =~ ^[0-9]+$ ]] && wait_gone 30 "$pid"; then ok "$n stopped"; else fail "$n did not stop"; fi
done

# ---------------------------------------------------------------------------------
step "rebar3 release: boot $reb_a (admin, embedded) and $reb_b (worker, interactive)"
export RELX_COOKIE
RELX_COOKIE=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
reb_env() { # reb_env NAME MODE
  echo NODE_NAME="$1" NODE_HOST="$host" TRUST_DIST_DIR="$work/keys/$1" \
    CODE_LOADING_MODE="$2" RELX_OUT_FILE_PATH="$work/relx_$1" RUNNER_LOG_DIR="$work/relx_log_$1" \
    PIPE_DIR="$work/relx_pipe_$1/" TMPDIR="$work"
}
rebcmd() { # rebcmd NAME MODE ARGS...: through bin/trust-console (see its header)
  local n=$1 m=$2
  shift 2
  mkdir -p "$work/relx_$n"
  env $(reb_env "$n" "$m") timeout 90 "$rebarrel/bin/trust-console" "$@"
}
rebcmd "$reb_a" embedded daemon || { fail "$reb_a did not start"; show_logs "$work/relx_log_$reb_a"; }
rebcmd "$reb_b" interactive daemon || { fail "$reb_b did not start"; show_logs "$work/relx_log_$reb_b"; }
# What each node booted from: relx renders these at every run of bin/hello_rel, so a helper
# that rendered into the node's directory could hand a booting node a half-written file.
# trust-console gives its boot-time pings and every later helper the same directory of
# their own, so the later ones stand for both here.
rendered() {
  local f
  for f in "$work/relx_$1/vm.args" "$work/relx_$1/sys.config"; do
    if [ -s "$f" ]; then stat -c '%n %y' "$f"; else echo "$f missing or empty"; fi
  done
}
booted_from_a=$(rendered "$reb_a")
booted_from_b=$(rendered "$reb_b")
reb_pid_a=$(rebcmd "$reb_a" embedded pid 2>/dev/null | tail -n1 | tr -d '\r"')
reb_pid_b=$(rebcmd "$reb_b" interactive pid 2>/dev/null | tail -n1 | tr -d '\r"')

links='[{N, T, M} || #{node := N, tier := T, mode := M} <- trust_dist:links()]'
out=$(rebcmd "$reb_a" embedded eval "{{mode, code:get_mode(), init:get_argument(mode)},
  {ping, net_adm:ping('$reb_b@$host')}, {call, hello_greeter:hello('$reb_b@$host')},
  {links, $links}}." 2>&1) || true
check "rebar3 $reb_a: embedded mode" "$out" "\{mode,embedded,\{ok,\[\[\"embedded\"\]\]\}\}"
check "rebar3 $reb_a -> $reb_b: ping and greeter call over trust_dist" "$out" \
  "\{ping,pong\}" "\{from,'$reb_b@$host'\}"
check "rebar3 $reb_a: link to $reb_b restricted (worker)" "$out" \
  "\{'$reb_b@$host',<<\"worker\">>,restricted\}"
out=$(rebcmd "$reb_b" interactive eval "{{mode, code:get_mode()},
  {call, hello_greeter:hello('$reb_a@$host')}, {links, $links}}." 2>&1) || true
check "rebar3 $reb_b: interactive mode" "$out" "\{mode,interactive\}"
check "rebar3 $reb_b -> $reb_a: greeter call allowed by the policy, link full" "$out" \
  "\{from,'$reb_a@$host'\}" "\{'$reb_a@$host',<<\"admin\">>,full\}"
out=$(rebcmd "$reb_a" embedded rpc erlang node 2>&1) || true
check "rebar3 $reb_a: bin/trust-console rpc erlang node" "$out" "'$reb_a@$host'"

step "rebar3 release: bin/trust-console remote_console (erl -remsh over trust_dist)"
for spec in "$reb_a:embedded" "$reb_b:interactive"; do
  n=${spec%%:*} m=${spec##*:}
  mkdir -p "$work/relx_$n"
  out=$(pty_session "remote_console_$n" \
    "env $(reb_env "$n" "$m") $rebarrel/bin/trust-console remote_console" \
    "\($n@$host\)1>" \
    'io:format("~s ~s ~p ~p ~p~n", ["REMSH", "OK", node(), code:get_mode(), node(group_leader())]).' \
    "REMSH OK")
  check "rebar3 remote shell on $n" "$out" "REMSH OK '$n@$host' $m 'rpc-[0-9a-f]+-$n@$host'"
done

for spec in "$reb_a:$booted_from_a" "$reb_b:$booted_from_b"; do
  n=${spec%%:*}
  if [ "$(rendered "$n")" = "${spec#*:}" ] && ! grep -q "missing or empty" <<<"${spec#*:}"; then
    ok "rebar3 $n: the helpers left the vm.args and sys.config the node booted from alone"
  else
    fail "rebar3 $n: a helper rewrote the node's rendered files: before: ${spec#*:}; now: $(rendered "$n")"
  fi
done

step "rebar3 release: stop"
for spec in "$reb_a:$reb_pid_a" "$reb_b:$reb_pid_b"; do
  n=${spec%%:*} pid=${spec##*:}
  rebcmd "$n" embedded stop >/dev/null 2>&1 || true
  if [[ "$pid" =~ ^[0-9]+$ ]] && wait_gone 30 "$pid"; then ok "$n stopped"; else fail "$n did not stop"; fi
done

# ---------------------------------------------------------------------------------
left=$(leftovers)
if [ -n "$left" ]; then fail "processes left behind: $(echo $left)"; else ok "no process left behind"; fi
step "done: $failures failure(s)"
[ "$failures" -eq 0 ]
