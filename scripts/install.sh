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
# The requirements of the chosen extras, read from pyproject.toml (self-references such as
# danet_ops[build,train] expanded), installed first so the build below finds its tools.
mapfile -t REQS < <("$PY" - "$EXTRAS" <<'PY'
import re, sys
try:
    import tomllib
except ImportError:                      # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
seen, out = set(), list(project.get("dependencies", []))
def add(name):
    if name in seen:
        return
    if name not in extras:
        sys.exit(f"[install] unknown extra {name!r}; pyproject.toml has {sorted(extras)}")
    seen.add(name)
    for req in extras[name]:
        m = re.fullmatch(r"danet_ops\[(.*)\]", req)
        if m:
            for sub in m.group(1).split(","):
                add(sub.strip())
        else:
            out.append(req)
for e in sys.argv[1].split(","):
    if e.strip():
        add(e.strip())
print("\n".join(dict.fromkeys(out)))
PY
)
echo "[install] extras ${EXTRAS}: ${REQS[*]}"
"$PY" -m pip install -q "${REQS[@]}"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" - <<'PY'
import torch, danet_ops
from danet_ops import _compiled
print(f"[install] torch {torch.__version__}, danet_ops {danet_ops.__version__}, "
      f"C++ ops: {_compiled._state['how'] or _compiled.error()}")
PY
