#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for SECONDS each (default 300): the rules parser, the
# descriptor-to-key encoding, and request validation of both APIs (see fuzz/fuzz_targets/).
#
#   scripts/fuzz.sh 15      # the brief run CI makes
#   scripts/fuzz.sh 1800    # a long run
#   scripts/fuzz.sh 600 rules_parser should_allow_request   # only these targets
#   FUZZ_JOBS=2 scripts/fuzz.sh 15    # two targets at a time
#   scripts/fuzz.sh build               # only build the targets (scripts/test.sh, in the background)
#
# Starts from the committed seeds (fuzz/seeds/TARGET) and the corpus grown by earlier runs
# (fuzz/corpus/TARGET, git-ignored). Prints one line per target: executions, coverage (edges and
# features), corpus size and the verdict; a crash leaves its input in fuzz/artifacts/TARGET, prints
# the fuzzer's report and makes the exit status 1.
#
# cargo-fuzz needs nightly flags (-Z sanitizer); the stable toolchain takes them with
# RUSTC_BOOTSTRAP=1. FUZZ_SANITIZER=none builds faster (what CI uses); the default is address.
set -euo pipefail

seconds=${1:-300}
shift $(($# > 0 ? 1 : 0))
sanitizer=${FUZZ_SANITIZER:-address}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

echo "fuzz: building the targets (sanitizer: $sanitizer)"
if [[ $seconds == build ]]; then
    exec cargo fuzz build --sanitizer "$sanitizer"
fi
cargo fuzz build --sanitizer "$sanitizer" 2>&1 | grep -E '^(error|warning: unused)' || true

# One target: its line of the table on stdout, and the fuzzer's report after it on a crash.
fuzz_one() {
    local target=$1 log dirs verdict=ok execs done_line cov ft corpus
    mkdir -p "corpus/$target"
    dirs=("corpus/$target")
    [[ -d "seeds/$target" ]] && dirs+=("seeds/$target")
    log=$(mktemp)
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        verdict=CRASH
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")
    corpus=$(find "corpus/$target" -type f | wc -l)
    printf '%-22s %12s %8s %8s %8s  %s\n' "$target" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$corpus" "$verdict"
    if [[ $verdict != ok ]]; then
        grep -v '^#' "$log" | tail -60
    fi
    rm -f "$log"
}

# FUZZ_JOBS targets at a time (default 1; CI runs 2, one per core): each still fuzzes SECONDS.
jobs=${FUZZ_JOBS:-1}
printf '%-22s %12s %8s %8s %8s  %s\n' target executions cov ft corpus verdict
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cargo fuzz list)
results=$(mktemp -d)
for target in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= jobs)); do
        wait -n || true
    done
    fuzz_one "$target" >"$results/$target" &
done
wait
status=0
for target in "${targets[@]}"; do
    cat "$results/$target"
    # The verdict is the sixth column of the target's line.
    [[ $(head -1 "$results/$target" | awk '{print $6}') == ok ]] || status=1
done
rm -rf "$results"
exit $status
