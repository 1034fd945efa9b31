#!/usr/bin/env bash
# Install everything danet_ops needs into the current Python, then build it in place.
#  * torch: kept if already installed (any version >= 2.11); otherwise the CPU build 2.13.0.
#    (A bare `pip install torch` on Linux pulls several GB of CUDA wheels: pin it.)
#  * the extension is built against that torch with --no-build-isolation, so pip never
#    downloads a second torch into a build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing the CPU build torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q "triton>=3.6" ninja pybind11 numpy pytest pytest-benchmark tqdm matplotlib setuptools wheel
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" - <<'PY'
import torch, danet_ops
from danet_ops import _compiled
print(f"[install] torch {torch.__version__}, danet_ops {danet_ops.__version__}, "
      f"C++ ops: {_compiled._state['how'] or _compiled.error()}")
PY
