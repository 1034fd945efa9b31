"""Benchmark report: markdown, CSV and PNG plots from the benchmark suite's JSON.

    python -m benchmarks.report                        # the newest bench-*.json of the suite's output
                                                       # ($DANET_OPS_BENCH_OUT, else benchmarks/results/tmp)
    python -m benchmarks.report --json A.json [B.json]  # given summaries (bench-cpu.json, bench-gpu.json)
    python -m benchmarks.report --run [--full]         # run `pytest benchmarks --benchmark-only` first

For every device in the rows (cpu, cuda) it writes, under --out (default benchmarks/results):
  <stem>.md    machine header, verdicts against the performance targets, one table (and plot)
               per op and pass, model table
  <stem>.csv   every row with the derived numbers and the machine columns
  <stem>/*.png one figure per op and pass (time, peak memory, FLOP rate, fraction of matmul rate
               and, for CAM, of the bandwidth bound; a line per backend and dtype) and the model
  <stem>/*.json the raw output it was made from: each summary JSON and, where it lies beside
               one, pytest-benchmark's JSON of the same run (every timed round)
where <stem> is <cpu|gpu>-<device model>-<date of the run>. Every file names the device model,
torch / triton / CUDA versions and the date. Input: the JSON benchmarks/conftest.py writes.
"""
import argparse
import csv
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import time
import json

HERE = os.path.dirname(os.path.abspath(__file__))


def raw_dir():
    """Where the suite writes (benchmarks/conftest.py): ignored by git; each report keeps copies."""
    return os.environ.get("DANET_OPS_BENCH_OUT") or os.path.join(HERE, "results", "tmp")
BACKEND_ORDER = ("reference", "sdpa", "flex", "cpu", "cuda", "triton")
PEERS = ("reference", "sdpa", "flex")
SECTIONS = [("pam", "fwdbwd"), ("pam", "fwd"), ("cam", "fwdbwd"), ("cam", "fwd")]
TITLES = {"pam": "PAM", "cam": "CAM", "fwd": "forward", "fwdbwd": "forward+backward"}
CSV_FIELDS = ["device", "device_model", "torch", "triton", "cuda", "date", "op", "pass", "backend",
              "dtype", "B", "C", "Cq", "H", "W", "N", "status", "median_s", "iqr_s", "min_s",
              "max_s", "rounds", "peak_mem", "input_bytes", "flops", "bytes",
              "speedup_vs_reference", "mem_ratio_vs_reference", "gflops", "frac_of_matmul",
              "frac_of_bandwidth", "img_per_s", "note"]


# ----------------------------------------------------------------------------- numbers

def _case(r):
    # variant: a named input distribution of the same shape (e.g. "logit std 24"), or none.
    return (r["op"], r["pass"], r["device"], r["dtype"], r["B"], r["H"], r["W"], r.get("variant") or "")


def _ok(r):
    return r is not None and r.get("status", "ok") == "ok" and r.get("median_s") is not None


def derive(rows, matmul, copy, matmul_dtype=None):
    """Rows plus the numbers computed from them: speedup and peak-memory ratio against the
    "reference" row of the same case, achieved GFLOP/s, fraction of the same run's matmul rate
    (`matmul`: device -> FLOP/s; `matmul_dtype`: "device/dtype" -> FLOP/s, used for rows of that
    dtype when measured, e.g. CPU bf16 rows against the bf16 matmul rate) and of its copy
    bandwidth (`copy`: device -> bytes/s) for rows with `bytes`, and img/s for model rows."""
    matmul_dtype = matmul_dtype or {}
    refs = {_case(r): r for r in rows if r["backend"] == "reference"}
    out = []
    for r in rows:
        r = dict(r, status=r.get("status", "ok"))
        ref = refs.get(_case(r))
        t = r["median_s"] if _ok(r) else None
        t_ref = ref["median_s"] if _ok(ref) else None
        mem, mem_ref = r.get("peak_mem"), ref.get("peak_mem") if _ok(ref) else None
        flops, nbytes, dev = r.get("flops"), r.get("bytes"), r["device"]
        mm = matmul_dtype.get(f"{dev}/{r['dtype']}") or matmul.get(dev)
        r.update(
            speedup_vs_reference=t_ref / t if t and t_ref else None,
            mem_ratio_vs_reference=mem / mem_ref if t and mem is not None and mem_ref else None,
            gflops=flops / t / 1e9 if t and flops else None,
            frac_of_matmul=flops / t / mm if t and flops and mm else None,
            frac_of_bandwidth=nbytes / t / copy[dev] if t and nbytes and copy.get(dev) else None,
            img_per_s=r["B"] / t if t and r["op"].startswith("model") else None,
        )
        out.append(r)
    return out


