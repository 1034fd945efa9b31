"""The GPU proof's child programs (benchmarks.gpu_check runs each in its own process, under its
stage's time cap):

    python -m benchmarks.gpu_cases library                 # stage so: the compiled CUDA kernels load
    python -m benchmarks.gpu_cases smoke --device cuda --notes FILE [--dtypes bfloat16,float32]
    python -m benchmarks.gpu_cases sanitize --backend cuda --device cuda   # stage d's case

smoke (stage a): versions, the GPU, every backend's availability, then PAM and CAM forward and
backward of every fused backend that can run, at three shapes, against the float64 oracle with
the tests' own bound (danet_ops.testing through benchmarks/checks.py); a markdown table goes to
--notes. Exit 1 when a comparison fails or a backend raises.
"""
import argparse
import platform
import sys
import time

import torch

PAM_SHAPES = {  # (B, Cq, Cv, H, W): DANet's channels; odd sizes (ragged tiles); Cq = 256
    "cuda": [(2, 64, 512, 32, 32), (1, 8, 24, 37, 29), (1, 256, 64, 16, 16)],
    "cpu": [(1, 8, 24, 5, 7), (1, 20, 40, 3, 3), (2, 1, 1, 17, 1)],   # dry run: the interpreter
}
CAM_SHAPES = {  # (B, C, H, W)
    "cuda": [(2, 512, 32, 32), (1, 37, 29, 31), (1, 130, 9, 7)],
    "cpu": [(1, 20, 7, 7), (1, 33, 5, 4), (2, 1, 3, 3)],
}


def library():
    """Whether danet_ops._C loads here with CUDA kernels for both ops (run with DANET_OPS_JIT=0,
    so that a missing library is reported, not built)."""
    import danet_ops

    ok = True
    for op in ("pam", "cam"):
        avail, detail = danet_ops.available_backends("cuda", torch.bfloat16, op)["cuda"]
        print(f"[so] {op} CUDA kernels: {'yes' if avail else 'no'} ({detail})")
        ok = ok and avail
    return 0 if ok else 1


def _versions(dev):
    import danet_ops

    try:
        import triton
        tv = triton.__version__
    except Exception as exc:  # noqa: BLE001 - reported, the Triton rows then say unavailable
        tv = f"missing ({exc})"
    print(f"python {platform.python_version()} torch {torch.__version__} (CUDA {torch.version.cuda}) "
          f"triton {tv}")
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.0f} GiB")
    for op in ("pam", "cam"):
        for dt in (torch.float32, torch.bfloat16):
            for name, (ok, why) in danet_ops.available_backends(dev, dt, op).items():
                print(f"  {op} {str(dt)[6:]:8} {name:9} {'available' if ok else 'no'}{': ' + why if why else ''}")


def smoke(device, dtypes, notes):
    from .checks import cam_inputs, compare, fused_backends, pam_inputs

    dev = torch.device(device)
    _versions(dev)
    lines = [f"\n### a. smoke ({dev.type}): err / bound against the float64 oracle\n",
             "Bound: danet_ops.testing, as in the tests (2x the reference's own error in that dtype "
             "plus the analysis terms, or the floor `testing.FLOOR`); a ratio over 1 fails.\n",
             "| op | shape | dtype | backend | y | worst gradient | s | result |",
             "|---|---|---|---|---|---|---|---|"]
    bad = 0
    for op, shapes in (("pam", PAM_SHAPES[dev.type]), ("cam", CAM_SHAPES[dev.type])):
        for shape in shapes:
            for dtype in dtypes:
                for backend in fused_backends(op, dev, dtype):
                    make = pam_inputs if op == "pam" else cam_inputs
                    inputs = make(*shape, dtype=dtype, device=dev)
                    head = f"| {op} | {'x'.join(map(str, shape))} | {str(dtype)[6:]} | {backend} |"
                    t0 = time.perf_counter()
                    try:
                        seen = compare(op, backend, inputs)
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        ratios = {c.name: c.err / c.bound for c in seen}
                        grads = max(v for k, v in ratios.items() if k != "y")
                        lines.append(f"{head} {ratios['y']:.2f} | {grads:.2f} | "
                                     f"{time.perf_counter() - t0:.1f} | pass |")
                    except AssertionError as exc:
                        bad += 1
                        lines.append(f"{head} | | {time.perf_counter() - t0:.1f} | **FAIL** {str(exc)[:200]} |")
                    except Exception as exc:  # noqa: BLE001 - recorded, the stage fails
                        bad += 1
                        lines.append(f"{head} | | {time.perf_counter() - t0:.1f} | **ERROR** "
                                     f"{type(exc).__name__}: {str(exc)[:150]} |")
                    print(lines[-1], flush=True)
    with open(notes, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"smoke: {bad} failure(s)")
    return 1 if bad else 0


def sanitize(backend, device):
    """One tiny forward+backward through each kernel of a backend (PAM: fp32 and bf16 paths,
    Cq > 64 and a Cv split; CAM: both modes), for compute-sanitizer."""
    from danet_ops import channel_attention, position_attention

    dev = torch.device(device)
    torch.manual_seed(0)
    dtypes = (torch.float32,) if dev.type == "cpu" else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        for B, Cq, Cv, H, W in [(1, 8, 24, 5, 7), (1, 72, 136, 9, 8)]:
            q, k = ((0.3 * torch.randn(B, Cq, H, W, device=dev)).to(dtype).requires_grad_() for _ in range(2))
            v, x = (torch.randn(B, Cv, H, W, device=dev).to(dtype).requires_grad_() for _ in range(2))
            g = torch.tensor([0.5], device=dev, requires_grad=True)
            y = position_attention(q, k, v, x, g, backend=backend)
            y.backward(torch.randn_like(y))
        for B, C, H, W in [(1, 37, 9, 8), (1, 72, 5, 7)]:
            for mode in ("original", "paper"):
                x = (0.2 * torch.randn(B, C, H, W, device=dev)).to(dtype).requires_grad_()
                g = torch.tensor([0.5], device=dev, requires_grad=True)
                y = channel_attention(x, g, mode=mode, backend=backend)
                y.backward(torch.randn_like(y))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize case: PAM and CAM forward+backward ran with backend {backend!r} on {device}")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_cases", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("library")
    s = sub.add_parser("smoke")
    s.add_argument("--device", default="cuda")
    s.add_argument("--dtypes", default="bfloat16", help="comma list (default bfloat16)")
    s.add_argument("--notes", required=True, help="markdown file the table is appended to")
    z = sub.add_parser("sanitize")
    z.add_argument("--backend", default="cuda")
    z.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.what == "library":
        return library()
    if args.what == "smoke":
        return smoke(args.device, [getattr(torch, d) for d in args.dtypes.split(",")], args.notes)
    return sanitize(args.backend, args.device)


if __name__ == "__main__":
    sys.exit(main())
