#!/usr/bin/env bash
# Runs fuzz targets one after another (each gets the machine's cores to itself) and
# prints, per target, executions, executions per second, time, corpus size and
# findings. `make fuzz` calls this; so can you:
#
#   fuzz/run.sh                      # every target, FUZZ_SECONDS (60) each
#   FUZZ_RUNS=1000000 FUZZ_SECONDS=1200 fuzz/run.sh update_topk ids
#
# Each target stops at FUZZ_SECONDS or FUZZ_RUNS executions (-1: no limit), whichever
# comes first. New inputs go to fuzz/corpus-run/TARGET (ignored by git); the committed
# seeds and crash regressions in fuzz/corpus/TARGET are read, never written. A crash
# leaves its input in fuzz/artifacts/TARGET/ and its log in fuzz/corpus-run/TARGET.log;
# the script runs every target, then exits 1 if any crashed.
set -uo pipefail

cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_RUNS=${FUZZ_RUNS:--1}
# Over-allocation is a finding: one allocation over 256 MiB, or 2 GiB resident, fails
# the run (no decoder here needs more than a few MiB for the inputs it accepts).
FLAGS=(-rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=10 -print_final_stats=1)

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi

cargo +nightly fuzz build || exit 1
# Every committed input (seeds and past crashes) must pass before fuzzing starts.
cargo +nightly run --quiet --manifest-path fuzz/Cargo.toml --bin seeds -- --check >/dev/null ||
    exit 1

rows=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus-run/$t"
    log="fuzz/corpus-run/$t.log"
    # JSON targets get JSON's syntax and boundary numbers as a dictionary.
    dict=()
    case $t in
    wire_bodies | run_spec | ledger_request | data_manifest | sealed_manifest | model_config | safetensors)
        dict=(-dict=fuzz/dict/json.dict)
        ;;
    esac
    start=$(date +%s.%N)
    cargo +nightly fuzz run "$t" "fuzz/corpus-run/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -runs="$FUZZ_RUNS" "${FLAGS[@]}" "${dict[@]}" \
        >"$log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    execs=$(grep -o 'stat::number_of_executed_units:[[:space:]]*[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    rate=$(grep -o 'stat::average_exec_per_sec:[[:space:]]*[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    corpus=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    if [ "$rc" -eq 0 ]; then
        finding="none"
    else
        finding="CRASH (exit $rc; see $log and fuzz/artifacts/$t/)"
        failed=1
    fi
    seconds=$(echo "$end - $start" | bc)
    row=$(printf '| %s | %s | %s | %.0f | %s | %s |' "$t" "${execs:-?}" "${rate:-?}" \
        "$seconds" "${corpus:-?}" "$finding")
    echo "$row"
    rows+=("$row")
done

echo
echo "| target | executions | execs/s | seconds | corpus | findings |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit $failed
