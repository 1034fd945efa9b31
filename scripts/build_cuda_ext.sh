#!/usr/bin/env bash
# CUDA build check (CPU machine, no GPU needed): build danet_ops._C WITH its CUDA kernels against the
# GPU image's torch (2.11.0, the PyPI default build: +cu130), check that all four ops have a CUDA
# kernel, leave the .so where a GPU run can carry it, and run the CPU test suite in that torch once.
#
#   scripts/build_cuda_ext.sh [--no-tests] [--rebuild]
#
# What it does:
#  1. A cached virtual environment ($DANET_OPS_CUDA_VENV, default
#     ~/.cache/danet_ops/venv-torch211-py<XY>) with torch==2.11.0 for the GPU image's Python 3.12
#     when a python3.12 is found (PATH, then pyenv), else python3.11, else python3. It also gets
#     numpy<2.4: triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU Triton tests) turns
#     1-element arrays into scalars, which numpy >= 2.4 refuses; with numpy 2.3.x they pass.
#     (The GPU image has numpy 2.5 and is not affected: it runs compiled Triton, not the interpreter.)
#  2. A staging copy of the source tree (git's tracked + untracked-not-ignored files) in
#     ~/.cache/danet_ops/src-py<XY>, so the checkout's own danet_ops/_C*.so (the CPU venv's) is
#     never touched, built there with `setup.py build_ext --inplace`, DANET_OPS_CUDA=1,
#     TORCH_CUDA_ARCH_LIST="8.0;9.0a" (sm_80 and sm_90a machine code) and the nvcc here.
#     The .so is cached by a hash of csrc/, setup.py, the torch version, the arch list and the
#     Python tag (~/.cache/danet_ops/so/<hash>/): an unchanged source tree is not rebuilt; a
#     changed one is built from scratch (~4 min on 2 idle cores).
#  3. Asserts that danet_ops::pam_forward, pam_backward, cam_forward, cam_backward each have a
#     CUDA (and a CPU) kernel registered, lists the embedded GPU architectures (cuobjdump) and the
#     newest GLIBCXX symbol the .so needs (the GPU image's libstdc++ must provide it).
#  4. Copies the .so to build/gpu/danet_ops/_C.<tag>.so in the checkout (ignored by git; a GPU
#     run carries `build/gpu`: see docs/benchmarks.md).
#  5. Unless --no-tests: the CPU test suite (`pytest tests`) in the staging copy with that venv.
# Environment: DANET_OPS_CUDA_VENV, DANET_OPS_CACHE (default ~/.cache/danet_ops), CUDA_HOME
# (default: the CUDA of `which nvcc`), TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS.
# Exit status non-zero when the venv, the build, the kernel check or the tests fail.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN_TESTS=1
REBUILD=0
for a in "$@"; do
  case $a in
    --no-tests) RUN_TESTS=0 ;;
    --rebuild) REBUILD=1 ;;
    *) echo "usage: $0 [--no-tests] [--rebuild]" >&2; exit 2 ;;
  esac
done
t0=$(date +%s)
say() { echo "[build_cuda_ext +$(( $(date +%s) - t0 ))s] $*"; }

TORCH_PIN=2.11.0
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
CACHE=${DANET_OPS_CACHE:-$HOME/.cache/danet_ops}
mkdir -p "$CACHE"

