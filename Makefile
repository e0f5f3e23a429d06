# trust_dist — the two commands a fresh machine needs are `make demo` and `make test`.
# Both install what is missing (scripts/install-deps.sh) and build first.

SHELL := /bin/bash
MIX_ENV ?= dev
export MIX_HOME ?= $(CURDIR)/_build/mix_home
export HEX_OFFLINE := 1

.PHONY: all deps build test test-rust test-elixir test-matrix matrix-chroots demo bench \
        fmt lint clean fuzz releases faults faults-check soak contention

all: build

deps:
	@scripts/install-deps.sh

# Rust crates (release), the NIF into priv/native, bin/trust-dist, and the Erlang/Elixir
# code into _build/$(MIX_ENV).
build: deps
	mix compile

test: deps test-rust test-elixir

test-rust:
	cargo test --workspace --release

# ExUnit: real BEAM nodes on the carrier over loopback. The OTP 27/29 matrix runs when
# its chroots can be built (CI builds them); set TRUST_DIST_MATRIX=0 to skip it.
test-elixir: deps
	@if [ "$${TRUST_DIST_MATRIX:-1}" != 0 ]; then $(MAKE) --no-print-directory matrix-chroots || true; fi
	MIX_ENV=test mix test

# test/soak_test.exs for 30 minutes: five nodes of three tiers, mixed traffic and attackers
# throughout; memory, atoms and throughput must stay flat. `make test` runs it for 2 minutes.
SOAK_SECONDS ?= 1800
soak: deps
	TRUST_DIST_SOAK_SECONDS=$(SOAK_SECONDS) MIX_ENV=test mix test test/soak_test.exs

matrix-chroots:
	@for v in 27 29; do scripts/otp-chroot.sh ensure $$v >/dev/null || echo "matrix: OTP $$v chroot unavailable"; done

demo: build
	scripts/demo.sh

# examples/mix_release and examples/rebar3_release: build both releases, boot two nodes of
# each on the carrier (embedded and interactive mode), check links and remote shells.
releases: deps
	scripts/releases.sh

# trust vs inet_tcp_dist vs inet_tls_dist vs the bare transport (raw quinn), side by side,
# with the performance targets as ratios; results in bench/results/ (.md, .json, .svg).
# BENCH_ARGS=--quick for a smoke run, --carriers trust,inet_tcp for a subset.
# The loss rows (ping during bulk at 50 ms RTT and 1 % loss, nodes in network namespaces
# joined by trust-dist-wire) need root and say so without it; --no-loss skips them.
# A full run (no BENCH_ARGS) also renders its plot into docs/bench.svg for the README.
bench: build
	bench/run.sh $(BENCH_ARGS)
	@if [ -z "$(BENCH_ARGS)" ]; then cp bench/results/latest.svg docs/bench.svg && echo "plot: docs/bench.svg"; fi

# Fault injection (needs root): two nodes in network namespaces joined by trust-dist-wire
# (loss, 50 ms RTT, reordering, partitions; the kernel has no netem), kill -9 and restart.
# FAULTS_SEED=N replays the wire's random choices.
faults: faults-check build
	cargo build --release --quiet -p trust_dist_wire
	MIX_ENV=test mix test --only faults test/faults_test.exs

# Where a ping's time goes beside a bulk transfer: on its own link, on another node pair's,
# with the busy threads' CPU and run-queue waits (CONTENTION_CARRIER=inet_tcp to compare).
contention: build
	MIX_ENV=test mix test --only contention test/contention_test.exs

# Before building: root, network namespaces and veth, or a clear message.
faults-check:
	@scripts/faults-net.sh check

# cargo-fuzz targets of native/proto (installs cargo-fuzz if missing; nightly, or
# RUSTC_BOOTSTRAP=1 on stable).
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

fmt:
	cargo fmt --all
	mix format

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --release -- -D warnings
	mix format --check-formatted

clean:
	cargo clean
	rm -rf _build priv/native bin
