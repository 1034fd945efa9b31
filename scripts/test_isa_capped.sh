#!/usr/bin/env bash
# The oracle tests once more with every library capped to AVX2, whatever CPU runs them: the code
# paths of an AVX2-only CPU (no AVX-512, no bf16 matrix units) for ATen (ATEN_CPU_CAPABILITY),
# oneDNN (ONEDNN_MAX_CPU_ISA), MKL (MKL_ENABLE_INSTRUCTIONS), numpy's SIMD loops (its AVX-512
# dispatch groups disabled: the Triton interpreter's exp and dots), numpy's OpenBLAS (Haswell
# kernels) and danet_ops' own CPU kernels (DANET_OPS_CPU_ISA). scripts/isa_report.py checks that
# each cap took effect and prints it; then both invocations of scripts/test.sh run the oracle
# test files with the margin check (no comparison above 0.8 of its bound). CI runs it.
#   bash scripts/test_isa_capped.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
  OPENBLAS_CORETYPE=Haswell DANET_OPS_CPU_ISA=avx2
# numpy's dispatch targets above AVX2, by the names this numpy uses (isa_report.py's one rule)
NPY_DISABLE_CPU_FEATURES=$("$PY" scripts/isa_report.py --numpy-avx512-groups)
export NPY_DISABLE_CPU_FEATURES
"$PY" scripts/isa_report.py --expect avx2
bash scripts/test.sh tests/test_pam.py tests/test_cam.py tests/test_general.py tests/test_cpu_kernels.py \
  --margins-max 0.8 "$@"
