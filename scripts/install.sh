#!/usr/bin/env bash
# Install everything danet_ops needs into the current Python, then build it in place.
#  * torch: kept if already installed (any version >= 2.11); otherwise the CPU build 2.13.0.
#    (A bare `pip install torch` on Linux pulls several GB of CUDA wheels: pin it.)
#  * the other dependencies come from pyproject.toml's extras, the one place they are declared:
#    DANET_OPS_EXTRAS (default build,triton,test,train,export) selects which.
#  * the extension is built against that torch with --no-build-isolation, so pip never
#    downloads a second torch into a build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${DANET_OPS_EXTRAS:-build,triton,test,train,export}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing the CPU build torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
# The requirements of the chosen extras, read from pyproject.toml (scripts/requirements.py),
# installed first so the build below finds its tools.
mapfile -t REQS < <("$PY" scripts/requirements.py "$EXTRAS")
[ "${#REQS[@]}" -gt 0 ] || { echo "[install] no requirements read for extras $EXTRAS" >&2; exit 1; }
echo "[install] extras ${EXTRAS}: ${REQS[*]}"
"$PY" -m pip install -q "${REQS[@]}"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" - <<'PY'
import torch, danet_ops
from danet_ops import _extension
print(f"[install] torch {torch.__version__}, danet_ops {danet_ops.__version__}, "
      f"C++ ops: {_extension.status()}")
PY
