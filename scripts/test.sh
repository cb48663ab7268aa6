#!/usr/bin/env bash
# The test suite in three parts that run at the same time, sized to end together on a
# 2-core machine: the compute-bound rest (strategy-level federations on the in-process
# Grid, one Ray cluster at a time) and two groups of tests of real server and client
# processes, which mostly wait on Flower's polling. The rest streams here; the process groups' output follows at the end, then
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

log_a="$(mktemp)"
log_b="$(mktemp)"
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
# the rest: everything the two groups above do not name
timed "rest" "$PY" -m pytest -q --ignore=tests/deploy --ignore=tests/sdk --ignore=tests/examples \
    --ignore=tests/flower/test_flwr_run.py "$@"
rest=$?
wait "$group_b"
procs=$?
wait "$group_a"
attack=$?
echo "---- tests of real server / client processes (${GROUP_B[*]}) ----"
cat "$log_b"
echo "---- the attacked deployment, SDK snippets, the example, real processes (${GROUP_A[*]}) ----"
cat "$log_a"
echo "---- wall time per group (seconds) ----"
cat "$times"
rm -f "$log_a" "$log_b" "$times"
status=0
for rc in rest procs attack; do
    [ "${!rc}" -eq 5 ] && printf -v "$rc" 0
    [ "${!rc}" -ne 0 ] && [ "$status" -eq 0 ] && status=${!rc}
done
exit "$status"
