#!/usr/bin/env bash
# The test suite in four parts that run at the same time on a 2-core machine: two groups
# of tests of real server and client processes, which mostly wait on Flower's polling,
# and the compute-bound rest in two (the Flower layer: strategy-level federations on the
# in-process Grid, every Ray cluster and engine run, one at a time, and the comparison
# that shares their hetero fixture; everything else: pure math, models, data, privacy,
# the CLI). One pytest process alone would leave a core idle whenever the process
# groups wait. The rest streams here; the other groups' output follows at the end, then
# each group's wall time. Arguments go to every pytest run (`-m "not e2e"` leaves out the
# real processes, the real model and the real engine runs: the quick loop).
# Exit status: the worst of them (no tests = 0).
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# the attacked deployment (the longest module: two federations side by side), the SDK's
# documented snippets, the example app, and `flwr run` (a SuperLink and Flower's engine)
GROUP_A=(tests/deploy/test_security.py tests/sdk/test_docs.py tests/examples
         tests/flower/test_flwr_run.py)
# every other process test: the hostile client, the deployment's failures and restarts
# (two federations at a time), the SDK (tests/examples is not named here: pytest does
# not apply --ignore to a folder given on the command line, so it ran twice)
GROUP_B=(tests/deploy tests/sdk --ignore=tests/deploy/test_security.py --ignore=tests/sdk/test_docs.py)
# the Flower layer in process (flwr run is group A's)
GROUP_C=(tests/flower tests/test_compare.py --ignore=tests/flower/test_flwr_run.py)

log_a="$(mktemp)"
log_b="$(mktemp)"
log_c="$(mktemp)"
times="$(mktemp)"
timed() {  # NAME COMMAND...: run it, append "NAME SECONDS" to $times, keep its status
    local name=$1 start=$SECONDS status
    shift
    "$@"
    status=$?
    echo "$name $((SECONDS - start))" >>"$times"
    return "$status"
}
timed "security+docs+example+flwr-run" "$PY" -m pytest -q "${GROUP_A[@]}" "$@" >"$log_a" 2>&1 &
group_a=$!
timed "processes" "$PY" -m pytest -q "${GROUP_B[@]}" "$@" >"$log_b" 2>&1 &
group_b=$!
timed "flower" "$PY" -m pytest -q "${GROUP_C[@]}" "$@" >"$log_c" 2>&1 &
group_c=$!
# the rest: everything the three groups above do not name
timed "rest" "$PY" -m pytest -q --ignore=tests/deploy --ignore=tests/sdk --ignore=tests/examples \
    --ignore=tests/flower --ignore=tests/test_compare.py "$@"
rest=$?
wait "$group_c"
flower=$?
wait "$group_b"
procs=$?
wait "$group_a"
attack=$?
echo "---- the Flower layer in process (${GROUP_C[*]}) ----"
cat "$log_c"
echo "---- tests of real server / client processes (${GROUP_B[*]}) ----"
cat "$log_b"
echo "---- the attacked deployment, SDK snippets, the example, real processes (${GROUP_A[*]}) ----"
cat "$log_a"
echo "---- wall time per group (seconds) ----"
cat "$times"
rm -f "$log_a" "$log_b" "$log_c" "$times"
status=0
for rc in rest flower procs attack; do
    [ "${!rc}" -eq 5 ] && printf -v "$rc" 0
    [ "${!rc}" -ne 0 ] && [ "$status" -eq 0 ] && status=${!rc}
done
exit "$status"