def rates_for_rows(by_dtype, machine):
    """The per-dtype matmul rates that rows' "% of matmul" divides by: each dtype's own where
    measured, except a CPU dtype that this machine emulates (bf16 without bf16 units): its rows
    fall back to the fp32 rate, the one danet_ops' CPU ops run at there."""
    hw = machine.get("cpu_lowp_hardware") or {}
    return {k: v for k, v in by_dtype.items()
            if not (k.startswith("cpu/") and hw.get(k.split("/")[1]) is False)}


def load(path):
    """One summary JSON -> {machine, matmul, copy, full, rows (derived), source}."""
    with open(path) as f:
        d = json.load(f)
    matmul, copy = d.get("matmul_flops_per_s") or {}, d.get("copy_bytes_per_s") or {}
    by_dtype = d.get("matmul_flops_per_s_by_dtype") or {}
    return dict(machine=d.get("machine") or {}, matmul=matmul, matmul_dtype=by_dtype,
                matmul_n=d.get("matmul_n_by_dtype") or {}, copy=copy,
                full=d.get("full"),
                rows=derive(d.get("rows") or [], matmul, copy, rates_for_rows(by_dtype, d.get("machine") or {})),
                source=path)


def device_model(machine, device):
    return (machine.get("gpu") if device == "cuda" else machine.get("cpu")) or "unknown"


def groups(runs):
    """Split the runs by device: {(device, model, date): {meta..., rows}}; rows of several files
    for the same device and date are merged (a later file replaces the same case+backend)."""
    out = {}
    for run in runs:
        m = run["machine"]
        for dev in sorted({r["device"] for r in run["rows"]}):
            key = (dev, device_model(m, dev), m.get("date", "unknown-date"))
            g = out.setdefault(key, dict(device=dev, model=key[1], date=key[2], machine=m,
                                         matmul=None, matmul_dtype={}, matmul_n={}, copy=None, full=False,
                                         sources=[], rows={}))
            g["matmul"] = run["matmul"].get(dev) or g["matmul"]
            g["matmul_dtype"].update({k: v for k, v in (run.get("matmul_dtype") or {}).items()
                                      if k.startswith(dev + "/")})
            g["matmul_n"].update({k: v for k, v in run["matmul_n"].items() if k.startswith(dev + "/")})
            g["copy"] = run["copy"].get(dev) or g["copy"]
            g["full"] = g["full"] or bool(run["full"])
            g["sources"].append(run["source"])
            g["rows"].update({_case(r) + (r["backend"],): r for r in run["rows"] if r["device"] == dev})
    for g in out.values():
        g["rows"] = sorted(g["rows"].values(), key=_sort_key)
    return out


def _sort_key(r):
    b = r["backend"]
    return (r["op"], r["pass"], r["dtype"], r.get("variant") or "", r["N"], r["B"],
            BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER), b)


def _find(rows, op, pas, backend, dtype, B, H, W, variant=""):
    for r in rows:
        if ((r["op"], r["pass"], r["backend"], r["dtype"], r["B"], r["H"], r["W"], r.get("variant") or "")
                == (op, pas, backend, dtype, B, H, W, variant)):
            return r
    return None


# ----------------------------------------------------------------------------- verdicts against the targets

