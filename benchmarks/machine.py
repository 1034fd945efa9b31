"""What the benchmarks know about the machine: CPU model and ISA, versions, and the torch.mm rate
of each dtype, measured at the start of a run with a few small products.

The rates size the run. A CPU without bf16 (or fp16) matrix units computes torch's bf16 matmul in
software: on an AVX2-only AMD EPYC bf16 `torch.mm` runs at about 0.9 GFLOP/s against 112 in
fp32, so a case that takes a second there in fp32 takes minutes in bf16. Where a dtype's rate is
under `HARDWARE_FRACTION` of fp32's, the cases torch computes in that dtype (the matmul rate and
the peers: reference, SDPA, FlexAttention) are shrunk or skipped by `plan_rounds`, saying why.
danet_ops' own CPU ops still run: without bf16 units their kernels take the fp32-tile path.
"""
import datetime
import functools
import math
import os
import platform
import re
import time

import torch

LOWP = (torch.bfloat16, torch.float16)
# A low-precision dtype "has hardware" when torch.mm in it runs at >= 1/4 of the fp32 rate. With
# matrix units (AVX512-BF16, AMX, a GPU) it is 1-16x fp32's; emulated it is 1/20 to 1/130.
HARDWARE_FRACTION = 0.25
# The longest one benchmark case (warm-up, memory pass and timed rounds) may take when its dtype
# is emulated; DANET_OPS_BENCH_CASE_CAP_S overrides it.
CASE_CAP_S = float(os.environ.get("DANET_OPS_BENCH_CASE_CAP_S", 20))
# Library ISA caps a run may be under (recorded in the machine info, so that a capped run says so).
ISA_CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE", "DANET_OPS_CPU_ISA", "DANET_OPS_CPU_LOWP")


def short(dtype):
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=None)
def matmul_rates():
    """{dtype name: GFLOP/s} of torch.mm on this CPU for fp32, bf16 and fp16: square products of
    n = 512, 1024, 2048 until one call takes 0.1 s, best of 3 calls after a warm-up, the best
    rate over the sizes (large enough that a busy machine's thread wake-ups do not dominate).
    About 1-3 s in all, most of it in an emulated dtype."""
    rates = {}
    for dtype in (torch.float32,) + LOWP:
        best = 0.0
        for n in (512, 1024, 2048):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            torch.mm(a, b)
            t = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                torch.mm(a, b)
                t = min(t, time.perf_counter() - t0)
            best = max(best, 2 * n ** 3 / t / 1e9)
            if t >= 0.1:
                break
        rates[short(dtype)] = best
    return rates


def has_hardware(dtype, device="cpu"):
    """Whether torch computes `dtype` at hardware speed on `device` (always on a GPU and in fp32/fp64)."""
    if device != "cpu" or dtype not in LOWP:
        return True
    r = matmul_rates()
    return r[short(dtype)] >= HARDWARE_FRACTION * r["float32"]


def rates_line():
    """One line for the log and the report: the measured rates and which dtypes are emulated."""
    r = matmul_rates()
    parts = [f"{name} {r[name]:.1f}" + ("" if has_hardware(getattr(torch, name)) else " (emulated: no hardware)")
             for name in r]
    return "torch.mm on this CPU: " + ", ".join(parts) + " GFLOP/s"


def plan_rounds(flops, dtype, device, rounds, cap_s=None):
    """(rounds, note) for a case that torch computes in `dtype` (`flops` per call): as planned
    where the dtype has hardware; where it is emulated, the time of one call is predicted from
    the measured rate and the case gets as many timed rounds (at least 1) as fit with its two
    warm-up calls in `cap_s`; (0, reason) when even one round does not fit (skip it)."""
    if has_hardware(dtype, device) or not flops:
        return rounds, None
    cap_s = CASE_CAP_S if cap_s is None else cap_s
    rate = matmul_rates()[short(dtype)]
    per_call = flops / (rate * 1e9)
    fit = min(rounds, int(cap_s / per_call) - 2)
    why = (f"{short(dtype)} is emulated on this CPU ({rate:.1f} GFLOP/s against fp32's "
           f"{matmul_rates()['float32']:.0f}): ~{per_call:.1f} s a call")
    if fit < 1:
        return 0, f"skipped: {why}, over the {cap_s:.0f} s a case may take"
    return fit, (f"{fit} timed round(s): {why}" if fit < rounds else None)


