"""PAM and CAM forward and forward+backward: fused backends vs "reference" (the released bmm,
the same baseline the tests use as oracle) and SDPA with scale=1.0, timed side by side.

FLOPs per image: PAM fwd 2·N²·(Cq+Cv), fwd+bwd 2·N²·(4·Cq+3·Cv) per image; CAM
(the reference's work) fwd 4·C²·N, fwd+bwd 12·C²·N per image. CAM's `bytes` is what it must
stream at least (the bandwidth bound): x read and y written forward, plus dy and x read
and dx written backward, i.e. 2·C·N (fwd) or 5·C·N (fwd+bwd) elements per image. The copy
bandwidth it is compared with is measured here too (test_copy_bandwidth).

SDPA peer: on CUDA it is pinned to the memory-efficient kernel (the GPU target's peer; a row says
"unsupported" if that kernel refuses the shapes); on CPU it takes the math path, which
materialises N x N for Cq != Cv.

FlexAttention peer ("flex"): torch.compile'd flex_attention with scale=1.0; forward+backward on
GPU, forward only on CPU (full sweep: its compilation takes minutes on 2 cores). A row says
"unsupported" where it cannot run (no compilable backend, head sizes refused).

CPU rows: fp32 and bf16 (reference in bf16 vs ours in bf16, which uses the CPU's bf16 matrix
units where it has them; each row names the ISA), and "inputs" variants with the PAM logit std
set to 8, 24 and 64 (DANet's real PAM logits span hundreds per row; the default inputs have
logit std 0.64).

Sized by the machine: where the CPU has no bf16 units (torch.mm in bf16 under 1/4 of the fp32
rate, measured at the start: benchmarks/machine.py), the peers' bf16 rows (torch computes them
in emulated bf16) get fewer timed rounds or are skipped, so that no case takes over
DANET_OPS_BENCH_CASE_CAP_S (20 s), and the bf16 matmul-rate case shrinks to about 1.5 s a call;
the row says so. danet_ops' own bf16 rows run in full.

Each fused backend's result and gradients are checked once per op, device and dtype against the
float64 oracle with the tests' bounds (benchmarks/checks.py); a backend that fails is still
timed, its row says so, and the case fails.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from danet_ops import channel_attention, position_attention
from .checks import fused_backends, sanity
from .conftest import FULL, Unsupported, cpu_sizes, devices, gpu_sizes, measure, sync
from .report import PEERS   # torch's own computation, timed beside the fused backends
from .machine import matmul_size, plan_rounds

C, CQ = 512, 64
LOGIT_STDS = (8.0, 24.0, 64.0)


def _cases():
    """(device, dtype, B, H, W, logit std or None for the default inputs)."""
    for dev in devices():
        if dev == "cpu":
            for H, W in cpu_sizes():
                yield dev, torch.float32, 1, H, W, None
            for H, W in ([(64, 64), (96, 96), (128, 128)] if FULL else [(32, 32)]):
                yield dev, torch.bfloat16, 1, H, W, None
        else:
            for H, W in gpu_sizes():
                yield dev, torch.bfloat16, 2, H, W, None


def _std_cases():
    """PAM with sharp logits (CPU): 64x128 in the full sweep, 32x32 in the short one."""
    if "cpu" in devices():
        H, W = (64, 128) if FULL else (32, 32)
        for std in LOGIT_STDS:
            yield "cpu", torch.float32, 1, H, W, std


def _case_id(d, t, b, h, w, std):
    return f"{d}-{str(t).split('.')[-1]}-B{b}-{h}x{w}" + (f"-std{std:g}" if std else "")


CASES = list(_cases())


def _backends_for(op, case):
    dev, dtype, std = case[0], case[1], case[5]
    names = ["reference"] + fused_backends(op, dev, dtype)
    if op != "pam" or std is not None:
        return names
    peers = ["sdpa"] if (dev != "cpu" or dtype == torch.float32 or FULL) else []
    if dev != "cpu" or FULL:
        peers.append("flex")  # CPU: full sweep only (compile time)
    return names + peers


def _sdpa_pam(q, k, v, x, gamma):
    # SDPA in [B, heads=1, N, C] layout (the transposing copies are part of its cost);
    # scale=1.0 as DANet has no 1/sqrt(d).
    t = lambda a: a.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # noqa: E731
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            o = F.scaled_dot_product_attention(t(q), t(k), t(v), scale=1.0)
    else:
        o = F.scaled_dot_product_attention(t(q), t(k), t(v), scale=1.0)
    return gamma * o.squeeze(1).transpose(1, 2).reshape(v.shape) + x


_FLEX = {}


def _flex_pam(q, k, v, x, gamma):
    # FlexAttention, torch.compile'd (its only fast form), scale=1.0, [B, heads=1, N, C] layout.
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        raise Unsupported(f"flex_attention not in this torch: {exc}") from exc
    fn = _FLEX.get("fn")
    if fn is None:
        fn = _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    t = lambda a: a.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # noqa: E731
    try:
        o = fn(t(q), t(k), t(v), scale=1.0)
    except Exception as exc:  # noqa: BLE001 - a compile or kernel refusal: an "unsupported" row
        if torch.is_grad_enabled() and q.device.type == "cpu":
            raise Unsupported(f"flex_attention backward on CPU: {type(exc).__name__}") from exc
        raise Unsupported(f"flex_attention: {type(exc).__name__}: {str(exc)[:150]}") from exc
    return gamma * o.squeeze(1).transpose(1, 2).reshape(v.shape) + x


def _pam_fn(backend):
    if backend == "sdpa":
        return _sdpa_pam
    if backend == "flex":
        return _flex_pam
    return lambda q, k, v, x, g: position_attention(q, k, v, x, g, backend=backend)


def _inputs(shapes, dev, dtype, scales):
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [(torch.randn(s, generator=gen) * sc).to(device=dev, dtype=dtype).requires_grad_()
            for s, sc in zip(shapes, scales)]


def _bench(benchmark, record, fn, inputs, dev, info):
    out_holder = {}

    def fwd():
        out_holder.clear()  # the previous output is not part of this call's peak memory
        with torch.no_grad():
            out_holder["y"] = fn(*inputs)
        sync(dev)

    def fwdbwd():
        for t in inputs:
            t.grad = None
        y = fn(*inputs)
        y.backward(torch.ones_like(y))
        sync(dev)

    run = fwd if info["pass"] == "fwd" else fwdbwd
    rounds = 3 if info["N"] >= 96 * 96 and dev == "cpu" else 5
    rounds = int(os.environ.get("DANET_OPS_BENCH_ROUNDS", rounds))  # e.g. 1 on a busy machine
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    sized = wrong = None
    if info["backend"] in PEERS:  # torch's own computation: emulated where the CPU lacks the dtype
        rounds, sized = plan_rounds(info["flops"], inputs[0].dtype, dev, rounds)
        if rounds == 0:
            record(benchmark, status="skipped", note=sized, peak_mem=None, input_bytes=input_bytes, **info)
            pytest.skip(sized)
    else:
        try:
            sanity(info["op"], info["backend"], dev, inputs[0].dtype)
        except AssertionError as exc:  # timed all the same, and the case fails
            wrong = f"oracle check failed: {exc}"
    status, mem, note = measure(benchmark, run, dev, rounds)
    out_holder.clear()
    record(benchmark, status=status, note=wrong or note or sized, peak_mem=mem, input_bytes=input_bytes, **info)
    if wrong:
        pytest.fail(wrong)


def _params(op):
    cases = CASES + (list(_std_cases()) if op == "pam" else [])
    for case in cases:
        for backend in _backends_for(op, case):
            for pas in ("fwdbwd", "fwd"):
                if backend == "flex" and pas == "fwdbwd" and case[0] == "cpu":
                    continue  # FlexAttention: forward only on CPU
                if case[5] is not None and pas == "fwdbwd" and not FULL:
                    continue  # sharp-logit rows: forward only in the short run
                yield pytest.param(case, backend, pas, id=f"{_case_id(*case)}-{backend}-{pas}")


@pytest.mark.parametrize("case,backend,pas", list(_params("pam")))
def test_pam(benchmark, record, case, backend, pas):
    dev, dtype, B, H, W, std = case
    N = H * W
    variant = f"logit std {std:g}" if std else None
    benchmark.group = f"pam-{pas}-{dev}-{H}x{W}" + (f"-std{std:g}" if std else "")
    # q, k entries N(0, s^2) give logits E = q^T k with std sqrt(Cq) * s^2 (default s = 0.1).
    s = (std / CQ ** 0.5) ** 0.5 if std else 0.1
    inputs = _inputs([(B, CQ, H, W), (B, CQ, H, W), (B, C, H, W), (B, C, H, W), (1,)], dev, dtype,
                     [s, s, 1.0, 1.0, 0.0])
    with torch.no_grad():
        inputs[4].fill_(0.5)
    per_image = 2 * N * N * ((CQ + C) if pas == "fwd" else (4 * CQ + 3 * C))
    _bench(benchmark, record, _pam_fn(backend), inputs, dev,
           dict(op="pam", backend=backend, device=dev, dtype=str(dtype).split(".")[-1], B=B, C=C,
                Cq=CQ, H=H, W=W, N=N, flops=B * per_image, variant=variant, **{"pass": pas}))


@pytest.mark.parametrize("case,backend,pas", list(_params("cam")))
def test_cam(benchmark, record, case, backend, pas):
    dev, dtype, B, H, W, _ = case
    N = H * W
    benchmark.group = f"cam-{pas}-{dev}-{H}x{W}"
    inputs = _inputs([(B, C, H, W), (1,)], dev, dtype, [0.05, 0.0])
    with torch.no_grad():
        inputs[1].fill_(0.5)
    fn = lambda x, g: channel_attention(x, g, mode="original", backend=backend)  # noqa: E731
    per_image = (4 if pas == "fwd" else 12) * C * C * N
    _bench(benchmark, record, fn, inputs, dev,
           dict(op="cam", backend=backend, device=dev, dtype=str(dtype).split(".")[-1], B=B, C=C,
                Cq=0, H=H, W=W, N=N, flops=B * per_image,
                bytes=B * (2 if pas == "fwd" else 5) * C * N * inputs[0].element_size(), **{"pass": pas}))


def _matmul_cases():
    for dev in devices():
        yield from ([(dev, torch.float32), (dev, torch.bfloat16)] if dev == "cpu" else [(dev, torch.bfloat16)])


@pytest.mark.parametrize("dev,dtype", list(_matmul_cases()),
                         ids=lambda v: str(v).split(".")[-1])
def test_matmul_rate(benchmark, record, dev, dtype):
    """The machine's dense matmul rate in this run: 4096^2 on CPU (fp32, and bf16 for the bf16
    rows: oneDNN uses the bf16 matrix units where the CPU has them; where it has none, bf16 is
    emulated and the product shrinks to about 1.5 s a call), bf16 8192^2 on GPU."""
    n = matmul_size(dtype, dev) if dev == "cpu" else 8192
    note = None if n == 4096 or dev != "cpu" else f"{n}^2: {str(dtype)[6:]} is emulated on this CPU"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def run():
        torch.mm(a, b)
        sync(dev)

    benchmark.group = f"matmul-{dev}-{str(dtype).split('.')[-1]}"
    run()
    rounds = int(os.environ.get("DANET_OPS_BENCH_ROUNDS", 5))
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    record(benchmark, op="matmul", backend="torch.mm", device=dev, dtype=str(dtype).split(".")[-1],
           B=1, C=n, Cq=0, H=n, W=n, N=n, flops=2 * n ** 3, peak_mem=None, note=note, **{"pass": "fwd"})


@pytest.mark.parametrize("dev", devices())
def test_copy_bandwidth(benchmark, record, dev):
    """The machine's memory bandwidth in this run: a 1 GiB (GPU) or 256 MiB (CPU) tensor copy,
    counting the bytes read plus the bytes written."""
    n = (1 << 28) if dev == "cuda" else (1 << 26)
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        sync(dev)

    benchmark.group = f"copy-{dev}"
    run()
    benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
    record(benchmark, op="copy", backend="copy_", device=dev, dtype="float32", B=1, C=0, Cq=0,
           H=n, W=1, N=n, flops=0, bytes=2 * 4 * n, peak_mem=None, **{"pass": "fwd"})