# (device, dtype, B, target text, op, pass, (H, W), metric, threshold)
TARGETS = [
    ("cpu", "float32", 1, "PAM fwd+bwd peak memory ≤ 3% of reference at 128×128", "pam", "fwdbwd", (128, 128), "mem", 0.03),
    ("cpu", "float32", 1, "PAM fwd+bwd ≥ 2× faster than reference at 128×128", "pam", "fwdbwd", (128, 128), "speedup", 2.0),
    ("cpu", "float32", 1, "PAM fwd+bwd ≥ 90% of the sgemm rate at 128×128", "pam", "fwdbwd", (128, 128), "matmul", 0.90),
    ("cpu", "float32", 1, "CAM fwd+bwd ≥ 1.5× faster than reference at 128×128", "cam", "fwdbwd", (128, 128), "speedup", 1.5),
    ("cpu", "float32", 1, "CAM fwd ≥ 1.2× faster than reference at 128×128", "cam", "fwd", (128, 128), "speedup", 1.2),
    ("cpu", "bfloat16", 1, "bf16 PAM fwd ≥ 1.5× the bf16 reference at 96×96", "pam", "fwd", (96, 96), "speedup", 1.5),
    ("cpu", "bfloat16", 1, "bf16 PAM fwd+bwd ≥ 1.5× the bf16 reference at 96×96", "pam", "fwdbwd", (96, 96), "speedup", 1.5),
    ("cpu", "bfloat16", 1, "bf16 PAM fwd ≥ 1.5× the bf16 reference at 128×128", "pam", "fwd", (128, 128), "speedup", 1.5),
    ("cpu", "bfloat16", 1, "bf16 PAM fwd+bwd ≥ 1.5× the bf16 reference at 128×128", "pam", "fwdbwd", (128, 128), "speedup", 1.5),
    ("cpu", "float32", 1, "DANet-R50 inference 512×1024, fp32: fused ≥ 1.3× released", "model-infer", "fwd", (512, 1024), "speedup", 1.3),
    ("cpu", "bfloat16", 1, "DANet-R50 inference 512×1024, bf16 autocast: fused ≥ 1.3× released", "model-infer", "fwd", (512, 1024), "speedup", 1.3),
    ("cpu", "float32", 1, "DANet-R50 inference 512×1024, fp32: fused uses less memory", "model-infer", "fwd", (512, 1024), "mem", 1.0),
    ("cpu", "bfloat16", 1, "DANet-R50 inference 512×1024, bf16 autocast: fused uses less memory", "model-infer", "fwd", (512, 1024), "mem", 1.0),
    ("cuda", "bfloat16", 2, "PAM fwd ≥ 50% of the bf16 matmul rate at 128×256", "pam", "fwd", (128, 256), "matmul", 0.5),
    ("cuda", "bfloat16", 2, "PAM fwd+bwd ≥ 5× faster than reference at 128×256", "pam", "fwdbwd", (128, 256), "speedup", 5.0),
    ("cuda", "bfloat16", 2, "PAM fwd+bwd ≥ 1.5× faster than SDPA (memory-efficient) at 128×256", "pam", "fwdbwd", (128, 256), "sdpa", 1.5),
    ("cuda", "bfloat16", 2, "PAM fwd+bwd peak memory linear in N (log-log slope ≤ 1.2 up to 128×256)", "pam", "fwdbwd", (128, 256), "linear", 1.2),
    ("cuda", "bfloat16", 2, "CAM fwd+bwd within 2× of the memory-bandwidth bound at 128×256", "cam", "fwdbwd", (128, 256), "bandwidth", 0.5),
]


