#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step_* functions are called through check()
# Prove danet_ops on a bare GPU machine (torch + CUDA, triton, nvcc, compute-sanitizer; no network):
# build with CUDA, run the full test suite on CUDA, run compute-sanitizer (memcheck, racecheck) on
# small PAM/CAM forward+backward runs of the cuda and triton backends, run the full benchmark sweep
# and write the report. Everything lands in one folder; copy it back as docs/benchmarks.md says.
#
#   scripts/gpu_check.sh [STEP ...]     steps: env deps build test sanitize bench model report
#                                       (default: all, in that order)
# Environment:
#   GPU_CHECK_OUT  output folder (default: $OUT if set, else ./gpu_check_out)
#   WHEELS         folder of wheels for an offline install of what is missing
#                  (pytest, pytest-benchmark, matplotlib, ninja, numpy, tqdm):
#                  pip install --no-index --find-links "$WHEELS" ...
#   PYTHON         the interpreter (default python3)
#   STEP_TIMEOUT   seconds allowed to each command (default: no limit)
#   BENCH_DEVICES  devices for the benchmark sweep (default cuda; "cpu,cuda" adds the CPU rows)
# Every step runs even if an earlier one failed; the summary (summary.md) says pass/fail per step
# and the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
OUTDIR=${GPU_CHECK_OUT:-${OUT:-$ROOT/gpu_check_out}}
mkdir -p "$OUTDIR/logs" && OUTDIR=$(cd "$OUTDIR" && pwd)
LOGS=$OUTDIR/logs
SUMMARY=$OUTDIR/summary.md
FAILED=0
if [ $# -gt 0 ]; then STEPS=("$@"); else STEPS=(env deps build test sanitize bench model report); fi
export PYTHONUNBUFFERED=1

[ -f "$SUMMARY" ] || printf '| step | result | seconds | log |\n|---|---|---|---|\n' >"$SUMMARY"
printf '| _%s: %s_ | | | |\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "${STEPS[*]}" >>"$SUMMARY"

# check NAME CMD...: run CMD with its output in logs/NAME.log (and on the terminal), record the result.
check() {
  local name=$1 start rc
  shift
  start=$(date +%s)
  echo "=== [$name] $*"
  if [ -n "${STEP_TIMEOUT:-}" ]; then  # timeout runs programs: the step functions are exported
    timeout "$STEP_TIMEOUT" bash -c '"$@"' _ "$@" 2>&1 | tee "$LOGS/$name.log"
  else
    "$@" 2>&1 | tee "$LOGS/$name.log"
  fi
  rc=${PIPESTATUS[0]}
  local result=pass
  if [ "$rc" -ne 0 ]; then result="**FAIL** (exit $rc)"; FAILED=1; fi
  printf '| %s | %s | %s | logs/%s.log |\n' "$name" "$result" "$(( $(date +%s) - start ))" "$name" >>"$SUMMARY"
  echo "=== [$name] $result"
}

step_env() {
  local rc=0
  nvidia-smi || rc=1
  nvcc --version || rc=1
  compute-sanitizer --version || rc=1
  "$PY" - <<'PY' || rc=1
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
PY
  git -C "$ROOT" log -1 --format='commit %H %s' || true
  git -C "$ROOT" status --short || true
  return "$rc"
}

step_deps() {
  local missing=() mod pkg
  for pair in pytest:pytest pytest_benchmark:pytest-benchmark matplotlib:matplotlib ninja:ninja numpy:numpy tqdm:tqdm; do
    mod=${pair%%:*}; pkg=${pair#*:}
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]}"
    if [ -n "${WHEELS:-}" ]; then
      "$PY" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}"
    else
      echo "set WHEELS=/path/to/wheels to install them offline"
    fi
  fi
  # pytest and pytest-benchmark are required; without matplotlib the report has no plots, without
  # ninja the build is serial, without numpy (and tqdm) some model tests fail.
  "$PY" -c "import pytest, pytest_benchmark; print('pytest', pytest.__version__, 'pytest-benchmark', pytest_benchmark.__version__)"
}

step_build() {
  DANET_OPS_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e "$ROOT" || return 1
  "$PY" - <<'PY'
import torch
from danet_ops import _backends, _compiled
dev = torch.device("cuda")
print("C++ ops:", _compiled._state.get("how"), _compiled.error() or "")
bad = []
for b in ("cuda", "triton"):
    for op in ("pam", "cam"):
        ok, why = _backends.check(b, op, dev, torch.bfloat16)
        print(f"{b:7} {op}: {'available' if ok else 'NOT available: ' + why}")
        bad += [] if ok else [(b, op)]
raise SystemExit(1 if bad else 0)
PY
}

