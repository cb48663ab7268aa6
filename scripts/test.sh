#!/usr/bin/env bash
# The test suite in three parts that run at the same time: two groups of tests of real
# server and client processes (they mostly wait on Flower's polling: the attacks on a
# deployment in one, the rest in the other) and the rest (CPU-bound, one Ray cluster at a
# time). The rest streams here; the process tests' output follows at the end.
# Arguments go to every pytest run. Exit status: the worst of them (no tests = 0).
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ATTACK_TESTS=(tests/deploy/test_security.py tests/deploy/test_hostile_client.py)
PROCESS_TESTS=(tests/deploy tests/sdk tests/examples)
attack_log="$(mktemp)"
process_log="$(mktemp)"
"$PY" -m pytest -q "${ATTACK_TESTS[@]}" "$@" >"$attack_log" 2>&1 &
attacks=$!
"$PY" -m pytest -q "${PROCESS_TESTS[@]}" "${ATTACK_TESTS[@]/#/--ignore=}" "$@" \
    >"$process_log" 2>&1 &
processes=$!
"$PY" -m pytest -q "${PROCESS_TESTS[@]/#/--ignore=}" "$@"
rest=$?
wait "$processes"
procs=$?
wait "$attacks"
attack=$?
echo "---- tests of real server / client processes (${PROCESS_TESTS[*]}) ----"
cat "$process_log"
echo "---- attacks on a deployment, real processes (${ATTACK_TESTS[*]}) ----"
cat "$attack_log"
rm -f "$process_log" "$attack_log"
status=0
for rc in rest procs attack; do
    [ "${!rc}" -eq 5 ] && printf -v "$rc" 0
    [ "${!rc}" -ne 0 ] && [ "$status" -eq 0 ] && status=${!rc}
done
exit "$status"
