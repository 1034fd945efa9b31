"""Which instruction sets the libraries under the tests use on this machine, and the bf16 speed.

    python scripts/isa_report.py [--expect avx2]

Prints the CPU and its matrix-relevant flags, then what each library selected: ATen's CPU
capability (ATEN_CPU_CAPABILITY), oneDNN's ISA (ONEDNN_MAX_CPU_ISA; read from its verbose line in
a child process, or "not used" when torch does not call oneDNN for a bf16 matmul), MKL's
instruction cap (MKL_ENABLE_INSTRUCTIONS), numpy's SIMD groups (NPY_DISABLE_CPU_FEATURES) and its
OpenBLAS core (OPENBLAS_CORETYPE, via threadpoolctl), danet_ops' backends with the CPU kernels' ISA
and paths (DANET_OPS_CPU_ISA), and the measured fp32 / bf16 matmul rates.

--expect avx2: exit 1 unless every cap took effect (the suite's ISA-capped run: CI calls it).
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)     # this checkout's danet_ops, as from the repository root
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile",
         "asimd", "sve", "bf16")


def numpy_avx512_groups():
    """numpy's SIMD dispatch targets above AVX2, by the names this numpy uses (they changed in
    numpy 2.4: X86_V4, AVX512_ICL, ...; before: AVX512F, AVX512_SKX, ...). The capped run disables
    these (NPY_DISABLE_CPU_FEATURES) and the check below looks at the same list."""
    from numpy._core._multiarray_umath import __cpu_dispatch__
    return [f for f in __cpu_dispatch__ if f == "X86_V4" or f.startswith("AVX512")]


def _child(code, env_extra):
    env = dict(os.environ, **env_extra)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return r.stdout + r.stderr


def onednn_isa():
    out = _child("import torch; a = torch.randn(64, 64).bfloat16(); a @ a", {"ONEDNN_VERBOSE": "1"})
    m = re.search(r"isa:([^\n,]+)", out)
    return m.group(1).strip() if m else "not used for a bf16 matmul (torch's own fallback)"


def report():
    import numpy
    import torch
    from benchmarks.machine import cpuinfo, matmul_rates
    model, flags = cpuinfo()
    info = {"cpu": model, "flags": sorted(x for x in FLAGS if x in flags)}
    info["torch"] = {"version": torch.__version__,
                     "capability": torch.backends.cpu.get_cpu_capability(),
                     "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY")}
    info["onednn"] = {"isa": onednn_isa(), "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    info["mkl"] = {"MKL_ENABLE_INSTRUCTIONS": os.environ.get("MKL_ENABLE_INSTRUCTIONS")}
    from numpy._core._multiarray_umath import __cpu_features__ as feats   # what numpy dispatches to
    info["numpy"] = {"version": numpy.__version__,
                     "avx512_groups_on": [g for g in numpy_avx512_groups() if feats.get(g)],
                     "NPY_DISABLE_CPU_FEATURES": os.environ.get("NPY_DISABLE_CPU_FEATURES")}
    try:
        import threadpoolctl
        blas = [p for p in threadpoolctl.threadpool_info() if p.get("internal_api") == "openblas"]
        info["numpy"]["openblas_core"] = blas[0].get("architecture") if blas else None
    except ImportError:
        info["numpy"]["openblas_core"] = "unknown (threadpoolctl not installed)"
    info["numpy"]["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    import danet_ops
    from danet_ops import backends
    backends.get("cpu").prepare()        # load the C++ ops (availability alone loads nothing)
    info["danet_ops"] = {"backends": {k: (ok, why) for k, (ok, why) in danet_ops.available_backends().items()},
                         "DANET_OPS_CPU_ISA": os.environ.get("DANET_OPS_CPU_ISA")}
    ops = torch.ops.danet_ops
    if hasattr(ops, "cpu_isa"):
        info["danet_ops"]["cpu_isa"] = ops.cpu_isa()
        info["danet_ops"]["cpu_paths"] = {f"{op}-{str(dt)[6:]}": ops.cpu_path(op, dt) for op in ("pam", "cam")
                                          for dt in (torch.float32, torch.bfloat16, torch.float16)}
    info["gflops"] = {k: round(r, 2) for k, r in matmul_rates().items()}   # the benchmarks' measurement
    return info


def check(info, expect):
    """The caps of the ISA-capped run took effect: (what, ok) pairs."""
    assert expect == "avx2"
    isa = str(info["danet_ops"].get("cpu_isa", "not reported (no cpu_isa op)")).lower()
    return [
        ("ATen capability is AVX2", info["torch"]["capability"] == "AVX2"),
        ("oneDNN below AVX-512", "512" not in info["onednn"]["isa"]),
        ("numpy without its AVX-512 groups", not info["numpy"]["avx512_groups_on"]),
        ("OpenBLAS core Haswell", info["numpy"]["openblas_core"] in ("Haswell", None)),
        ("MKL capped at AVX2", info["mkl"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"),
        ("danet_ops CPU kernels at AVX2 or below", isa in ("avx2", "default", "baseline", "scalar")),
        ("danet_ops bf16 PAM off the bf16 matrix units", "brgemm" not in str(
            info["danet_ops"].get("cpu_paths", {}).get("pam-bfloat16", "brgemm?"))),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--expect", choices=["avx2"], help="fail unless every cap to this ISA took effect")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--numpy-avx512-groups", action="store_true",
                   help="print numpy's dispatch targets above AVX2 (for NPY_DISABLE_CPU_FEATURES) and exit")
    args = p.parse_args(argv)
    if args.numpy_avx512_groups:
        print(" ".join(numpy_avx512_groups()))
        return 0
    info = report()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"[isa] {key}: {value}")
        import numpy
        print("[isa] numpy.show_runtime():", flush=True)
        numpy.show_runtime()      # numpy's own account: SIMD extensions found / not found, BLAS
    if args.expect:
        results = check(info, args.expect)
        for what, ok in results:
            print(f"[isa] {'ok  ' if ok else 'FAIL'} {what}")
        if not all(ok for _, ok in results):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