# --- the interpreter: the GPU image's Python (3.12) if there is one here
find_python() {
  local p
  for p in python3.12 "$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/"3.12*/bin/python3.12 \
           python3.11 python3; do
    [ -n "$p" ] || continue
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import venv" 2>/dev/null; then
      command -v "$p"; return 0
    fi
  done
  return 1
}
BASE_PY=$(find_python) || { echo "no python3 found" >&2; exit 1; }
PYTAG=$("$BASE_PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
[ "$PYTAG" = 312 ] || say "WARNING: no python3.12 here; building for Python ${PYTAG}, which the GPU image (3.12) cannot load: gpu_check.sh will build there"
VENV=${DANET_OPS_CUDA_VENV:-$CACHE/venv-torch211-py$PYTAG}
PY=$VENV/bin/python

# --- 1. the venv (reinstalled when the requirement line changes)
# (pyproject's build, test and train extras read by scripts/requirements.py, with torch and numpy
# pinned as on the GPU image; pytest-timeout as on the GPU image)
REQS="torch==$TORCH_PIN numpy<2.4 pytest-timeout $("$BASE_PY" scripts/requirements.py build,test,train | grep -v '^numpy$' | tr '\n' ' ')"
REQS=${REQS% }
if [ ! -x "$PY" ] || [ "$(cat "$VENV/.danet_ops_reqs" 2>/dev/null)" != "$REQS" ]; then
  say "installing into $VENV with $BASE_PY ($("$BASE_PY" --version)): $REQS"
  [ -x "$PY" ] || "$BASE_PY" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086  # the requirement list is meant to split
  "$PY" -m pip install -q $REQS
  echo "$REQS" >"$VENV/.danet_ops_reqs"
fi
"$PY" - "$TORCH_PIN" <<'PY'
import sys, numpy, torch, triton
print(f"[build_cuda_ext] python {sys.version.split()[0]} torch {torch.__version__} (CUDA {torch.version.cuda}) "
      f"triton {triton.__version__} numpy {numpy.__version__}")
if not torch.__version__.startswith(sys.argv[1]) or torch.version.cuda is None:
    sys.exit(f"expected a CUDA build of torch {sys.argv[1]}")
PY
say "venv ready"

# --- 2. staging copy + build (cached by content)
if [ -z "${CUDA_HOME:-}" ]; then
  # nvcc's own CUDA: the folder above `which nvcc` when it has the headers (here /usr/local/bin/nvcc
  # is a wrapper script, so also /usr/local/cuda*)
  NVCC=$(command -v nvcc) || { echo "nvcc not found: set CUDA_HOME or put nvcc on PATH" >&2; exit 1; }
  for d in "$(dirname "$(readlink -f "$NVCC")")/.." /usr/local/cuda /usr/local/cuda-*; do
    if [ -f "$d/include/cuda_runtime_api.h" ] && [ -x "$d/bin/nvcc" ]; then CUDA_HOME=$(cd "$d" && pwd -P); break; fi
  done
  [ -n "${CUDA_HOME:-}" ] || { echo "no CUDA toolkit with headers found for $NVCC: set CUDA_HOME" >&2; exit 1; }
fi
export CUDA_HOME
export PATH=$CUDA_HOME/bin:$PATH
say "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1) (CUDA_HOME=$CUDA_HOME); TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

STAGE=$CACHE/src-py$PYTAG
rm -rf "$STAGE"
mkdir -p "$STAGE"
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar -c --null -T - -f - | tar -x -C "$STAGE" -f -
SO_NAME=$("$PY" -c 'import sysconfig; print("_C" + sysconfig.get_config_var("EXT_SUFFIX"))')
KEY=$( (cd "$STAGE" && find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum
        "$PY" -c 'import torch; print(torch.__version__)'; echo "$TORCH_CUDA_ARCH_LIST $SO_NAME"
        "$CUDA_HOME/bin/nvcc" --version | tail -1) | sha256sum | cut -c1-16)
CACHED=$CACHE/so/$KEY/$SO_NAME
if [ "$REBUILD" = 1 ] || [ ! -f "$CACHED" ]; then
  say "building $SO_NAME (key $KEY) in $STAGE (about 4 min on 2 cores)"
  tb=$(date +%s)
  LOG=$CACHE/build-py$PYTAG.log
  # A fresh build-temp each time: ninja decides by mtimes, and the staging copy keeps the
  # checkout's mtimes, so objects from an older tree could look newer than changed sources.
  # (The content-hash cache above is what makes an unchanged tree free.)
  rm -rf "$CACHE/build-temp-py$PYTAG"
  if ! (cd "$STAGE" && DANET_OPS_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace \
          --build-temp "$CACHE/build-temp-py$PYTAG") >"$LOG" 2>&1 \
     || [ ! -f "$STAGE/danet_ops/$SO_NAME" ]; then
    tail -60 "$LOG" >&2
    echo "[build_cuda_ext] BUILD FAILED (full log: $LOG)" >&2
    exit 1
  fi
  grep "\[danet_ops build\]" "$LOG" | cut -c1-300 || true
  say "$(grep -ci "warning" "$LOG" || true) warning lines in $LOG"
  say "built in $(( $(date +%s) - tb )) s"
else
  say "unchanged sources: cached $CACHED"
  cp "$CACHED" "$STAGE/danet_ops/$SO_NAME"
fi
SO=$STAGE/danet_ops/$SO_NAME

# --- 3. the kernel check
(cd "$STAGE" && "$PY" - <<'PY'
import torch
from danet_ops import _compiled_ops, _extension
assert _compiled_ops.load(), _extension.error()
print(f"[build_cuda_ext] loaded: {_extension.how()}")
missing = []
for op in ("pam_forward", "pam_backward", "cam_forward", "cam_backward"):
    keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"danet_ops::{op}", k)]
    print(f"[build_cuda_ext]   danet_ops::{op}: kernels for {', '.join(keys)}")
    missing += [f"{op}/{k}" for k in ("CPU", "CUDA") if k not in keys]
