#!/usr/bin/env bash
# Mutation testing of the modules that carry the README's promises, each against its fast unit tests.
#
#   bash scripts/mutation.sh                         # every module below (~3 h on 2 shared cores)
#   bash scripts/mutation.sh spoa_mirror/limits.py   # one module (or a few)
#
# mutmut (pyproject's test extras) plants one small change at a time (a flipped comparison, a constant
# off by one, a dropped call...) and runs the tests that cover the mutated function: a mutant the
# tests do not notice "survived". Each module runs in its own scratch copy of the checkout (mutmut
# writes a mutants/ tree beside the code), niced, bounded by MUTATION_TIMEOUT seconds per module
# (default 3600: redact.py's 1,740 mutants took ~25 min, and mirror.py's first 667 of 1,369 40 min, on a
# 2-core machine at load 6; MUTATION_JOBS=2 runs two mutants at a time). A run cut short by the
# timeout keeps what it checked (mutants/*.meta): MUTATION_RESUME=1 continues it in the same scratch
# copy with only the mutants not yet checked (mutmut skips those with a result). MUTATION_NAMES=FILE
# checks only the mutants named in FILE (one mutmut name a line: say, an earlier run's survivors.txt)
# in a fresh copy of the current checkout: new tests against old survivors in minutes, not hours; the
# rest count as "not checked".
# Prints the count of each result per module (killed, survived, timeout, no tests, not checked when
# the time ran out) and where the survivors' names are; `mutmut show NAME` in the scratch copy (kept
# under $MUTATION_DIR) shows a survivor's diff. Reviewed survivors are listed in
# tests/mutation-survivors.md: each is killed by a test or explained as equivalent.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MUTMUT="$ROOT/.venv/bin/mutmut"
WORK=${MUTATION_DIR:-${TMPDIR:-/tmp}/spoa-mirror-mutation}
TIMEOUT=${MUTATION_TIMEOUT:-3600}
JOBS=${MUTATION_JOBS:-1}

# module -> the fast tests that exercise it (no subprocess agent; tests marked haproxy are left out)
declare -A TESTS=(
    [spoe/connection.py]="tests/test_connection.py"
    [spoe/frames.py]="tests/test_connection.py tests/test_data.py tests/test_oracle.py"
    [spoa_mirror/mirror.py]="tests/test_pipeline.py tests/test_budget_shares.py tests/test_intake.py tests/test_loop_marker.py tests/test_hardening_config.py tests/test_message_targets.py tests/test_mirror_edges.py tests/test_mirror_wiring.py"
    [spoa_mirror/accounting.py]="tests/test_pipeline.py tests/test_accounting.py"
    [spoa_mirror/limits.py]="tests/test_limits.py tests/test_pipeline.py"
    [spoa_mirror/redact.py]="tests/test_redact.py tests/test_redact_defaults.py tests/test_redact_shapes.py tests/test_config.py"
    [spoa_mirror/wire.py]="tests/test_wire.py"
    [spoa_mirror/message.py]="tests/test_pipeline.py tests/test_message.py tests/test_message_targets.py"
    # Not in the default list (their tests hold real servers, too slow for every mutant): for a named
    # run of a few functions (MUTATION_NAMES).
    [spoa_mirror/transport_h2.py]="tests/test_transport_h2.py tests/test_intake.py"
    [spoa_mirror/capture/writer.py]="tests/test_capture_writer.py"
)
MODULES=("$@")
if [ ${#MODULES[@]} -eq 0 ]; then
    MODULES=(spoe/connection.py spoe/frames.py spoa_mirror/mirror.py spoa_mirror/accounting.py
             spoa_mirror/limits.py spoa_mirror/redact.py spoa_mirror/wire.py spoa_mirror/message.py)
fi

for module in "${MODULES[@]}"; do
    tests=${TESTS[$module]:?"no tests listed for $module in scripts/mutation.sh"}
    scratch="$WORK/${module//\//_}"
    if [ "${MUTATION_RESUME:-0}" = 1 ] && [ -d "$scratch/mutants" ]; then
        echo "== $module: resuming in $scratch (its snapshot of the code; only mutants not yet checked)"
    else
        rm -rf "$scratch"
        mkdir -p "$scratch"
        (cd "$ROOT" && git ls-files -z spoe spoa_mirror tests examples docs/config.schema.json pyproject.toml | xargs -0 cp --parents -t "$scratch")
        {
            echo "[mutmut]"
            echo "source_paths="
            echo "    spoe"
            echo "    spoa_mirror"
            echo "also_copy="
            echo "    examples"
            echo "    docs"
            echo "only_mutate=$module"
            echo "pytest_add_cli_args_test_selection="
            for test in $tests; do
                [ -e "$ROOT/$test" ] && echo "    $test"
            done
            echo "pytest_add_cli_args="
            echo "    -p"
            echo "    no:cacheprovider"
            echo "    -m"
            echo "    not haproxy"
            echo "    -q"
        } > "$scratch/setup.cfg"
        echo "== $module ($tests)"
    fi
    names=()
    if [ -n "${MUTATION_NAMES:-}" ]; then
        mapfile -t names < <(grep -o '[^[:space:]]*__mutmut_[0-9]*' "$MUTATION_NAMES")
        echo "   only the ${#names[@]} mutants named in $MUTATION_NAMES"
    fi
    status=0
    (cd "$scratch" && timeout "$TIMEOUT" nice -n 10 "$MUTMUT" run --max-children "$JOBS" "${names[@]}" >>run.log 2>&1) ||
        status=$?
    [ "$status" -eq 124 ] && echo "   stopped after ${TIMEOUT}s: results are partial"
    grep -q "failed to collect stats" "$scratch/run.log" &&
        echo "   the tests fail on the unmutated code, so no mutant was tried: see $scratch/run.log"
    (cd "$scratch" && "$MUTMUT" results --all true >results.txt 2>&1) || true
    echo "   $(sed -n 's/^.*: //p' "$scratch/results.txt" | sort | uniq -c | awk '{n=$1; $1=""; printf "%s%s %d", sep, substr($0, 2), n; sep=", "}')"
    grep ': survived$' "$scratch/results.txt" | cut -d: -f1 > "$scratch/survivors.txt" || true
    echo "   survivors: $scratch/survivors.txt"
done
