#!/usr/bin/env bash
# Installs what building and testing trust_dist needs and is missing: Erlang/OTP and
# Elixir from Debian (OTP 25 and Elixir 1.14 on bookworm), rebar3, debootstrap for the OTP
# version matrix, ethtool for the fault-injection namespaces, and a Rust toolchain check.
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail

need=()
command -v erl >/dev/null 2>&1 || need+=(erlang-nox)
[ -f "$(dirname "$(readlink -f "$(command -v erl 2>/dev/null || echo /usr/bin/erl)")")/../usr/include/erl_nif.h" ] \
  || [ -f /usr/lib/erlang/usr/include/erl_nif.h ] || need+=(erlang-dev)
command -v elixir >/dev/null 2>&1 || need+=(elixir)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v epmd >/dev/null 2>&1 || need+=(erlang-base)
command -v rebar3 >/dev/null 2>&1 || need+=(rebar3)   # make releases (works offline)
command -v ethtool >/dev/null 2>&1 || need+=(ethtool) # make faults: veth offloads off

if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; install a Rust toolchain (1.80 or newer) first" >&2
  exit 1
fi

# Hex is never needed: the project has no Hex dependencies. Mix only wants its local
# archive directory to exist.
mix local >/dev/null 2>&1 || true
