#!/usr/bin/env bash
# otp-chroot.sh -- run real OTP 27 / OTP 29 BEAM nodes on this (Debian
# bookworm, OTP 25) host, from debootstrap chroots that share the host's
# network (loopback, epmd) and see the repository at the same absolute path.
#
# Usage:
#   otp-chroot.sh ensure  VERSION          build chroot if needed; last stdout line = chroot path
#   otp-chroot.sh erl     VERSION ARGS...  exec the chroot's erl  (stdin/stdout untouched, same PID)
#   otp-chroot.sh erlc    VERSION ARGS...  exec the chroot's erlc
#   otp-chroot.sh run     VERSION CMD...   exec any command inside the chroot (debugging)
#   otp-chroot.sh release VERSION          print the OTP major release inside (e.g. "27")
#   otp-chroot.sh otp-version VERSION      print the full OTP_VERSION inside (e.g. "27.3.4.1")
#   otp-chroot.sh path    VERSION          print the chroot path (no build)
#   otp-chroot.sh remove  VERSION          delete the chroot (safely; never follows into binds)
#
# VERSION is 27 (Debian trixie) or 29 (Debian sid).
#
# Design notes
# ------------
# * Chroots live in $REPO/.otp-chroots/otpNN (override the base directory with
#   OTP_CHROOT_BASE). $REPO is derived from this script's location.
# * A chroot is "ready" only when $ROOT/.otp-chroot-ready exists; it is written
#   last, after a successful debootstrap and a smoke test of erl. A chroot
#   directory without the marker is treated as a failed/partial build and is
#   deleted and rebuilt by `ensure`. `ensure` holds a flock, so concurrent
#   callers (parallel tests) build only once. `erl`/`erlc`/`run` never build:
#   they fail fast (exit 2) if the chroot is not ready, because a 35 s build
#   inside e.g. peer:start_link would just time out.
# * Mirror: first ".../debian" URI found in /etc/apt/sources.list{,.d/*}
#   (override with OTP_CHROOT_MIRROR). It is probed before debootstrap so an
#   unreachable mirror gives a clear error.
# * Mounts: every erl/erlc/run invocation does
#       unshare --mount --propagation private  ->  bind mounts  ->  chroot  ->  exec
#   i.e. the bind mounts live in a private mount namespace that exists only as
#   long as the process. Nothing is ever mounted in the host namespace, so
#   there is no mount stacking, nothing to clean up after kill -9, and
#   concurrent nodes don't interfere. No network namespace is created, so the
#   node shares the host's loopback and the host's epmd (port 4369).
#   Bound at the same path inside the chroot:
#       /dev (rbind: /dev/null, /dev/urandom, /dev/pts, /dev/shm), /proc, /sys
#       (erts reads CPU topology from /sys and /proc), /tmp (so temp dirs created by
#       tests on the host are visible at the same path), $REPO, $HOME (see below),
#       /etc/hosts + /etc/resolv.conf (so -sname/hostname resolution matches
#       the host), plus every path in OTP_CHROOT_BINDS (colon separated; e.g. a
#       CARGO_TARGET_DIR outside the repo).
# * epmd: `erl` first runs the host's `epmd -daemon` (no-op if an epmd is
#   already listening on 4369), so nodes in all chroots and on the host
#   register with one host epmd. Set OTP_CHROOT_NO_HOST_EPMD=1 to skip.
# * HOME: the caller's HOME is passed through unchanged and, if it is an
#   existing directory, bind mounted at the same path. So ~/.erlang.cookie is
#   the very same file host nodes use (default cookies match). If HOME is
#   unset/nonexistent/"/", HOME is set to $BASE/home (created on demand).
# * Environment: passed through (ERL_FLAGS, ERL_LIBS, ... work), except PATH is
#   reset to the standard Debian one and BINDIR/ROOTDIR/EMU/PROGNAME (set by the
#   *host* erl script and inherited by ports the host VM opens, e.g. from the
#   peer module) are removed so they cannot point the chroot's erl at host paths.
# * Working directory: kept if it is visible inside the chroot (after the binds),
#   else $REPO.
# * PID chain: bash -exec-> unshare -exec-> bash -exec-> chroot -exec-> env
#   -exec-> erl (sh) -exec-> erlexec -exec-> beam.smp. The PID of this script
#   IS the VM's PID, so kill -9 on it kills the VM, and Erlang's peer module
#   (exec => {Path, Args}) gets the VM's stdin/stdout directly.
# * Removing a chroot uses `rm -rf --one-file-system` after unmounting anything
#   still mounted below it (e.g. proc/sys left by a killed debootstrap), so it
#   can never recurse into a bind of the repository or /tmp.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd -P)"
BASE="${OTP_CHROOT_BASE:-$REPO/.otp-chroots}"
MARKER_NAME=".otp-chroot-ready"
STD_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Packages on top of minbase. erlang-nox pulls erlang-base (erl, erlc, escript)
# and all non-GUI OTP applications (crypto, ssl, public_key, ...); erlang-dev
# adds the C headers (erl_nif.h, ei.h) for building NIFs/ports against this OTP.
PACKAGES="erlang-nox,erlang-dev"

