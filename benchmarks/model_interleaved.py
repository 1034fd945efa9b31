"""DANet-R50 inference, released attention vs fused, calls interleaved (CPU).

    python -m benchmarks.model_interleaved [--rounds 4] [--size 512 1024]

The suite's test_bench_model times each backend in its own block of calls; on a shared or
throttling CPU that drifts between blocks. Here the two models (same weights) alternate, best of
--rounds each, fp32 and under torch.autocast("cpu", bfloat16), and the PAM + CAM ops of the head
(N = H/8 * W/8, C = 512, Cq = 64) are timed alone in the same run: their share bounds what a
faster attention can give the whole model.
"""
import argparse
import time

import torch

import danet_ops
from models.danet import DANet


def _best(fn, rounds):
    fn()  # warm-up
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    args = ap.parse_args(argv)
    H, W = args.size
    torch.manual_seed(0)
    x = torch.randn(1, 3, H, W)
    models = {b: DANet(19, "resnet50", attention_backend=b).eval() for b in ("reference", "cpu")}
    models["cpu"].load_state_dict(models["reference"].state_dict())
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, image {H}x{W}")
    for dt in (torch.float32, torch.bfloat16):
        amp = torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32)

        def infer(b):
            with torch.no_grad(), amp:
                models[b](x)

        for b in models:
            infer(b)  # warm-up
        times = {b: [] for b in models}
        for _ in range(args.rounds):  # interleaved: reference, cpu, reference, cpu, ...
            for b in models:
                t = time.perf_counter()
                infer(b)
                times[b].append(time.perf_counter() - t)
        r, c = min(times["reference"]), min(times["cpu"])
        n = (H // 8) * (W // 8)
        q = torch.randn(1, 64, n).to(dt)
        v = torch.randn(1, 512, n).to(dt)
        g = torch.tensor([0.5])

        def attention(b):
            with torch.no_grad():
                danet_ops.position_attention(q, q, v, v, g, backend=b)
                danet_ops.channel_attention(v, g, backend=b)

        ar, ac = (_best(lambda b=b: attention(b), 3) for b in models)
        print(f"{str(dt).split('.')[-1]}: released {r:.2f} s, fused {c:.2f} s: {r / c:.3f}x | "
              f"PAM+CAM ops alone {ar:.3f} s vs {ac:.3f} s; free attention would give at most "
              f"{r / (r - ar):.2f}x")


if __name__ == "__main__":
    main()
