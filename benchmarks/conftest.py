"""Benchmark harness: devices, sizes, peak-memory measurement, and the summary table.

Run: `pytest benchmarks/ --benchmark-only` (short: 32^2, 64^2) or with DANET_OPS_BENCH_FULL=1
(CPU 32^2..128^2; GPU up to 128x256). Each benchmark records in extra_info what the report
(python -m benchmarks.report) needs: op, pass, backend, device, dtype, shape, FLOPs, peak memory.
A machine summary (CPU/GPU model, versions, sgemm rate) is written next to the results.
"""
import ctypes
import datetime
import json
import os
import platform
import re

import pytest
import torch

FULL = os.environ.get("DANET_OPS_BENCH_FULL", "0") == "1"
RESULTS_DIR = os.environ.get("DANET_OPS_BENCH_OUT",
                             os.path.join(os.path.dirname(__file__), "results", "raw"))

# glibc: serve every allocation >= 64 KiB with mmap so that freed memory goes back to the OS at
# once; otherwise the process high-water mark misses allocations that reuse cached heap.
try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
except (OSError, AttributeError):
    pass


def cpu_sizes():
    return [(32, 32), (64, 64), (96, 96), (128, 128)] if FULL else [(32, 32), (64, 64)]


def gpu_sizes():
    return [(32, 32), (64, 64), (128, 128), (128, 256)] if FULL else [(64, 64), (128, 256)]


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _status_kb(field):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else None


def peak_memory(fn, device):
    """Peak bytes allocated by fn() above what was allocated before it (inputs excluded).

    CUDA: torch.cuda.max_memory_allocated. CPU: the process resident high-water mark (VmHWM),
    reset through /proc/self/clear_refs before the call.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
    except OSError:
        return None
    base = _status_kb("VmRSS")
    fn()
    return _status_kb("VmHWM") - base


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def machine_info():
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # not installed
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


_ROWS = []


@pytest.fixture
def record():
    """record(benchmark, **info): store the row in extra_info and in the summary table."""
    def _record(benchmark, **info):
        benchmark.extra_info.update(info)
        _ROWS.append((benchmark, info))
    return _record


def _median(bm):
    stats = getattr(bm, "stats", None)
    stats = getattr(stats, "stats", stats)
    return getattr(stats, "median", None) if stats is not None else None


def pytest_terminal_summary(terminalreporter):
    rows = [(info, _median(bm)) for bm, info in _ROWS if _median(bm) is not None]
    if not rows:
        return
    sgemm = {r["device"]: r["flops"] / t for r, t in rows if r["op"] == "matmul"}
    groups = {}
    for info, t in rows:
        if info["op"] == "matmul":
            continue
        key = (info["op"], info["pass"], info["device"], info["dtype"], info["H"], info["W"])
        groups.setdefault(key, {})[info["backend"]] = (t, info)
    tw = terminalreporter
    tw.section("danet_ops: speedup and memory vs reference (median time)")
    for dev, rate in sgemm.items():
        tw.write_line(f"{dev} matmul rate measured in this run: {rate / 1e9:.1f} GFLOP/s")
    tw.write_line(f"{'op':4} {'pass':7} {'dev':4} {'dtype':8} {'size':>8} {'backend':10} "
                  f"{'ms':>9} {'speedup':>8} {'peak MiB':>9} {'mem ratio':>9} {'GFLOP/s':>8} {'% mm':>6}")
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4] * k[5])):
        op, pas, dev, dtype, H, W = key
        ref = groups[key].get("reference")
        for backend, (t, info) in sorted(groups[key].items()):
            mem = info.get("peak_mem")
            speed = ref[0] / t if ref else None
            memr = (mem / ref[1]["peak_mem"]) if ref and mem is not None and ref[1].get("peak_mem") else None
            gfs = info["flops"] / t / 1e9
            frac = 100 * info["flops"] / t / sgemm[dev] if dev in sgemm else None
            f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
            tw.write_line(f"{op:4} {pas:7} {dev:4} {dtype:8} {f'{H}x{W}':>8} {backend:10} "
                          f"{t * 1e3:9.1f} {f(speed, '%.2fx'):>8} "
                          f"{f(mem / 2**20 if mem is not None else None, '%.1f'):>9} "
                          f"{f(memr, '%.3f'):>9} {gfs:8.1f} {f(frac, '%.0f%%'):>6}")
            out.append(dict(info, median_s=t, speedup_vs_reference=speed, mem_ratio_vs_reference=memr,
                            gflops=gfs, frac_of_matmul=(frac / 100 if frac is not None else None)))
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = {"machine": machine_info(), "matmul_flops_per_s": sgemm, "full": FULL, "rows": out}
    dev = "gpu" if "cuda" in sgemm else "cpu"
    path = os.path.join(RESULTS_DIR, f"last-{dev}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    tw.write_line(f"summary written to {path}")
