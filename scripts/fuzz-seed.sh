#!/usr/bin/env bash
# Seeds native/proto/fuzz/corpus/<target>/ from the captured distribution packets in
# native/proto/tests/vectors/otp*/ (idempotent: seeds are named after their source).
set -euo pipefail
cd "$(dirname "$0")/.."
vectors=native/proto/tests/vectors
corpus=native/proto/fuzz/corpus
mkdir -p "$corpus"/{etf_walk,control_decode,filter_decide,frame_decoder,hello_and_certificate,handshake_name,lane_copy}

# Big-endian length prefixes, as bytes printf can write.
be16() { printf "\\x$(printf %02x $(($1 >> 8 & 255)))\\x$(printf %02x $(($1 & 255)))"; }
be32() { be16 $(($1 >> 16 & 65535)); be16 $(($1 & 65535)); }

n=0
for f in "$vectors"/otp*/*.bin; do
  size=$(stat -c %s "$f")
  [ "$size" -le 8192 ] || continue   # the 1 MiB vector would only slow libFuzzer down
  rel=$(basename "$(dirname "$f")")
  name="${rel}_$(basename "$f" .bin)"
  cp "$f" "$corpus/control_decode/$name"
  # The walker starts at the control term (after 112 and its version byte).
  tail -c +3 "$f" > "$corpus/etf_walk/$name"
  # filter_decide: the packet alone (decided), and as an observed record (kind 0x7f)
  # followed by itself decided (0x7e).
  cp "$f" "$corpus/filter_decide/$name"
  { printf '\x7f'; be16 "$size"; cat "$f"; printf '\x7e'; be16 "$size"; cat "$f"; } \
    > "$corpus/filter_decide/rec_$name"
  # frame_decoder: limits 65535/65535, chunk seed 7, then the framed packet twice.
  { printf '\xff\xff\xff\xff\x07'; be32 "$size"; cat "$f"; be32 "$size"; cat "$f"; } \
    > "$corpus/frame_decoder/$name"
  n=$((n + 1))
done

# filter_decide: each capture step replayed in order (outgoing observed, incoming
# decided), when python3 is there to read index.json.
if command -v python3 >/dev/null; then
  python3 - "$vectors" "$corpus/filter_decide" <<'PY'
import json, os, sys
vectors, out = sys.argv[1], sys.argv[2]
for rel in sorted(d for d in os.listdir(vectors) if d.startswith("otp")):
    index = json.load(open(os.path.join(vectors, rel, "index.json")))
    steps = {}
    for v in index["vectors"]:
        steps.setdefault(v["step"], []).append(v)
    for step, vs in steps.items():
        data = b""
        for v in vs:
            raw = open(os.path.join(vectors, rel, v["file"]), "rb").read()
            if len(raw) > 8192:
                break
            kind = 0x7E if v["direction"] == "lo->hi" else 0x7F
            data += bytes([kind]) + len(raw).to_bytes(2, "big") + raw
        else:
            open(os.path.join(out, f"step_{rel}_{step}"), "wb").write(data)
PY
fi

# hello_and_certificate: the valid hello and certificate unchanged (modes 1 and 4),
# an empty hello (mode 0), a PEM certificate (mode 3) and a raw public key (mode 5).
printf '\x01' > "$corpus/hello_and_certificate/valid_hello"
printf '\x04' > "$corpus/hello_and_certificate/valid_certificate"
printf '\x00\x92\x01\xc4\x00' > "$corpus/hello_and_certificate/empty_hello"
printf '\x03-----BEGIN TRUST DIST CERTIFICATE-----\nkwHEAMQA\n-----END TRUST DIST CERTIFICATE-----\n' \
  > "$corpus/hello_and_certificate/pem"
# mode 5: an ed25519 SubjectPublicKeyInfo, as a peer's TLS raw public key arrives.
{ printf '\x05\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00'; head -c 32 /dev/zero | tr '\0' '\021'; } \
  > "$corpus/hello_and_certificate/spki"

# handshake_name: a send_name (accepting) and send_status + send_challenge (connecting).
name=worker-1@10.0.0.1
send_name() { printf 'N\x00\x00\x00\x0d\x07\xdf\x7f\xbd\x00\x00\x00\x2a'; be16 ${#name}; printf %s "$name"; }
challenge() { printf 'N\x00\x00\x00\x0d\x07\xdf\x7f\xbd\x12\x34\x56\x78\x00\x00\x00\x2a'; be16 ${#name}; printf %s "$name"; }
{ printf '\x00'; printf "\\x$(printf %02x $((13 + 2 + ${#name})))"; send_name; } \
  > "$corpus/handshake_name/accepting"
{ printf '\x01\x03sok'; printf "\\x$(printf %02x $((17 + 2 + ${#name})))"; challenge; } \
  > "$corpus/handshake_name/connecting"

# lane_copy: a copy of a small frame on lane 5 at stream offset 1, and one on lane 31.
printf '\x05\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x02pq' > "$corpus/lane_copy/lane5"
printf '\x1f\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x08' \
  > "$corpus/lane_copy/lane31"

echo "fuzz corpora seeded from $n vectors in $corpus/"
