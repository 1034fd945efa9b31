"""PAM and CAM forward and forward+backward: fused backends vs "reference" (the released bmm,
the same baseline the tests use as oracle) and SDPA with scale=1.0, timed side by side.

FLOPs counted per SPEC §7: PAM fwd 2·N²·(Cq+Cv), fwd+bwd 2·N²·(4·Cq+3·Cv) per image; CAM
(the reference's work) fwd 4·C²·N, fwd+bwd 12·C²·N per image. CAM's `bytes` is what it must
stream at least (SPEC §7's bandwidth bound): x read and y written forward, plus dy and x read
and dx written backward, i.e. 2·C·N (fwd) or 5·C·N (fwd+bwd) elements per image. The copy
bandwidth it is compared with is measured here too (test_copy_bandwidth).

SDPA peer: on CUDA it is pinned to the memory-efficient kernel (SPEC §7's peer; a row says
"unsupported" if that kernel refuses the shapes); on CPU it takes the math path, which
materialises N x N for Cq != Cv.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from danet_ops import _backends, channel_attention, position_attention
from .conftest import cpu_sizes, devices, gpu_sizes, measure, sync

C, CQ = 512, 64


def _cases():
    for dev in devices():
        if dev == "cpu":
            for H, W in cpu_sizes():
                yield dev, torch.float32, 1, H, W
        else:
            for H, W in gpu_sizes():
                yield dev, torch.bfloat16, 2, H, W


CASES = list(_cases())
CASE_IDS = [f"{d}-{str(t).split('.')[-1]}-B{b}-{h}x{w}" for d, t, b, h, w in CASES]


def _backends_for(op, dev, dtype):
    names = ["reference"] + [b for b in ("cpu", "cuda", "triton")
                             if _backends.check(b, op, torch.device(dev), dtype)[0]]
    return names + (["sdpa"] if op == "pam" else [])


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


def _pam_fn(backend):
    if backend == "sdpa":
        return _sdpa_pam
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
    status, mem, note = measure(benchmark, run, dev, rounds)
    out_holder.clear()
    record(benchmark, status=status, note=note, peak_mem=mem,
           input_bytes=sum(t.numel() * t.element_size() for t in inputs), **info)


def _params(op):
    for case, cid in zip(CASES, CASE_IDS):
        for backend in _backends_for(op, case[0], case[1]):
            for pas in ("fwdbwd", "fwd"):
                yield pytest.param(case, backend, pas, id=f"{cid}-{backend}-{pas}")


@pytest.mark.parametrize("case,backend,pas", list(_params("pam")))
def test_pam(benchmark, record, case, backend, pas):
    dev, dtype, B, H, W = case
    N = H * W
    benchmark.group = f"pam-{pas}-{dev}-{H}x{W}"
    inputs = _inputs([(B, CQ, H, W), (B, CQ, H, W), (B, C, H, W), (B, C, H, W), (1,)], dev, dtype,
                     [0.1, 0.1, 1.0, 1.0, 0.0])
    with torch.no_grad():
        inputs[4].fill_(0.5)
    per_image = 2 * N * N * ((CQ + C) if pas == "fwd" else (4 * CQ + 3 * C))
    _bench(benchmark, record, _pam_fn(backend), inputs, dev,
           dict(op="pam", backend=backend, device=dev, dtype=str(dtype).split(".")[-1], B=B, C=C,
                Cq=CQ, H=H, W=W, N=N, flops=B * per_image, **{"pass": pas}))


@pytest.mark.parametrize("case,backend,pas", list(_params("cam")))
def test_cam(benchmark, record, case, backend, pas):
    dev, dtype, B, H, W = case
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


@pytest.mark.parametrize("dev", devices())
def test_matmul_rate(benchmark, record, dev):
    """The machine's dense matmul rate in this run: sgemm 4096^2 on CPU, bf16 8192^2 on GPU."""
    n, dtype = (4096, torch.float32) if dev == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def run():
        torch.mm(a, b)
        sync(dev)

    benchmark.group = f"matmul-{dev}"
    run()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    record(benchmark, op="matmul", backend="torch.mm", device=dev, dtype=str(dtype).split(".")[-1],
           B=1, C=n, Cq=0, H=n, W=n, N=n, flops=2 * n ** 3, peak_mem=None, **{"pass": "fwd"})


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
