"""Export a trained DANet checkpoint for deployment and check it against eager PyTorch.

    python -m models.export --checkpoint runs/demo/best.pth --format onnx
    python -m models.export --checkpoint runs/demo/best.pth --format onnx --onnx-attention standard
    python -m models.export --checkpoint runs/demo/best.pth --format aoti --output danet.pt2
    python -m models.export --measure-pam 64x128 96x128 128x128     # docs/deploy.md's table

``onnx``: ``torch.onnx.export`` (dynamo by default, ``--legacy`` for the TorchScript exporter).
PAM becomes ONNX Runtime's contrib ``com.microsoft.MultiHeadAttention`` (``--onnx-attention
ort``, the default: O(N) memory in ONNX Runtime) or standard MatMul/Softmax/MatMul (``standard``:
any runtime, N x N memory); CAM is standard ops (danet_ops/onnx.py). The result runs in ONNX
Runtime (CPU), in a child process that also reports its peak memory. ``aoti``: ``torch.export`` +
AOTInductor (``aoti_compile_and_package``); the package keeps calling the fused ``danet_ops``
ops, so whoever loads it must ``import danet_ops`` first (or load its ``_C`` library;
docs/deploy.md).

Both exports take a dynamic input height and width (``--static`` fixes them). The check runs the
exported model and the eager model on a validation image of the checkpoint's dataset (and on the
same image at 3/4 size, to exercise the dynamic shape) and prints the largest difference of the
logits. It exits with status 1 when the relative difference exceeds ``--tol``.

``--measure-pam HxW ...`` needs no checkpoint: it exports ``PositionAttention(512)`` with each
lowering and prints time and peak memory in ONNX Runtime beside the fused eager op, each
measured in its own process (``--threads``, ``--runs``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import danet_ops.onnx as danet_onnx

OUTPUT_NAMES = ["logits", "pam_logits", "cam_logits"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20

LOWERING_HELP = {
    "ort": "com.microsoft.MultiHeadAttention (ONNX Runtime's contrib op): O(N) memory in ONNX Runtime",
    "standard": "MatMul/Softmax/MatMul (standard ONNX, any runtime): the N x N matrix in memory",
}


def validation_image(cfg, split="val", index=0):
    """A normalised [1, 3, H, W] image of the checkpoint's dataset (``cfg`` of models.train)."""
    from .data import build_dataset, normalize

    dataset = build_dataset(cfg, split)
    img = dataset[index][0]
    return normalize(img)[None] if img.dtype == torch.uint8 else img[None].float()


def _dynamic_shapes(static):
    if static:
        return None
    dim = torch.export.Dim.DYNAMIC
    return ({2: dim, 3: dim},)


def export_onnx(model, example, path, legacy=False, static=False, opset=None, attention=None,
                output_names=OUTPUT_NAMES):
    """Write ``model`` as ONNX to ``path`` with the PAM lowering ``attention`` ("ort" | "standard")."""
    kw = {} if opset is None else {"opset_version": opset}
    with danet_onnx.attention_lowering(attention or danet_onnx.DEFAULT_LOWERING):
        if legacy:
            dyn = None if static else {"x": {2: "height", 3: "width"}}
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"],
                              output_names=output_names, dynamic_axes=dyn, **kw)
        else:
            torch.onnx.export(model, (example,), path, dynamo=True, input_names=["x"],
                              output_names=output_names, dynamic_shapes=_dynamic_shapes(static),
                              verbose=False, **kw)
    import onnx

    onnx.checker.check_model(path, full_check=True)
    return path


# ----------------------------------------------------------------------------- ONNX Runtime, measured
# Runs in a child process, so that its peak memory is the session's alone: the high-water mark of
# the resident set is reset (Linux: /proc/self/clear_refs) after the session and the inputs exist,
# and the high-water mark after the runs (VmHWM) minus the resident set at that moment is the peak
# above them (models/rss.py). Where it cannot be reset, only growth above the earlier high-water
# mark is seen ("exact": false).
_ORT_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["root"])
from models import rss