def matmul_size(dtype, device, n=4096, target_s=1.5):
    """The side of the matmul-rate case: n, or where `dtype` is emulated the multiple of 256 whose
    product takes about target_s at the measured rate."""
    if has_hardware(dtype, device):
        return n
    side = (matmul_rates()[short(dtype)] * 1e9 * target_s / 2) ** (1 / 3)
    return int(max(256, min(n, side // 256 * 256)))


# ----------------------------------------------------------------------------- the machine
def cpu_capabilities():
    try:
        return dict(torch.cpu.get_capabilities())
    except Exception:  # older torch: no cpuinfo query
        return {}


def matrix_isa():
    """The CPU's best matrix ISA for the report: AMX-BF16 > AVX512-BF16 > AVX512 > AVX2 (read from
    CPUID), and ATen's dispatch level where a cap (ATEN_CPU_CAPABILITY) lowers it."""
    caps = cpu_capabilities()
    names = [("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512_f", "AVX512"),
             ("avx2", "AVX2")]
    aten = torch.backends.cpu.get_cpu_capability()
    isa = next((n for k, n in names if caps.get(k)), aten)
    if caps.get("avx512_fp16") or caps.get("amx_fp16"):
        isa += " + " + ("AMX-FP16" if caps.get("amx_fp16") else "AVX512-FP16")
    if isa.startswith(("AMX", "AVX512")) and aten.upper() not in ("AVX512", "ZVECTOR", "SVE256"):
        isa += f" (ATen capped to {aten})"
    return isa


def cpu_kernel_path(dtype, op="pam"):
    """What danet_ops' CPU kernels run `dtype` on here, as the cpu backend of the registry says
    (the kernels' own choice, ISA caps included): e.g. "bf16-brgemm, avx512", "fp32-tiles, avx2";
    None while the C++ ops are not loaded (asking loads nothing)."""
    from danet_ops import backends

    detail = backends.REGISTRY["cpu"].describe(torch.device("cpu"), dtype, op)
    path, isa = re.search(r"path: ([\w-]+)", detail), re.search(r"ISA: (\w+)", detail)
    return ", ".join(m.group(1) for m in (path, isa) if m) or None


def row_isa(device, dtype, backend, op="pam"):
    """What a CPU row ran on: the CPU's matrix ISA and, for danet_ops' rows, the kernels' path."""
    if device != "cpu":
        return None
    isa = matrix_isa()
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    path = cpu_kernel_path(dt, op) if backend == "cpu" and dt is not None else None
    return f"{isa} ({path})" if path else isa


def cpuinfo():
    """(model name, set of flags) from /proc/cpuinfo (x86 "model name"/"flags", ARM "Model"/
    "Features"); (platform.processor(), empty set) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor(), set()
    m = re.search(r"^(?:model name|Model)\s*:\s*(.+)$", text, re.M)
    f = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    return (m.group(1).strip() if m else platform.processor()), (set(f.group(1).split()) if f else set())


def cpu_model():
    return cpuinfo()[0]


def machine_info(cpu_rates=True):
    """Machine, versions and date for the summary JSON; cpu_rates: with the measured torch.mm rates."""
    info = {
        "cpu_isa": matrix_isa(),
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    caps = {k: os.environ[k] for k in ISA_CAP_VARS if os.environ.get(k)}
    if caps:
        info["isa_caps"] = caps
    if cpu_rates:
        info["cpu_mm_gflops"] = matmul_rates()
        info["cpu_lowp_hardware"] = {short(d): has_hardware(d) for d in LOWP}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # not installed
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
