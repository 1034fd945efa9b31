"""Benchmark harness: devices, sizes, peak-memory measurement, and the summary table.

Run: `pytest benchmarks/ --benchmark-only` (short: 32^2, 64^2) or with DANET_OPS_BENCH_FULL=1
(CPU 32^2..128^2 and the model on CPU; GPU up to 128x256 and the model at 1024x2048).
DANET_OPS_BENCH_DEVICES=cuda (comma list) restricts the devices.

Each benchmark records in extra_info what the report (python -m benchmarks.report) needs: op,
pass, backend, device, dtype, shape, FLOPs, bytes, peak memory, and a status ("ok", "OOM",
"unsupported", "skipped"). At the end the summary table is printed and bench-<cpu|gpu>.json
written (machine info with the torch.mm rates measured at the start, the matmul rate and copy
bandwidth of this run, one row per benchmark with median and spread), with pytest-benchmark's
own JSON beside it (pytest-benchmark-<cpu|gpu>.json), in DANET_OPS_BENCH_OUT, by default
benchmarks/results/tmp/ (ignored by git: the report copies them into its dated folder).
"""
import ctypes
import gc
import json
import os
import pathlib
import re

import pytest
import torch

from models import rss
from .machine import machine_info, rates_line, row_isa
from .report import raw_dir

FULL = os.environ.get("DANET_OPS_BENCH_FULL", "0") == "1"
RESULTS_DIR = raw_dir()               # where the report reads from


@pytest.fixture(scope="session", autouse=True)
def _mmap_large_allocations():
    """glibc: serve every allocation >= 64 KiB with mmap for the benchmark session, so that freed
    memory goes back to the OS at once; otherwise the process high-water mark (the peak-memory
    columns) misses allocations that reuse cached heap. Set in this session fixture rather than at
    import (importing the conftest, e.g. by a test collecting it, changes no process state);
    DANET_OPS_BENCH_MALLOPT=0 opts out. glibc has no getter, so afterwards the threshold goes
    back to glibc's documented default (128 KiB; its dynamic adjustment then stays off)."""
    libc = None
    if os.environ.get("DANET_OPS_BENCH_MALLOPT", "1") != "0":
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            libc = None
    yield
    if libc is not None:
        libc.mallopt(-3, 128 * 1024)


def cpu_sizes():
    return [(32, 32), (64, 64), (96, 96), (128, 128)] if FULL else [(32, 32), (64, 64)]


def gpu_sizes():
    # Short run: the two GPU target sizes (64x128, and Cityscapes' 128x256 at output stride 8).
    return [(32, 32), (64, 64), (64, 128), (128, 128), (128, 256)] if FULL else [(64, 128), (128, 256)]


def devices():
    """cpu, and cuda when available; DANET_OPS_BENCH_DEVICES=cuda (comma list) restricts them."""
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    want = [d.strip() for d in os.environ.get("DANET_OPS_BENCH_DEVICES", "").split(",") if d.strip()]
    return [d for d in have if not want or d in want]


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
    if not rss.reset_peak():  # the peak RSS := the current RSS
        return None
    base = rss.status("VmRSS")
    fn()
    return rss.status("VmHWM") - base


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Unsupported(Exception):
    """A peer that cannot run this case here (e.g. FlexAttention not compilable): an
    "unsupported" row, the other backends still run."""


_ROWS = []