step_test() {
  "$PY" -m pytest "$ROOT/tests" -q -rs -p no:cacheprovider --junitxml="$OUTDIR/tests-junit.xml"
}

# A small PAM and CAM forward+backward (ragged shapes, all dtypes, both CAM modes) for one backend.
write_sanitize_case() {
  cat >"$OUTDIR/sanitize_case.py" <<'PY'
import sys

import torch

from danet_ops import channel_attention, position_attention

backend = sys.argv[1]
dev = "cuda"
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for B, Cq, Cv, H, W in [(1, 8, 24, 37, 29), (2, 72, 130, 9, 7), (1, 64, 512, 16, 16)]:
        q, k = ((0.3 * torch.randn(B, Cq, H, W, device=dev)).to(dtype).requires_grad_() for _ in range(2))
        v, x = (torch.randn(B, Cv, H, W, device=dev).to(dtype).requires_grad_() for _ in range(2))
        gamma = torch.tensor([0.5], device=dev, requires_grad=True)
        y = position_attention(q, k, v, x, gamma, backend=backend)
        y.backward(torch.randn_like(y))
    for B, C, H, W in [(1, 37, 29, 31), (2, 130, 9, 7), (1, 64, 16, 16)]:
        for mode in ("original", "paper"):
            x = (0.1 * torch.randn(B, C, H, W, device=dev)).to(dtype).requires_grad_()
            gamma = torch.tensor([0.5], device=dev, requires_grad=True)
            y = channel_attention(x, gamma, mode=mode, backend=backend)
            y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print(f"PAM and CAM forward+backward ran with backend {backend!r}")
PY
}

step_sanitize() {
  write_sanitize_case
  local backend
  for backend in cuda triton; do
    # Warm the Triton cache outside the sanitizer (compilation is not what is checked).
    [ "$backend" = triton ] && "$PY" "$OUTDIR/sanitize_case.py" triton >/dev/null 2>&1
    # memcheck without the caching allocator: every tensor is its own allocation, so an
    # out-of-bounds access cannot hide inside a cached block.
    check "sanitize-memcheck-$backend" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
      "$PY" "$OUTDIR/sanitize_case.py" "$backend"
    check "sanitize-racecheck-$backend" \
      compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
      "$PY" "$OUTDIR/sanitize_case.py" "$backend"
  done
}

# The full sweep, in two runs (each can be its own call under a time limit) with their own
# summaries: raw/attention/ (PAM, CAM, matmul rate, copy bandwidth) and raw/model/ (DANet-R50).
sweep() {
  mkdir -p "$OUTDIR/raw/$1"
  DANET_OPS_BENCH_FULL=1 DANET_OPS_BENCH_OUT="$OUTDIR/raw/$1" DANET_OPS_BENCH_DEVICES="${BENCH_DEVICES:-cuda}" \
    "$PY" -m pytest "$ROOT/benchmarks/$2" --benchmark-only -q -p no:cacheprovider
}
step_bench() { sweep attention test_bench_attention.py; }
step_model() { sweep model test_bench_model.py; }

step_report() {
  local json=()
  for f in "$OUTDIR"/raw/*/last-*.json; do [ -e "$f" ] && json+=("$f"); done
  [ ${#json[@]} -gt 0 ] || { echo "no $OUTDIR/raw/*/last-*.json: run the bench and model steps first"; return 1; }
  "$PY" -m benchmarks.report --json "${json[@]}" --out "$OUTDIR"
}

export PY ROOT OUTDIR
export -f step_env step_deps step_build step_test sweep step_bench step_model step_report
for s in "${STEPS[@]}"; do
  case $s in
    sanitize) step_sanitize ;;  # one summary line per tool and backend
    env | deps | build | test | bench | model | report) check "$s" "step_$s" ;;
    *) echo "unknown step '$s' (env deps build test sanitize bench model report)"; FAILED=1
       printf '| %s | **FAIL** (unknown step) | 0 | |\n' "$s" >>"$SUMMARY" ;;
  esac
done

echo
echo "Summary ($SUMMARY):"
cat "$SUMMARY"
echo "Everything is under $OUTDIR"
exit "$FAILED"