def _verdict(rows, dtype, B, op, pas, size, metric, thr, backend):
    """(measured text, "pass" | "FAIL" | "not measured")."""
    H, W = size
    r = _find(rows, op, pas, backend, dtype, B, H, W)
    if r is None:
        return f"no {H}×{W} {dtype} B={B} row", "not measured"
    if r["status"] == "skipped":
        return r.get("note") or "skipped", "not measured"
    if not _ok(r):
        return r["status"], "FAIL"
    if metric in ("speedup", "mem", "sdpa"):
        peer = _find(rows, op, pas, "sdpa" if metric == "sdpa" else "reference", dtype, B, H, W)
        if peer is None or peer["status"] in ("unsupported", "skipped"):
            return f"peer {peer['status'] if peer else 'not run'}", "not measured"
        if peer["status"] == "OOM":
            return f"{peer['backend']} OOM, {backend} ran", "pass"
        if metric == "mem":
            if r.get("peak_mem") is None or not peer.get("peak_mem"):
                return "-", "not measured"
            v = r["peak_mem"] / peer["peak_mem"]
            return f"{100 * v:.1f}% of {peer['backend']}", "pass" if v <= thr else "FAIL"
        v = peer["median_s"] / r["median_s"]
        return f"{v:.2f}× vs {peer['backend']}", "pass" if v >= thr else "FAIL"
    if metric == "linear":
        pts = sorted((q["N"], q["peak_mem"]) for q in rows if q["op"] == op and q["pass"] == pas
                     and q["backend"] == backend and q["dtype"] == dtype and q["B"] == B
                     and _ok(q) and q.get("peak_mem") and q["N"] <= H * W)
        if len(pts) < 2:
            return "-", "not measured"
        (n1, m1), (n2, m2) = pts[-2:]
        v = math.log(m2 / m1) / math.log(n2 / n1)
        return f"slope {v:.2f} (N {n1}→{n2})", "pass" if v <= thr else "FAIL"
    v = r["frac_of_matmul"] if metric == "matmul" else r["frac_of_bandwidth"]
    if v is None:
        return f"no {'matmul rate' if metric == 'matmul' else 'copy bandwidth'} measured", "not measured"
    if metric == "bandwidth":
        return f"{1 / v:.2f}× the bound", "pass" if v >= thr else "FAIL"
    return f"{100 * v:.0f}% of matmul", "pass" if v >= thr else "FAIL"


def verdicts(g):
    """[(target, backend, measured, verdict)] for every performance target and fused backend."""
    out = []
    for dev, dtype, B, text, op, pas, size, metric, thr in TARGETS:
        rows = g["rows"] if g["device"] == dev else []
        fused = [b for b in BACKEND_ORDER if b not in PEERS and any(
            r["backend"] == b and r["op"] == op and r["dtype"] == dtype for r in rows)] or ["-"]
        for b in fused:
            measured, verdict = _verdict(rows, dtype, B, op, pas, size, metric, thr, b)
            if g["device"] != dev:
                measured = f"({'GPU' if dev == 'cuda' else 'CPU'} target)"
            out.append((text, b, measured, verdict))
    return out


# ----------------------------------------------------------------------------- output

def _slug(s):
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def stem(g):
    return f"{'gpu' if g['device'] == 'cuda' else 'cpu'}-{_slug(g['model'])}-{g['date']}"


def meta_columns(g):
    m = g["machine"]
    return dict(device=g["device"], device_model=g["model"], torch=m.get("torch"),
                triton=m.get("triton") or "not installed", cuda=m.get("cuda") or "none (CPU run)",
                date=g["date"])


def header_line(g):
    c = meta_columns(g)
    isa = g["machine"].get("cpu_isa") if g["device"] == "cpu" else None
    return (f"{c['device']}: {c['device_model']}{f' ({isa})' if isa else ''} · torch {c['torch']} · "
            f"triton {c['triton']} · CUDA {c['cuda']} · {c['date']}")


def _rate_unit(g):
    return (1e3, "TFLOP/s") if g["device"] == "cuda" else (1, "GFLOP/s")


def _fmt(v, fmt, scale=1.0):
    return "—" if v is None else fmt % (v * scale)


def _md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _op_table(g, rows):
    div, unit = _rate_unit(g)
    bw = g["device"] == "cuda" and any(r.get("bytes") for r in rows)  # CAM is compute-bound on CPU
    isa = any(r.get("isa") for r in rows)
    variants = any(r.get("variant") for r in rows)
    head = (["dtype", "size"] + (["inputs"] if variants else []) + ["B", "backend"] + (["ISA"] if isa else [])
            + ["median ms", "IQR ms", "vs reference", "peak MiB", "mem vs reference", unit, "% of matmul"]
            + (["% of BW bound"] if bw else []))
    body = []
    for r in rows:
        ok = _ok(r)
        ref = _find(rows, r["op"], r["pass"], "reference", r["dtype"], r["B"], r["H"], r["W"],
                    r.get("variant") or "")
        ref_oom = ref is not None and ref["status"] == "OOM" and r["backend"] != "reference"
        line = ([r["dtype"], f"{r['H']}×{r['W']}"] + ([r.get("variant") or "default"] if variants else [])
                + [r["B"], r["backend"]])
        line += ([r.get("isa") or "—"] if isa else [])
        line += [
                _fmt(r.get("median_s"), "%.2f", 1e3) if ok else f"**{r['status']}**",
                _fmt(r.get("iqr_s"), "%.2f", 1e3) if ok else "—",
                "reference OOM" if ref_oom and ok else _fmt(r["speedup_vs_reference"], "%.2f×"),
                _fmt(r.get("peak_mem") if ok else None, "%.1f", 2 ** -20),
                "reference OOM" if ref_oom and ok else _fmt(r["mem_ratio_vs_reference"], "%.3f"),
                _fmt(r["gflops"], "%.2f", 1 / div), _fmt(r["frac_of_matmul"], "%.0f%%", 100)]
        body.append(line + ([_fmt(r["frac_of_bandwidth"], "%.0f%%", 100)] if bw else []))
    return _md_table(head, body)


