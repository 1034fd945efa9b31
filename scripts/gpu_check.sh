#!/usr/bin/env bash
# The GPU proof is the Python module benchmarks/gpu_check.py (docs/benchmarks.md); this wrapper
# keeps the old command working: scripts/gpu_check.sh [--dry-run] [OUTDIR] [options].
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
