#!/usr/bin/env bash
# The test suite in four pytest runs at the same time on a 2-core machine: two groups of
# tests of real server and client processes, which mostly wait on Flower's polling, and
# the compute-bound rest in two (the Flower layer: strategy-level federations on the
# in-process Grid, every Ray cluster and engine run, one at a time, and the comparison
# that shares their hetero fixture; everything else: pure math, models, data, privacy, the
# CLI, the in-process federations that start no engine). Fewer runs leave a core idle
# whenever a process group waits on a round; more (five were tried) load the machine
# until real processes miss their timeouts. The rest streams here; the other groups'
# output follows at the end, then each group's wall time. Arguments go to every pytest
# run (`-m "not e2e"` leaves out the real processes, the real model and the real engine
# runs: the quick loop).
# Exit status: the worst of them (no tests = 0).
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# the attacked deployment (the longest modules: local users and a hostile server, an
# outsider's flood, a hostile SecAgg client), the SDK's documented snippets and the
# example app, and `fedtune simulate` stopped by a signal and resumed (two engine runs:
# here to even the groups' walls)
ATTACKS=(tests/deploy/test_security.py tests/deploy/test_flood.py
         tests/deploy/test_secagg_hostile.py tests/sdk/test_docs.py tests/examples
         tests/test_simulate_lifecycle.py)
# every other process test: the hostile client, the deployment's failures and restarts,
# the SDK, `flwr run` (a SuperLink and Flower's engine: the one engine run outside the
# Flower group), and the built wheel used from outside the checkout (its own engine run).
# A folder named here must not be named by another group: pytest does not apply --ignore
# to a folder given on its command line.
PROCESSES=(tests/deploy tests/sdk tests/flower/test_flwr_run.py tests/test_wheel.py
           --ignore=tests/deploy/test_security.py --ignore=tests/deploy/test_flood.py
           --ignore=tests/deploy/test_secagg_hostile.py --ignore=tests/sdk/test_docs.py)
# the Flower layer's in-process federations that start no engine run with the rest
FLOWER_IN_REST=(tests/flower/test_chat_scenario.py tests/flower/test_real_model.py
                tests/flower/test_client_enforcement.py tests/flower/test_dp_sampling.py
                tests/flower/test_progress.py tests/flower/test_simulation_privacy.py)
FLOWER=(tests/flower tests/test_compare.py --ignore=tests/flower/test_flwr_run.py
        "${FLOWER_IN_REST[@]/#/--ignore=}")
# the rest: everything the groups above do not name
REST=(--ignore=tests/deploy --ignore=tests/sdk --ignore=tests/examples
      --ignore=tests/test_compare.py --ignore=tests/test_wheel.py
      --ignore=tests/test_simulate_lifecycle.py)
for module in tests/flower/test_*.py; do
    [[ " ${FLOWER_IN_REST[*]} " == *" $module "* ]] || REST+=("--ignore=$module")
done

times="$(mktemp)"
logs=()
pids=()
timed() {  # NAME COMMAND...: run it, append "NAME SECONDS" to $times, keep its status
    local name=$1 start=$SECONDS status
    shift
    "$@"
    status=$?
    echo "$name $((SECONDS - start))" >>"$times"
    return "$status"
}
in_background() {  # NAME PYTEST-ARGS...: a pytest run whose output is kept for the end
    local name=$1 log
    shift
    log="$(mktemp)"
    timed "$name" "$PY" -m pytest -q "$@" >"$log" 2>&1 &
    pids+=("$!")
    logs+=("$name:$log")
}
in_background "attacks+docs+example" "${ATTACKS[@]}" "$@"
in_background "processes" "${PROCESSES[@]}" "$@"
in_background "flower" "${FLOWER[@]}" "$@"
timed "rest" "$PY" -m pytest -q "${REST[@]}" "$@"
statuses=("$?")
for pid in "${pids[@]}"; do
    wait "$pid"
    statuses+=("$?")
done
for entry in "${logs[@]}"; do
    echo "---- ${entry%%:*} ----"
    cat "${entry#*:}"
    rm -f "${entry#*:}"
done
echo "---- wall time per group (seconds) ----"
cat "$times"
rm -f "$times"
status=0
for rc in "${statuses[@]}"; do
    [ "$rc" -eq 5 ] && rc=0  # a group with no selected tests
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
done
exit "$status"
