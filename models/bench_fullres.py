"""Whole-image DANet-101 inference at full Cityscapes resolution: time and peak memory of the fused
attention modules against the released ones (danet_ops' "reference" backend: the released
PAM_Module / CAM_Module arithmetic, which forms the N x N matrices).

    python -m models.bench_fullres                       # 1024x2048, fp32 and bf16, fused and released
    python -m models.bench_fullres --size 512 1024 --json out.json

The model is the released DANet-101 Cityscapes architecture (``models.archs``
``danet101_cityscapes``) with random weights (seeded: the same in every run), one image, whole
image, B = 1, under ``torch.inference_mode`` (and ``torch.autocast("cpu", bfloat16)`` for bf16).
Each (attention, dtype) runs in its own process so that its peak resident memory is its own; the
process's address space is capped at ``--mem-limit-gib`` so that a configuration that does not
fit fails cleanly instead of pushing the machine into swap or the OOM killer. Reported: the best
of ``--repeat`` forward times after a small warm-up, the peak RSS of the process during the timed
forwards, the RSS before them (model and input), and the share of pixels where the fused and the
released argmax agree. On a shared machine the process's CPU time (user + sys, all threads) is the
steadier number; wall time also counts waiting for the cores.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from . import rss

ARCH = "danet101_cityscapes"


def child(args):
    """One configuration in this process; prints one JSON line."""
    from .archs import ARCHS

    if args.mem_limit_gib:
        cap = int(args.mem_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.manual_seed(0)
    backend = {"fused": "auto", "released": "reference"}[args.attention]
    model = ARCHS[ARCH].build(attention_backend=backend).eval()
    H, W = args.size
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    rec = {"attention": args.attention, "dtype": args.dtype, "size": [H, W], "N": (H // 8) * (W // 8),
           "threads": torch.get_num_threads()}
    try:
        with torch.inference_mode(), amp:
            model(x[..., : max(64, H // 8), : max(64, W // 8)])  # warm-up: kernels, allocator, oneDNN
            rec["rss_before_mib"] = rss.status("VmRSS") / 2**20
            exact_peak = rss.reset_peak()
            times, cpu = [], []
            for _ in range(args.repeat):
                t, c = time.perf_counter(), time.process_time()
                out = model(x)[0]
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        rec.update(ok=True, time_s=min(times), times_s=times, cpu_s=min(cpu), peak_rss_mib=rss.peak() / 2**20,
                   peak_is_since_warmup=exact_peak)
        if args.pred:
            torch.save(out.argmax(1).to(torch.uint8), args.pred)
    except (RuntimeError, MemoryError) as e:  # the address-space cap: does not fit
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    print(json.dumps(rec), flush=True)


def run_config(attention, dtype, size, repeat, mem_limit_gib, pred=None):
    cmd = [sys.executable, "-m", "models.bench_fullres", "--child", "--attention", attention, "--dtype", dtype,
           "--size", str(size[0]), str(size[1]), "--repeat", str(repeat), "--mem-limit-gib", str(mem_limit_gib)]
    if pred:
        cmd += ["--pred", pred]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"attention": attention, "dtype": dtype, "size": list(size), "ok": False,
                "error": f"exit status {r.returncode}: {r.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    p.add_argument("--attention", nargs="+", choices=("fused", "released"), default=["fused", "released"])
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--repeat", type=int, default=1, help="timed forwards per configuration (the best is reported)")
    p.add_argument("--mem-limit-gib", type=float, default=22.0,
                   help="address-space cap of each configuration's process (0: none)")
    p.add_argument("--json", help="write the records here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pred", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.attention, args.dtype = args.attention[0], args.dtype[0]
        return child(args)

    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{ARCH}, random weights, one {args.size[0]}x{args.size[1]} image, whole image, B = 1; "
          f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, load average {' '.join(load)}", flush=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype:
            preds = {}
            for attention in args.attention:
                preds[attention] = os.path.join(tmp, f"{attention}-{dtype}.pt")
                rec = run_config(attention, dtype, args.size, args.repeat, args.mem_limit_gib, preds[attention])
                records.append(rec)
                if rec["ok"]:
                    print(f"{dtype} {attention:8s}: {rec['time_s']:7.1f} s (CPU time {rec['cpu_s']:.1f} s), "
                          f"peak RSS {rec['peak_rss_mib']:8.0f} MiB "
                          f"({rec['peak_rss_mib'] - rec['rss_before_mib']:+.0f} MiB over the model and input)",
                          flush=True)
                else:
                    print(f"{dtype} {attention:8s}: failed ({rec['error']})", flush=True)
            done = [a for a in args.attention if os.path.exists(preds[a])]
            if len(done) == 2:
                a, b = (torch.load(preds[k]) for k in done)
                agree = float((a == b).float().mean())
                print(f"{dtype}: fused and released argmax agree on {100 * agree:.3f}% of the pixels", flush=True)
                for r in records[-2:]:
                    r["argmax_agreement"] = agree
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    print(f"load average after: {' '.join(load_after)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_before": load, "load_after": load_after, "records": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main()
