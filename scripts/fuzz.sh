#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that takes outside input, with AFL++ through afl.rs
# (`cargo afl`, on the stable toolchain). Targets and seed corpora: fuzz/.
#
#   scripts/fuzz.sh smoke [SECONDS]     each target for SECONDS (default 15): CI
#   scripts/fuzz.sh campaign [EXECS]    each target until EXECS executions (default 10,000,000)
#   scripts/fuzz.sh campaign EXECS T..  only targets T..
#
# Installs cargo-afl (pinned) and builds AFL++ on first use. Prints each target's executions,
# speed and paths found, and fails if any target found a crash or a hang (kept under
# fuzz/out/TARGET/default/{crashes,hangs}; turn each into a regression test).
set -euo pipefail
cd "$(dirname "$0")/.."
AFL_VERSION=0.18.2
TARGETS=(request prometheus state config runtime snapshot fleet)
mode=${1:-smoke}
limit=${2:-}
shift $(( $# > 2 ? 2 : $# ))
if (( $# > 0 )); then TARGETS=("$@"); fi

if ! cargo afl --version 2>/dev/null | grep -q "$AFL_VERSION"; then
    echo "fuzz: installing cargo-afl $AFL_VERSION"
    cargo install --quiet --locked cargo-afl --version "$AFL_VERSION"
fi
# AFL++ itself (afl-fuzz and its runtime), built once into cargo-afl's data directory.
if ! ls "${XDG_DATA_HOME:-$HOME/.local/share}"/afl.rs/*/*/afl/bin/afl-fuzz >/dev/null 2>&1; then
    echo "fuzz: building AFL++"
    cargo afl config --build --force >/dev/null
fi

echo "fuzz: building the targets"
(cd fuzz && cargo afl build --release --quiet)

# No UI, no CPU-frequency or core-pattern checks (a CI machine is not tuned for fuzzing).
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_QUIET=1
failed=0
for t in "${TARGETS[@]}"; do
    out="fuzz/out/$t"
    log="fuzz/out/$t.log"
    rm -rf "$out"
    mkdir -p fuzz/out
    case "$mode" in
        smoke) args=(-V "${limit:-15}") ;;
        campaign) args=(-E "${limit:-10000000}") ;;
        *) echo "usage: $0 smoke [SECONDS] | campaign [EXECS] [TARGET...]" >&2; exit 2 ;;
    esac
    start=$(date +%s)
    (cd fuzz && cargo afl fuzz "${args[@]}" -i "corpus/$t" -o "out/$t" "target/release/$t") >"$log" 2>&1 || true
    stats="$out/default/fuzzer_stats"
    if [[ ! -f $stats ]]; then
        echo "fuzz: $t did not run"; tail -20 "$log"; failed=1; continue
    fi
    get() { awk -F' *: *' -v k="$1" '$1==k {print $2}' "$stats"; }
    crashes=$(find "$out/default/crashes" -type f ! -name README.txt 2>/dev/null | wc -l)
    hangs=$(find "$out/default/hangs" -type f 2>/dev/null | wc -l)
    printf 'fuzz: %-11s %12s execs in %4ss (%s/s), %s paths, %s crashes, %s hangs\n' \
        "$t" "$(get execs_done)" "$(( $(date +%s) - start ))" "$(get execs_per_sec)" \
        "$(get corpus_count)" "$crashes" "$hangs"
    if (( crashes > 0 || hangs > 0 )); then failed=1; fi
done
exit $failed
