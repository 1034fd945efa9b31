#!/usr/bin/env bash
# The test suite: `bash scripts/test.sh [pytest args]` (the README's test command; CI runs it).
#
# Two pytest invocations, because Triton decides once per process, when it is imported, whether
# its kernels are interpreted (TRITON_INTERPRET=1 at that moment) or compiled:
#   1. python -m pytest tests -q                              everything else (tests marked
#      `interpreter` are deselected there; CUDA tests use compiled kernels and skip without a GPU)
#   2. TRITON_INTERPRET=1 python -m pytest tests -q -m interpreter
#      the Triton backend on CPU tensors through Triton's interpreter
# They run side by side (2 in the background, one thread: the interpreter is single-threaded
# numpy; its output is printed after 1's). The script fails if either fails. Arguments go to both
# (e.g. -x, -p no:cacheprovider, or test paths instead of tests/). PYTHON picks the Python
# (default: python).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
has_path=0
for a in "$@"; do [[ $a != -* && -e ${a%%::*} ]] && has_path=1; done
[ "$has_path" = 1 ] || set -- tests "$@"
log=$(mktemp "${TMPDIR:-/tmp}/danet_ops_interp.XXXXXX")

env TRITON_INTERPRET=1 OMP_NUM_THREADS="${DANET_OPS_INTERP_THREADS:-1}" \
  "$PY" -m pytest -q -m interpreter "$@" >"$log" 2>&1 &
interp=$!
trap 'kill "$interp" 2>/dev/null; rm -f "$log"' EXIT INT TERM

env -u TRITON_INTERPRET "$PY" -m pytest -q "$@"
rc_main=$?
wait "$interp"
rc_interp=$?

echo
echo "=== TRITON_INTERPRET=1 pytest -m interpreter (exit $rc_interp) ==="
cat "$log"
echo
echo "[test.sh] pytest tests: exit $rc_main; TRITON_INTERPRET=1 pytest -m interpreter: exit $rc_interp"
[ "$rc_main" = 0 ] && [ "$rc_interp" = 0 ]