def _model_table(rows):
    isa = any(r.get("isa") for r in rows)
    head = ["mode", "image", "B", "dtype", "backend"] + (["ISA"] if isa else []) + [
        "median ms", "IQR ms", "img/s", "vs reference", "peak MiB", "mem vs reference"]
    body = [[r["op"].split("-")[1], f"{r['H']}×{r['W']}", r["B"], r["dtype"], r["backend"]]
            + ([r.get("isa") or "—"] if isa else []) + [
             _fmt(r.get("median_s"), "%.0f", 1e3) if _ok(r) else f"**{r['status']}**",
             _fmt(r.get("iqr_s"), "%.0f", 1e3) if _ok(r) else "—", _fmt(r["img_per_s"], "%.3g"),
             _fmt(r["speedup_vs_reference"], "%.2f×"),
             _fmt(r.get("peak_mem") if _ok(r) else None, "%.0f", 2 ** -20),
             _fmt(r["mem_ratio_vs_reference"], "%.3f")] for r in rows]
    return _md_table(head, body)


def _matmul_line(g):
    """The dense matmul rate of the run: the canonical dtype first, then the others, with sizes."""
    div, unit = _rate_unit(g)
    canon = "bfloat16" if g["device"] == "cuda" else "float32"
    default_n = 8192 if g["device"] == "cuda" else 4096
    rates = dict(g.get("matmul_dtype") or {})
    rates.setdefault(f"{g['device']}/{canon}", g["matmul"])
    keys = sorted(rates, key=lambda k: (k.split("/")[1] != canon, k))
    parts = []
    for k in keys:
        n = g.get("matmul_n", {}).get(k, default_n)
        parts.append(f"{k.split('/')[1]}: " + _fmt(rates[k], f"%.2f {unit}", 1e-9 / div) + f" ({n}² torch.mm)")
    return "; ".join(parts)


def _probe_line(m):
    """The CPU's torch.mm rates measured at the start of the run (benchmarks/machine.py)."""
    rates, hw = m.get("cpu_mm_gflops"), m.get("cpu_lowp_hardware") or {}
    if not rates:
        return "not recorded"
    return ", ".join(f"{k} {v:.1f}" + ("" if hw.get(k, True) else " (emulated: no hardware)")
                     for k, v in rates.items()) + " GFLOP/s"