opts = ort.SessionOptions()
if spec["threads"]:
    opts.intra_op_num_threads = spec["threads"]
sess = ort.InferenceSession(spec["model"], opts, providers=["CPUExecutionProvider"])
names = [i.name for i in sess.get_inputs()]
data = np.load(spec["inputs"])
saved, report = {}, []
for i in range(spec["n"]):
    feeds = {name: data[f"{i}_{j}"] for j, name in enumerate(names)}
    exact = rss.reset_peak()
    base = rss.status("VmRSS") if exact else rss.peak()
    times = []
    for _ in range(spec["runs"]):
        t = time.perf_counter()
        out = sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    report.append({"peak": max(rss.peak() - base, 0), "exact": exact, "times": times})
    if spec["outputs"]:
        saved.update({f"{i}_{j}": o for j, o in enumerate(out)})
if spec["outputs"]:
    np.savez(spec["outputs"], **saved)
print("ORT_REPORT " + json.dumps({"report": report, "version": ort.__version__}))
"""


def run_onnxruntime(path, inputs, threads=None, runs=1, keep_outputs=True):
    """Run the ONNX model at ``path`` in ONNX Runtime (CPU) in a child process.

    ``inputs``: a list of input tuples (tensors or arrays). Returns (outputs, report): outputs[i]
    is the tuple of numpy outputs for inputs[i] (None unless ``keep_outputs``); report[i] has
    "peak" (bytes of resident memory above the session and inputs, over the runs), "exact"
    (False where the high-water mark could not be reset) and "times" (seconds per run).
    """
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {f"{i}_{j}": (t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t))
                  for i, xs in enumerate(inputs) for j, t in enumerate(xs)}
        np.savez(os.path.join(tmp, "inputs.npz"), **arrays)
        out_path = os.path.join(tmp, "outputs.npz") if keep_outputs else ""
        spec = {"root": ROOT, "model": os.path.abspath(path), "inputs": os.path.join(tmp, "inputs.npz"),
                "outputs": out_path, "n": len(inputs), "threads": threads, "runs": runs}
        proc = subprocess.run([sys.executable, "-c", _ORT_CHILD, json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ONNX Runtime failed on {path}:\n{proc.stderr[-4000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ORT_REPORT ")][-1]
        report = json.loads(line[len("ORT_REPORT "):])["report"]
        outputs = [None] * len(inputs)
        if keep_outputs:
            with np.load(out_path) as data:
                outputs = [tuple(data[f"{i}_{j}"] for j in range(len(data.files) // len(inputs)))
                           for i in range(len(inputs))]
    return outputs, report


def export_aoti(model, example, path, static=False):
    """AOTInductor package of ``model`` at ``path``; returns the loaded package (callable)."""
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(static))
    path = torch._inductor.aoti_compile_and_package(program, package_path=path)
    return torch._inductor.aoti_load_package(path)


def compare(out, model, x):
    """(max |diff|, max |diff| / max |eager|, fraction of pixels with the same argmax) of the fused logits."""
    with torch.inference_mode():
        ref = model(x)[0].float()
    out = torch.as_tensor(out).float()
    diff = (out - ref).abs().max().item()
    rel = diff / max(ref.abs().max().item(), 1e-30)
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    return diff, rel, agree


# ----------------------------------------------------------------------------- docs/deploy.md's table
_EAGER_CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["root"])
import torch, danet_ops
from models import rss

torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
dt = getattr(torch, spec["dtype"])
m = danet_ops.PositionAttention(spec["channels"], backend="cpu").eval()
with torch.no_grad():
    m.gamma.fill_(0.5)
m = m.to(dt)
x = torch.randn(1, spec["channels"], spec["h"], spec["w"], dtype=dt)
with torch.inference_mode():
    m(torch.randn(1, spec["channels"], 8, 8, dtype=dt))  # first call: the library's one-time setup
if not rss.reset_peak():
    sys.exit("the resident high-water mark cannot be reset here (/proc/self/clear_refs)")
base = rss.status("VmRSS")
times = []
with torch.inference_mode():
    for _ in range(spec["runs"]):
        t = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t)
print("EAGER_REPORT " + json.dumps({"peak": rss.peak() - base, "times": times}))
"""