if missing:
    raise SystemExit(f"[build_cuda_ext] FAILED: no kernel for {missing}")
PY
) || { echo "[build_cuda_ext] FAILED: the library does not load with its kernels (above: e.g. a schema mismatch between csrc/register.cpp and a binding)" >&2; exit 1; }
CUOBJDUMP=$(command -v cuobjdump || "$PY" -c 'import os, triton; p = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"); print(p if os.path.exists(p) else "")')
if [ -n "$CUOBJDUMP" ]; then
  archs=$("$CUOBJDUMP" --list-elf "$SO" 2>/dev/null | grep -o 'sm_[0-9]*a\?' | sort -u | tr '\n' ' ')
  say "embedded GPU code (cuobjdump): ${archs:-none found}"
  # (triton's cuobjdump 12.8 names the sm_90a cubins "sm_90"; the nvcc lines below show the 'a')
  for want in sm_80 sm_90; do
    case " $archs " in *" $want"*) ;; *) echo "[build_cuda_ext] FAILED: no $want code in the .so" >&2; exit 1 ;; esac
  done
fi
if [ -n "${LOG:-}" ]; then  # built now: nvcc was asked for sm_90a machine code (wgmma, setmaxnreg)
  grep -q "code=sm_90a" "$LOG" || { echo "[build_cuda_ext] FAILED: nvcc never got code=sm_90a" >&2; exit 1; }
  say "nvcc targets: $(grep -o 'code=sm_[0-9a]*' "$LOG" | sort -u | tr '\n' ' ')"
fi
glibcxx=$(objdump -T "$SO" 2>/dev/null | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1 || true)
say "newest libstdc++ symbol needed: ${glibcxx:-?} (built with $(g++ --version | head -1))"

mkdir -p "$(dirname "$CACHED")"   # cached only once it loads with all its kernels and archs
cp -f "$SO" "$CACHED"

# --- 4. where a GPU run takes it from
mkdir -p "$ROOT/build/gpu/danet_ops"
rm -f "$ROOT"/build/gpu/danet_ops/_C*.so
cp "$CACHED" "$ROOT/build/gpu/danet_ops/$SO_NAME"
say "left $ROOT/build/gpu/danet_ops/$SO_NAME ($(du -h "$CACHED" | cut -f1)); a GPU run carries build/gpu"

# --- 5. the CPU test suite under the GPU image's torch
if [ "$RUN_TESTS" = 1 ]; then
  say "CPU test suite in $STAGE with torch $TORCH_PIN"
  tt=$(date +%s)
  (cd "$STAGE" && PYTHONPATH=$STAGE PYTHON="$PY" bash scripts/test.sh -p no:cacheprovider)
  say "tests passed in $(( $(date +%s) - tt )) s"
fi
say "done in $(( $(date +%s) - t0 )) s"