def is_oom(exc):
    """An allocation failure (CUDA or CPU) that a benchmark row reports as "OOM"."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError)
        and re.search(r"out of memory|can't allocate memory", str(exc), re.I) is not None)


def measure(benchmark, run, device, rounds):
    """Two warm-up calls (the second one measures peak memory), then `rounds` timed rounds.

    Returns (status, peak_mem, note): status "ok", or "OOM" when an allocation failed (the row
    says so and the other backends still run), or "unsupported" when a peer has no kernel for the
    case (SDPA's "No available kernel"). Any other error fails the benchmark.
    """
    try:
        run()  # warm-up: JIT builds, Triton compilation and autotuning, allocator caches
        mem = peak_memory(run, device)
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)
        return "ok", mem, None
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised if unexpected
        if is_oom(exc):
            status = "OOM"
        elif "No available kernel" in str(exc) or isinstance(exc, Unsupported):
            status = "unsupported"
        else:
            raise
        note = str(exc).strip().splitlines()[0][:200]
    gc.collect()  # the traceback (and the tensors of the failed call) is gone now
    if device == "cuda":
        torch.cuda.empty_cache()
    return status, None, note


@pytest.fixture
def record():
    """record(benchmark, **info): store the row in extra_info and in the summary table."""
    def _record(benchmark, **info):
        info.setdefault("status", "ok")
        op = "cam" if info["op"] == "cam" else "pam"
        info.setdefault("isa", row_isa(info["device"], info["dtype"], info["backend"], op))
        benchmark.extra_info.update(info)
        _ROWS.append((benchmark, info))
    return _record


def _stats(bm):
    """Median and spread (pytest-benchmark's statistics of the timed rounds), or {} if none."""
    stats = getattr(bm, "stats", None)
    stats = getattr(stats, "stats", stats)
    if stats is None or not getattr(stats, "data", None):
        return {}
    return dict(median_s=stats.median, iqr_s=stats.iqr, min_s=stats.min, max_s=stats.max,
                stddev_s=stats.stddev, rounds=stats.rounds)


def _kind():
    return "gpu" if "cuda" in devices() else "cpu"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Write pytest-benchmark's own JSON next to ours unless --benchmark-json was given."""
    opt = config.option
    if (getattr(opt, "benchmark_json", False) is None and not opt.collectonly
            and not getattr(opt, "benchmark_skip", False) and not getattr(opt, "benchmark_disable", False)):
        os.makedirs(RESULTS_DIR, exist_ok=True)
        path = os.path.join(RESULTS_DIR, f"pytest-benchmark-{_kind()}.json")
        try:  # pytest-benchmark >= 5 opens the path itself; older versions want an open file
            from importlib.metadata import version
            new = int(version("pytest-benchmark").split(".")[0]) >= 5
        except Exception:  # noqa: BLE001 - unknown version: assume the current API
            new = True
        opt.benchmark_json = pathlib.Path(path) if new else open(path, "wb")


def pytest_report_header(config):
    """The torch.mm rates of this CPU (measured here, once), which size the emulated-dtype cases."""
    if "cpu" in devices() and not config.option.collectonly:
        return [rates_line()]
    return []


def pytest_terminal_summary(terminalreporter):
    from .report import derive, rates_for_rows  # the report's arithmetic: the JSON and the report agree

    rows = [dict(info, **_stats(bm)) for bm, info in _ROWS]
    rows = [r for r in rows if r["status"] != "ok" or r.get("median_s") is not None]
    if not rows:
        return
    ok = [r for r in rows if r["status"] == "ok"]
    canon = {"cpu": "float32", "cuda": "bfloat16"}  # the rate "% of matmul" refers to by default
    matmul = {r["device"]: r["flops"] / r["median_s"] for r in ok
              if r["op"] == "matmul" and r["dtype"] == canon.get(r["device"], r["dtype"])}
    matmul_dtype = {f"{r['device']}/{r['dtype']}": r["flops"] / r["median_s"] for r in ok
                    if r["op"] == "matmul"}
    matmul_n = {f"{r['device']}/{r['dtype']}": r["N"] for r in ok if r["op"] == "matmul"}
    copy = {r["device"]: r["bytes"] / r["median_s"] for r in ok if r["op"] == "copy"}
    machine = machine_info(cpu_rates="cpu" in devices())
    out = derive([r for r in rows if r["op"] not in ("matmul", "copy")], matmul, copy,
                 rates_for_rows(matmul_dtype, machine))
    tw = terminalreporter
    tw.section("danet_ops: speedup and memory vs reference (median time)")
    if "cpu" in devices():
        tw.write_line(rates_line())
    for r in rows:
        if r.get("note") and r["status"] in ("ok", "skipped"):
            tw.write_line(f"note: {r['op']} {r['pass']} {r['device']} {r['dtype']} {r['H']}x{r['W']} "
                          f"{r['backend']}: {r['note']}")
    for key, rate in matmul_dtype.items():
        tw.write_line(f"{key} matmul rate measured in this run: {rate / 1e9:.1f} GFLOP/s")
    for dev, bw in copy.items():
        tw.write_line(f"{dev} copy bandwidth measured in this run: {bw / 1e9:.1f} GB/s")
    f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
    tw.write_line(f"{'op':11} {'pass':6} {'dev':4} {'dtype':8} {'size':>9} {'B':>2} {'backend':9} "
                  f"{'ms':>9} {'IQR ms':>7} {'speedup':>8} {'peak MiB':>9} {'mem ratio':>9} "
                  f"{'GFLOP/s':>8} {'% mm':>5} {'% bw':>5} {'img/s':>6}")
    for r in sorted(out, key=lambda r: (r["op"], r["pass"], r["device"], r["dtype"], r.get("variant") or "",
                                        r["N"], r["backend"])):
        ms = f(r.get("median_s") and r["median_s"] * 1e3, "%.1f") if r["status"] == "ok" else r["status"]
        mem = r.get("peak_mem")
        tw.write_line(
            f"{r['op']:11} {r['pass']:6} {r['device']:4} {r['dtype']:8} "
            f"{'%dx%d' % (r['H'], r['W']) + (' ' + r['variant'] if r.get('variant') else ''):>9} "
            f"{r['B']:>2} {r['backend']:9} {ms:>9} {f(r.get('iqr_s') and r['iqr_s'] * 1e3, '%.1f'):>7} "
            f"{f(r['speedup_vs_reference'], '%.2fx'):>8} {f(mem and mem / 2**20, '%.1f'):>9} "
            f"{f(r['mem_ratio_vs_reference'], '%.3f'):>9} {f(r['gflops'], '%.1f'):>8} "
            f"{f(r['frac_of_matmul'] and 100 * r['frac_of_matmul'], '%.0f%%'):>5} "
            f"{f(r['frac_of_bandwidth'] and 100 * r['frac_of_bandwidth'], '%.0f%%'):>5} "
            f"{f(r['img_per_s'], '%.2f'):>6}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = {"machine": machine, "matmul_flops_per_s": matmul,
               "matmul_flops_per_s_by_dtype": matmul_dtype, "matmul_n_by_dtype": matmul_n,
               "copy_bytes_per_s": copy,
               "full": FULL, "rows": out}
    path = os.path.join(RESULTS_DIR, f"bench-{_kind()}.json")
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    tw.write_line(f"summary written to {path}; report: python -m benchmarks.report --json {path}")
