#!/usr/bin/env bash
# The test suite in two halves that run at the same time: the tests of real server and
# client processes (they mostly wait on Flower's polling) and the rest (CPU-bound, one Ray
# cluster at a time). The rest streams here; the process tests' output follows at the end.
# Arguments go to both pytest runs. Exit status: the worse of the two (no tests = 0).
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PROCESS_TESTS=(tests/deploy tests/sdk tests/examples)
log="$(mktemp)"
"$PY" -m pytest -q "${PROCESS_TESTS[@]}" "$@" >"$log" 2>&1 &
processes=$!
"$PY" -m pytest -q "${PROCESS_TESTS[@]/#/--ignore=}" "$@"
rest=$?
wait "$processes"
procs=$?
echo "---- tests of real server / client processes (${PROCESS_TESTS[*]}) ----"
cat "$log"
rm -f "$log"
for rc in rest procs; do [ "${!rc}" -eq 5 ] && printf -v "$rc" 0; done
[ "$rest" -ne 0 ] && exit "$rest"
exit "$procs"
