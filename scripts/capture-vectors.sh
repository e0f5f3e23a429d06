#!/usr/bin/env bash
# capture-vectors.sh [25|27|29] -- capture real distribution packets between two
# trust_dist nodes of one OTP release (hi: tier admin, lo: tier worker; hi's link is
# restricted) and store them as decoder test vectors in
# native/proto/tests/vectors/otpNN/ (each packet a .bin, plus index.json, table.md and
# transcript.txt), then rebuild native/proto/tests/vectors/README.md.
#
# Needs `make build` (bin/trust-dist, the NIF, _build/dev) and, for a release other than
# the host's, its chroot (scripts/otp-chroot.sh ensure NN). Default: the host's release.
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd -P)"
HOST_REL="$(erl -noshell -eval 'io:format("~s", [erlang:system_info(otp_release)]), halt().')"
REL="${1:-$HOST_REL}"
OUT="$ROOT/native/proto/tests/vectors"
[ -x "$ROOT/bin/trust-dist" ] || { echo "capture-vectors: run 'make build' first" >&2; exit 1; }
if [ "$REL" != "$HOST_REL" ]; then
  "$ROOT/scripts/otp-chroot.sh" release "$REL" >/dev/null \
    || { echo "capture-vectors: OTP $REL chroot not built (scripts/otp-chroot.sh ensure $REL)" >&2; exit 1; }
fi
mkdir -p "$OUT"
escript "$ROOT/test/capture/capture_vectors.escript" "$ROOT" "$REL" "$OUT"
# README = the hand-written head + each release's generated table.
{
  cat "$ROOT/test/capture/README.head.md"
  echo
  echo "## Coverage: files per control-message op"
  echo
  escript "$ROOT/test/capture/capture_vectors.escript" --coverage "$OUT"
  echo
  echo "## Vectors"
  for t in "$OUT"/otp*/table.md; do echo; cat "$t"; done
} > "$OUT/README.md"
echo "capture-vectors: wrote $OUT/README.md"