die() { echo "otp-chroot.sh: error: $*" >&2; exit 1; }
log() { echo "otp-chroot.sh: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed -e 's/^# \{0,1\}//' -e '/^set -euo/d' >&2
    exit 2
}

# VERSION -> Debian suite
suite_for() {
    case "$1" in
        27) echo trixie ;;
        29) echo sid ;;
        *) die "unsupported OTP version '$1' (expected 27 or 29)" ;;
    esac
}

root_for() { suite_for "$1" >/dev/null; echo "$BASE/otp$1"; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (chroot/mount/unshare)"; }

# Find the Debian mirror the host's apt already uses.
detect_mirror() {
    if [ -n "${OTP_CHROOT_MIRROR:-}" ]; then echo "${OTP_CHROOT_MIRROR%/}"; return; fi
    local f uri
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        # one-line format: deb [opts] URI suite comps ; deb822: URIs: URI ...
        while read -r uri; do
            uri="${uri%/}"
            case "$uri" in
                http://*/debian|https://*/debian) echo "$uri"; return ;;
            esac
        done < <(awk '
            /^[[:space:]]*#/ {next}
            $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break } }
            tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f")
    done
    echo "http://deb.debian.org/debian"
}

# Unmount everything mounted at or below $1 (deepest first), in the host namespace.
umount_below() {
    local dir="$1" mp
    while read -r mp; do
        umount -l "$mp" 2>/dev/null || true
    done < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
}

remove_root() {
    local root="$1"
    [ -e "$root" ] || return 0
    case "$root" in "$BASE"/otp[0-9]*) ;; *) die "refusing to remove '$root'";; esac
    umount_below "$root"
    rm -rf --one-file-system "$root"
    [ ! -e "$root" ] || die "could not remove $root"
}

