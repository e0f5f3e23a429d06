#!/bin/sh
# Builds the NIF and the CLI with cargo and installs them where the Erlang code and
# operators look for them: priv/native/trust_dist_nif.so and bin/trust-dist.
# Used by rebar3's pre-compile hook (mix.exs does the same in its own compiler step).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --quiet -p trust_dist_nif -p trust_dist_cli
target="${CARGO_TARGET_DIR:-target}"
mkdir -p priv/native bin
cp "$target/release/libtrust_dist_nif.so" priv/native/trust_dist_nif.so.tmp
mv priv/native/trust_dist_nif.so.tmp priv/native/trust_dist_nif.so
cp "$target/release/trust-dist" bin/trust-dist.tmp
mv bin/trust-dist.tmp bin/trust-dist