def measure_pam(sizes, channels=512, threads=2, runs=2, rounds=3, dtype="float32", out=print):
    """Time and peak memory of ``PositionAttention(channels)`` (B = 1) in ONNX Runtime with each
    lowering, beside the fused eager op (inference form). Each case runs ``runs`` times in a
    process of its own; the cases take turns, ``rounds`` times, so that a changing load on the
    machine falls on all of them. Time: the median of all runs; memory: the largest peak."""
    import onnxruntime as ort

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    model = _pam_module(channels).to(dt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for lowering in danet_onnx.LOWERINGS:
            paths[lowering] = export_onnx(model, torch.randn(1, channels, 16, 16, dtype=dt),
                                          os.path.join(tmp, f"pam_{lowering}.onnx"),
                                          attention=lowering, output_names=["y"])
        out(f"PositionAttention({channels}), B = 1, {dtype}; onnxruntime {ort.__version__}, "
            f"torch {torch.__version__}; {threads} threads; {rounds} rounds of {runs} runs per case, "
            f"taking turns; median time, largest peak resident memory above the inputs")
        out("| H x W | N x N fp32 | ORT `ort` (MultiHeadAttention) | ORT `standard` (MatMul/Softmax/MatMul) "
            "| eager fused (`cpu`, inference) | load average (1 min) before / after |")
        out("| --- | --- | --- | --- | --- | --- |")
        for h, w in sizes:
            x = torch.randn(1, channels, h, w, dtype=dt)
            load0 = _load()
            reports = {case: [] for case in (*danet_onnx.LOWERINGS, "eager")}
            for _ in range(rounds):
                for lowering in danet_onnx.LOWERINGS:
                    _, rep = run_onnxruntime(paths[lowering], [(x,)], threads=threads, runs=runs,
                                             keep_outputs=False)
                    reports[lowering].append(rep[0])
                reports["eager"].append(_eager_pam(channels, h, w, threads, runs, dtype))
            cells = {case: {"time": statistics.median(t for r in reps for t in r["times"]),
                            "peak": max(r["peak"] for r in reps)} for case, reps in reports.items()}
            n = h * w
            rows.append({"size": (h, w), "cells": cells})
            out(f"| {h}x{w} | {4 * n * n / MIB:.0f} MiB | "
                + " | ".join(f"{1e3 * c['time']:.0f} ms, {c['peak'] / MIB:.0f} MiB" for c in cells.values())
                + f" | {load0:.1f} / {_load():.1f} |")
    return rows


def _pam_module(channels):
    import danet_ops

    m = danet_ops.PositionAttention(channels).eval()
    with torch.no_grad():
        m.gamma.fill_(0.5)
    return m


def _eager_pam(channels, h, w, threads, runs, dtype):
    spec = {"root": ROOT, "channels": channels, "h": h, "w": w, "threads": threads, "runs": runs,
            "dtype": dtype}
    proc = subprocess.run([sys.executable, "-c", _EAGER_CHILD, json.dumps(spec)], capture_output=True,
                          text=True, check=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("EAGER_REPORT ")][-1]
    return json.loads(line[len("EAGER_REPORT "):])


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _size(text):
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a checkpoint written by models.train")
    p.add_argument("--format", choices=("onnx", "aoti"))
    p.add_argument("--output", help="default: the checkpoint's path with .onnx / .pt2")
    p.add_argument("--onnx-attention", choices=danet_onnx.LOWERINGS, default=danet_onnx.DEFAULT_LOWERING,
                   help="onnx: how PAM is written: " + "; ".join(f"{k}: {v}" for k, v in LOWERING_HELP.items())
                   + f" (default {danet_onnx.DEFAULT_LOWERING})")
    p.add_argument("--legacy", action="store_true", help="onnx: the TorchScript exporter (dynamo=False)")
    p.add_argument("--opset", type=int, help="onnx: opset version (default: the exporter's)")
    p.add_argument("--static", action="store_true", help="fix the input size to the validation image's")
    p.add_argument("--split", default="val", help="split of the checkpoint's dataset to take the image from")
    p.add_argument("--index", type=int, default=0, help="which image of that split")
    p.add_argument("--dataset", help="default: the checkpoint's training dataset")
    p.add_argument("--data-root", help="default: the checkpoint's")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest accepted max|diff| / max|eager logit| (default 1e-4: fp32 rounding only)")
    p.add_argument("--measure-pam", nargs="+", metavar="HxW",
                   help="no checkpoint: time and peak memory of PositionAttention(512) in ONNX Runtime, "
                        "each lowering, beside the fused eager op")
    p.add_argument("--threads", type=int, default=2, help="--measure-pam: threads (ORT and torch)")
    p.add_argument("--runs", type=int, default=2, help="--measure-pam: runs per case and round")
    p.add_argument("--rounds", type=int, default=3, help="--measure-pam: rounds (the cases take turns)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="--measure-pam: dtype")
    args = p.parse_args(argv)

    if args.measure_pam:
        measure_pam([_size(s) for s in args.measure_pam], threads=args.threads, runs=args.runs,
                    rounds=args.rounds, dtype=args.dtype)
        return 0
    if not args.checkpoint or not args.format:
        p.error("--checkpoint and --format are required (or --measure-pam)")

    from .checkpoints import build_model_from_checkpoint

    model, cfg = build_model_from_checkpoint(args.checkpoint)
    model = model.float().eval()
    cfg = {**cfg, **{k: v for k, v in (("dataset", args.dataset), ("data_root", args.data_root)) if v}}
    x = validation_image(cfg, args.split, args.index)
    H, W = x.shape[-2:]
    sizes = [(H, W)] if args.static else [(H, W), (max(8, H * 3 // 4), max(8, W * 3 // 4))]
    xs = [x if (h, w) == (H, W) else F.interpolate(x, (h, w), mode="bilinear", align_corners=False)
          for h, w in sizes]
    out = args.output or os.path.splitext(args.checkpoint)[0] + (".onnx" if args.format == "onnx" else ".pt2")

    t0 = time.perf_counter()
    if args.format == "onnx":
        export_onnx(model, x, out, legacy=args.legacy, static=args.static, opset=args.opset,
                    attention=args.onnx_attention)
        how = f"onnx{' (legacy exporter)' if args.legacy else ''}"
    else:
        exported = export_aoti(model, x, out, static=args.static)
        how = "aoti"
    print(f"exported {args.checkpoint} as {how} to {out} in {time.perf_counter() - t0:.1f} s "
          f"({'static' if args.static else 'dynamic'} input size)")
    if args.format == "onnx":
        print(f"PAM lowering: {args.onnx_attention} = {LOWERING_HELP[args.onnx_attention]}; "
              f"CAM: MatMul/Softmax/MatMul")
        outputs, report = run_onnxruntime(out, [(xi,) for xi in xs])
        outputs = [o[0] for o in outputs]
        peak = max(r["peak"] for r in report)
        exact = "" if all(r["exact"] for r in report) else " (lower bound: the high-water mark could not be reset)"
        print(f"ONNX Runtime (CPU) check: peak memory above the session and its input {peak / MIB:.1f} MiB"
              f"{exact}, largest of the sizes below")
    else:
        outputs = [exported(xi)[0] for xi in xs]
        print("AOTInductor package: the fused danet_ops ops (O(N) attention memory)")

    worst = 0.0
    for (h, w), xi, o in zip(sizes, xs, outputs):
        diff, rel, agree = compare(o, model, xi)
        worst = max(worst, rel)
        print(f"{args.split} image {args.index} at {h}x{w}: max |exported - eager| = {diff:.3e} "
              f"(relative {rel:.3e}); same argmax on {100 * agree:.2f}% of pixels")
    ok = worst <= args.tol
    print(f"{'OK' if ok else 'FAIL'}: largest relative difference {worst:.3e} (tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