cmd_ensure() {
    local ver="$1" suite root mirror t0 rel
    suite="$(suite_for "$ver")"
    root="$(root_for "$ver")"
    need_root
    mkdir -p "$BASE"
    # Serialize builds of the same version (parallel test runs).
    exec 9>"$BASE/.otp$ver.lock"
    flock 9
    if [ -f "$root/$MARKER_NAME" ]; then
        echo "$root"
        return 0
    fi
    if [ -e "$root" ]; then
        log "removing partial chroot $root (no $MARKER_NAME)"
        remove_root "$root"
    fi
    command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap)"
    mirror="$(detect_mirror)"
    log "building OTP $ver chroot: suite=$suite mirror=$mirror dir=$root"
    # Probe the mirror first for a clear error message.
    if ! wget -q -T 20 -t 2 -O /dev/null "$mirror/dists/$suite/Release"; then
        die "Debian mirror unreachable: $mirror/dists/$suite/Release (set OTP_CHROOT_MIRROR?)"
    fi
    t0=$(date +%s)
    # debootstrap mounts proc/sys inside the target; run it in a private mount
    # namespace so those mounts vanish even if it is killed. Its output -> stderr.
    if ! unshare --mount --propagation private -- \
            debootstrap --variant=minbase --include="$PACKAGES" "$suite" "$root" "$mirror" >&2; then
        [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 20 "$root/debootstrap/debootstrap.log" >&2
        die "debootstrap of $suite into $root failed (partial chroot left; next 'ensure' rebuilds it)"
    fi
    # Drop the downloaded .debs (~100 MB) -- not needed after install.
    rm -f "$root"/var/cache/apt/archives/*.deb
    [ -x "$root/usr/bin/erl" ] && [ -x "$root/usr/bin/erlc" ] || die "erl/erlc missing in $root"
    # Smoke test through the same path users take (without the marker check).
    rel="$(enter "$root" /usr/bin/erl -noshell -eval \
        'io:format("~s~n",[erlang:system_info(otp_release)]), halt().' </dev/null)" \
        || die "erl does not start inside $root"
    [ "$rel" = "$ver" ] || die "$suite provides OTP '$rel', not $ver (Debian moved on?); chroot left unmarked"
    {
        echo "suite=$suite"
        echo "mirror=$mirror"
        echo "otp_version=$(cat "$root"/usr/lib/erlang/releases/"$ver"/OTP_VERSION)"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } > "$root/$MARKER_NAME"
    log "OTP $ver chroot ready in $(( $(date +%s) - t0 )) s ($(du -sh --one-file-system "$root" | cut -f1))"
    echo "$root"
}

# Run (not exec) a command in ROOT through the private-namespace path; used
# by ensure's smoke test.
enter() { unshare --mount --propagation private -- "$SELF" __inner "$@"; }

ready_root() {
    local ver="$1" root
    root="$(root_for "$ver")"
    [ -f "$root/$MARKER_NAME" ] || {
        echo "otp-chroot.sh: OTP $ver chroot not built ($root); run: $SELF ensure $ver" >&2
        exit 2
    }
    echo "$root"
}

# bind SRC at the same path inside ROOT (dir or file); skip missing sources.
bind_same() {
    local root="$1" src="$2" flag="${3:---bind}"
    [ -e "$src" ] || return 0
    if [ -d "$src" ]; then
        mkdir -p "$root$src"
    else
        mkdir -p "$(dirname "$root$src")"
        [ -e "$root$src" ] || : > "$root$src"
    fi
    mount "$flag" "$src" "$root$src" >&2
}

# Internal: runs already inside the private mount namespace created by unshare.
# Sets up the binds, then execs the command inside the chroot.
cmd_inner() {
    local root="$1"; shift
    # Make sure nothing we mount propagates to the host, even if unshare's
    # --propagation was not honoured.
    mount --make-rprivate / 2>/dev/null || true
    bind_same "$root" /dev --rbind
    bind_same "$root" /proc
    bind_same "$root" /sys --rbind
    bind_same "$root" /tmp
    bind_same "$root" /etc/hosts
    bind_same "$root" /etc/resolv.conf
    bind_same "$root" "$REPO"
    if [ -n "${HOME:-}" ] && [ "$HOME" != / ] && [ -d "$HOME" ]; then
        bind_same "$root" "$HOME"
    else
        export HOME="$BASE/home"
        mkdir -p "$HOME"
    fi
    local p
    if [ -n "${OTP_CHROOT_BINDS:-}" ]; then
        local IFS=:
        for p in $OTP_CHROOT_BINDS; do if [ -n "$p" ]; then bind_same "$root" "$p"; fi; done
        unset IFS
    fi
    local wd="$PWD"
    [ -d "$root$wd" ] || wd="$REPO"
    unset BINDIR ROOTDIR EMU PROGNAME
    export PATH="$STD_PATH"
    exec chroot "$root" /usr/bin/env -C "$wd" "$@"
}

# exec CMD inside the ready chroot for VERSION, keeping this PID.
exec_in() {
    local ver="$1"; shift
    local root
    root="$(ready_root "$ver")"
    need_root
    exec unshare --mount --propagation private -- "$SELF" __inner "$root" "$@"
}

main() {
    [ $# -ge 1 ] || usage
    local sub="$1"; shift
    case "$sub" in
        ensure)
            [ $# -eq 1 ] || usage
            cmd_ensure "$1" ;;
        erl|erlc|escript)
            [ $# -ge 1 ] || usage
            local ver="$1"; shift
            # If no epmd is running, the first distributed node would start
            # one from *inside* the chroot (that epmd would then outlive the
            # node, pinning the chroot's binary and mount namespace). Start
            # the host's epmd instead; it is a no-op if one already listens.
            if [ "$sub" = erl ] && [ -z "${OTP_CHROOT_NO_HOST_EPMD:-}" ] && command -v epmd >/dev/null; then
                epmd -daemon </dev/null >/dev/null 2>&1 || true
            fi
            exec_in "$ver" "/usr/bin/$sub" "$@" ;;
        run)
            [ $# -ge 2 ] || usage
            local ver="$1"; shift
            exec_in "$ver" "$@" ;;
        release)
            [ $# -eq 1 ] || usage
            local root d
            root="$(ready_root "$1")"
            for d in "$root"/usr/lib/erlang/releases/*/; do
                d="$(basename "$d")"
                if [[ "$d" =~ ^[0-9]+$ ]]; then echo "$d"; fi
            done ;;
        otp-version)
            [ $# -eq 1 ] || usage
            cat "$(ready_root "$1")"/usr/lib/erlang/releases/*/OTP_VERSION ;;
        path)
            [ $# -eq 1 ] || usage
            root_for "$1" ;;
        remove)
            [ $# -eq 1 ] || usage
            need_root
            remove_root "$(root_for "$1")" ;;
        __inner)
            cmd_inner "$@" ;;
        -h|--help|help) usage ;;
        *) usage ;;
    esac
}

main "$@"