def write_markdown(g, path, plots, sources=None):
    m, c = g["machine"], meta_columns(g)
    rel = os.path.basename(stem(g))
    sources = g["sources"] if sources is None else sources
    info = [("device", f"{c['device']}: {c['device_model']}"),
            ("CPU", f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores, {m.get('threads', '?')} torch threads)"),
            ("CPU matrix ISA", m.get("cpu_isa", "not recorded")),
            ("torch", c["torch"]), ("triton", c["triton"]), ("CUDA", c["cuda"]),
            ("Python", m.get("python", "?")), ("date", c["date"]),
            ("sweep", "full (DANET_OPS_BENCH_FULL=1)" if g["full"] else "short (default; the full sweep is DANET_OPS_BENCH_FULL=1)"),
            ("matmul rate, this run", _matmul_line(g)),
            ("copy bandwidth, this run", _fmt(g["copy"], "%.1f GB/s", 1e-9))]
    if g["device"] == "cpu":
        info.append(("torch.mm at the start (sizes the run)", _probe_line(m)))
    if m.get("isa_caps"):
        info.append(("ISA caps", ", ".join(f"`{k}={v}`" for k, v in m["isa_caps"].items())))
    info.append(("raw output", ", ".join(_md_path(s, path) for s in sources)))
    sized = [r for r in g["rows"] if r.get("note") and r["status"] in ("ok", "skipped")]
    parts = [f"# danet_ops benchmarks: {g['model']} ({g['device']}), {g['date']}", "",
             _md_table(["", ""], info), "",
             "## Performance targets", "",
             _md_table(["target", "backend", "measured", "verdict"], verdicts(g)), ""]
    if sized:
        parts += ["## Notes on rows (sized by the machine, failed checks)", ""]
        parts += [f"- {r['op']} {r['pass']} {r['dtype']} {r['H']}×{r['W']} {r['backend']}: {r['note']}"
                  for r in sized] + [""]
    for op, pas in SECTIONS:
        rows = [r for r in g["rows"] if r["op"] == op and r["pass"] == pas]
        if rows:
            parts += [f"## {TITLES[op]} {TITLES[pas]}", ""]
            if (op, pas) in plots:
                parts += [f"![{op} {pas}]({rel}/{os.path.basename(plots[op, pas])})", ""]
            parts += [_op_table(g, rows), ""]
    model = [r for r in g["rows"] if r["op"].startswith("model")]
    if model:
        parts += ["## DANet-R50 end to end (training step and inference)", ""]
        if "model" in plots:
            parts += [f"![model]({rel}/{os.path.basename(plots['model'])})", ""]
        parts += [_model_table(model), ""]
    if not plots:
        parts += ["_Plots not written: matplotlib is not installed._", ""]
    peak = ("`torch.cuda.max_memory_allocated` during one call minus what was allocated before it"
            if g["device"] == "cuda" else
            "the process resident high-water mark (VmHWM, reset before the call) minus the resident "
            "size before it; allocations ≥ 64 KiB are served by mmap so that freed memory leaves the process")
    parts += ["## Notes", "",
              f"- Time: median of the timed rounds after two warm-up calls (IQR = spread), "
              f"{'each followed by `torch.cuda.synchronize()`' if g['device'] == 'cuda' else 'wall clock'}; "
              "every backend and peer was timed in the same run.",
              f"- Peak memory: memory above the inputs, {peak}.",
              "- FLOPs, per image: PAM fwd 2·N²·(Cq+Cv), fwd+bwd 2·N²·(4·Cq+3·Cv); CAM fwd "
              "4·C²·N, fwd+bwd 12·C²·N (the reference's work). “% of matmul” divides the achieved rate by "
              "the dense matmul rate measured in the same run.",
              "- CAM bandwidth bound: the bytes CAM must stream at least (x read and y written forward; dy "
              "and x read and dx written backward) over the copy bandwidth measured in the same run "
              "(a tensor copy, read + write bytes); “% of BW bound” is that time over the measured time.",
              "- `sdpa`: `torch.nn.functional.scaled_dot_product_attention(scale=1.0)`; on CUDA pinned to "
              "the memory-efficient kernel, on CPU the math path, which materialises N×N for Cq ≠ Cv.",
              "- **OOM**: that backend ran out of memory for the case; the other backends still have numbers.",
              ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def write_csv(g, path):
    meta = meta_columns(g)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in g["rows"]:
            w.writerow(dict(r, **meta))


def plot(g, folder):
    """{(op, pass) | "model": png path}; {} when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return {}
    os.makedirs(folder, exist_ok=True)
    div, unit = _rate_unit(g)
    colors = {b: f"C{i}" for i, b in enumerate(BACKEND_ORDER)}
    styles = ["-", "--", ":", "-."]
    out = {}
    for op, pas in SECTIONS:
        rows = [r for r in g["rows"] if r["op"] == op and r["pass"] == pas]
        if not rows:
            continue
        panels = [("median time [ms]", lambda r: r["median_s"] * 1e3, "log"),
                  ("peak memory above inputs [MiB]", lambda r: r.get("peak_mem") and r["peak_mem"] / 2 ** 20, "log"),
                  (f"achieved {unit}", lambda r: r["gflops"] and r["gflops"] / div, "linear"),
                  ("fraction of matmul rate [%]", lambda r: r["frac_of_matmul"] and 100 * r["frac_of_matmul"], "linear")]
        if g["device"] == "cuda" and any(r["frac_of_bandwidth"] for r in rows):
            panels.append(("fraction of bandwidth bound [%]",
                           lambda r: r["frac_of_bandwidth"] and 100 * r["frac_of_bandwidth"], "linear"))
        ncols = math.ceil(len(panels) / 2)
        fig, axes = plt.subplots(2, ncols, figsize=(4.6 * ncols, 8), squeeze=False)
        axes = axes.flatten()
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        dtypes = sorted({r["dtype"] for r in rows})
        sizes = sorted({(r["N"], r["H"], r["W"]) for r in rows})
        for ax, (label, value, yscale) in zip(axes, panels):
            for b in sorted({r["backend"] for r in rows}, key=lambda b: _sort_key(dict(rows[0], backend=b))):
                for i, dt in enumerate(dtypes):
                    sel = [r for r in rows if r["backend"] == b and r["dtype"] == dt]
                    pts = [(r["N"], value(r)) for r in sel if _ok(r) and value(r)]
                    name = b if len(dtypes) == 1 else f"{b} ({dt})"
                    if pts:
                        ax.plot(*zip(*pts), marker="o", color=colors.get(b), ls=styles[i % 4], label=name)
                    for r in sel:
                        if not _ok(r):
                            ax.annotate(f"{b}: {r['status']}", (r["N"], 0.96), xycoords=ax.get_xaxis_transform(),
                                        color=colors.get(b), fontsize=7, rotation=90, ha="center", va="top")
            ax.set_xscale("log", base=2)
            ax.set_xticks([n for n, _, _ in sizes], [f"{h}×{w}" for _, h, w in sizes], rotation=30)
            ax.minorticks_off()
            ax.set_yscale(yscale)
            if yscale == "log":  # plain numbers (300, 2000), not 3×10²
                ax.yaxis.set_major_formatter(ticker.LogFormatter())
                ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.set_title(label, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        shape = ", ".join(sorted({f"B={r['B']}, C={r['C']}" + (f", Cq={r['Cq']}" if r["Cq"] else "") for r in rows}))
        fig.suptitle(f"{TITLES[op]} {TITLES[pas]} ({shape}) vs resolution", fontsize=12)
        fig.text(0.5, 0.005, header_line(g), ha="center", fontsize=8, color="0.35")
        fig.tight_layout(rect=(0, 0.025, 1, 0.97))
        out[op, pas] = os.path.join(folder, f"{op}-{pas}.png")
        fig.savefig(out[op, pas], dpi=110)
        plt.close(fig)
    model = [r for r in g["rows"] if r["op"].startswith("model")]
    if model:
        cases = sorted({(r["op"], r["H"], r["W"], r["B"]) for r in model}, key=lambda c: (c[0], c[1] * c[2]))
        backends = sorted({r["backend"] for r in model}, key=lambda b: _sort_key(dict(model[0], backend=b)))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        width = 0.8 / len(backends)
        for ax, (label, value) in zip(axes, [("images per second", lambda r: r["img_per_s"]),
                                             ("peak memory above model and inputs [GiB]",
                                              lambda r: r.get("peak_mem") and r["peak_mem"] / 2 ** 30)]):
            for j, b in enumerate(backends):
                for i, (op, H, W, B) in enumerate(cases):
                    r = next((r for r in model if (r["op"], r["H"], r["W"], r["B"], r["backend"]) == (op, H, W, B, b)), None)
                    x = i + (j - (len(backends) - 1) / 2) * width
                    if r is not None and _ok(r) and value(r):
                        ax.bar(x, value(r), width, color=colors.get(b), label=b if i == 0 else None)
                    elif r is not None:
                        ax.annotate(r["status"], (x, 0), ha="center", va="bottom", fontsize=7, rotation=90)
            ax.set_xticks(range(len(cases)), [f"{op.split('-')[1]} {H}×{W}\nB={B}" for op, H, W, B in cases])
            ax.set_title(label, fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"DANet-R50 training step and inference ({model[0]['dtype']})", fontsize=12)
        fig.text(0.5, 0.005, header_line(g), ha="center", fontsize=8, color="0.35")
        fig.tight_layout(rect=(0, 0.04, 1, 0.95))
        out["model"] = os.path.join(folder, "model.png")
        fig.savefig(out["model"], dpi=110)
        plt.close(fig)
    return out


def _md_path(p, md):
    """p as a link relative to the markdown file when it lies below the file's folder."""
    r = os.path.relpath(p, os.path.dirname(os.path.abspath(md)))
    return p if r.startswith("..") else r


def keep_raw(sources, folder):
    """Copy each summary JSON (and pytest-benchmark's JSON beside a bench-<kind>.json) into the
    report's dated folder, names kept (a clash gets -2, -3, ...); returns the copies' paths."""
    os.makedirs(folder, exist_ok=True)
    kept, used = [], set()
    for src in sources:
        m = re.fullmatch(r"bench-(\w+)\.json", os.path.basename(src))
        extra = os.path.join(os.path.dirname(src), f"pytest-benchmark-{m.group(1)}.json") if m else None
        for p in [src] + ([extra] if extra and os.path.exists(extra) else []):
            base, ext = os.path.splitext(os.path.basename(p))
            dst, n = os.path.join(folder, base + ext), 2
            while dst in used:  # the same name from another source of this report
                dst, n = os.path.join(folder, f"{base}-{n}{ext}"), n + 1
            used.add(dst)
            if not (os.path.exists(dst) and os.path.samefile(dst, p)):
                shutil.copyfile(p, dst)
            kept.append(dst)
    return kept


def write_report(paths, out_dir):
    """Write the md, csv and png files for every device in the JSON files, and copy the JSON files
    into each report's dated folder; returns the md paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for g in groups([load(p) for p in paths]).values():
        s = os.path.join(out_dir, stem(g))
        sources = keep_raw(g["sources"], s)
        plots = plot(g, s)
        write_csv(g, s + ".csv")
        write_markdown(g, s + ".md", plots, sources)
        written.append(s + ".md")
    return written


def run_suite(raw_dir, full, extra):
    """Run the benchmark suite (peers and ours in one run); returns (exit code, summary JSONs)."""
    os.makedirs(raw_dir, exist_ok=True)
    env = dict(os.environ, DANET_OPS_BENCH_OUT=os.path.abspath(raw_dir))  # where conftest writes
    if full:
        env["DANET_OPS_BENCH_FULL"] = "1"
    start = time.time()
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE), "--benchmark-only", "-q"] + extra
    print("[report] running:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env, cwd=os.path.dirname(HERE))
    fresh = [p for p in glob.glob(os.path.join(raw_dir, "bench-*.json")) if os.path.getmtime(p) >= start]
    return rc, fresh


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", nargs="+", metavar="PATH", help="summary JSON(s) written by the benchmark suite "
                    "(default: the newest bench-*.json in $DANET_OPS_BENCH_OUT or benchmarks/results/tmp)")
    ap.add_argument("--run", action="store_true", help="run `pytest benchmarks --benchmark-only` first")
    ap.add_argument("--full", action="store_true", help="with --run: the full sweep (DANET_OPS_BENCH_FULL=1)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default benchmarks/results)")
    ap.add_argument("pytest_args", nargs="*", help="with --run: extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    rc, raw = 0, raw_dir()
    if args.run:
        rc, paths = run_suite(raw, args.full, args.pytest_args)
    elif args.json:
        paths = args.json
    else:
        found = glob.glob(os.path.join(raw, "bench-*.json"))
        paths = [max(found, key=os.path.getmtime)] if found else []
    if not paths:
        ap.error("no benchmark summary JSON found: pass --json PATH or --run")
    written = write_report(paths, args.out)
    for md in written:
        print(f"[report] wrote {md} (+ .csv and plots)")
    if not written:
        print(f"[report] no PAM/CAM/model rows in {', '.join(paths)}: nothing written", file=sys.stderr)
    return rc or (0 if written else 1)


if __name__ == "__main__":
    sys.exit(main())
