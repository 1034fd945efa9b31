"""The general op beside DANet's PAM: keys/values with their own positions.

- SAGAN-like: keys and values max-pooled 2x2 (SAGAN's official code, Non-local sub-sampling):
  Nk = Nq / 4, scale 1.
- ANN-like: a pyramid of pooled keys and values (bins 1, 3, 6, 8): Nk = 110, scale Cq^-0.5.

Same C = 512, Cq = 64 as DANet's rows, fused backends vs "reference" (the naive bmm with the
same scale) and SDPA (its CPU math path; memory-efficient kernel on CUDA), timed side by side.
FLOPs: fwd 2·Nq·Nk·(Cq+Cv), fwd+bwd 2·Nq·Nk·(4·Cq+3·Cv) per image.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from danet_ops import position_attention
from .checks import fused_backends
from .conftest import FULL, devices
from .test_bench_attention import C, CQ, _bench

KINDS = {"SAGAN-like Nk=N/4": 1.0, "ANN-like Nk=110": CQ ** -0.5}


def _sizes(dev):
    if dev == "cpu":
        return [(64, 64), (96, 96)] if FULL else [(64, 64)]
    return [(128, 256)]


def _keys(t, kind):
    if kind.startswith("SAGAN"):
        return F.max_pool2d(t, 2)
    return torch.cat([F.adaptive_avg_pool2d(t, s).flatten(2) for s in (1, 3, 6, 8)], dim=2)


def _params():
    for dev in devices():
        dtype = torch.float32 if dev == "cpu" else torch.bfloat16
        for H, W in _sizes(dev):
            for kind in KINDS:
                backends = ["reference", "sdpa"] + fused_backends("pam", dev, dtype)
                for backend in backends:
                    for pas in ("fwdbwd", "fwd"):
                        yield pytest.param(dev, dtype, H, W, kind, backend, pas,
                                           id=f"{dev}-{H}x{W}-{kind.split()[0]}-{backend}-{pas}")


def _sdpa(q, k, v, x, gamma, scale):
    t = lambda a: a.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # noqa: E731
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            o = F.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale)
    else:
        o = F.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale)
    return gamma * o.squeeze(1).transpose(1, 2).reshape(x.shape) + x


@pytest.mark.parametrize("dev,dtype,H,W,kind,backend,pas", list(_params()))
def test_general(benchmark, record, dev, dtype, H, W, kind, backend, pas):
    B = 1 if dev == "cpu" else 2
    scale = KINDS[kind]
    gen = torch.Generator().manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=gen) * sc).to(dev, dtype)  # noqa: E731
    feats_k, feats_v = mk(B, CQ, H, W, sc=0.1), mk(B, C, H, W)
    k, v = _keys(feats_k, kind), _keys(feats_v, kind)            # pooled once, outside the timing
    inputs = [mk(B, CQ, H, W, sc=0.1), k.contiguous(), v.contiguous(), mk(B, C, H, W),
              torch.full((1,), 0.5, device=dev, dtype=torch.float32)]
    inputs = [t.requires_grad_() for t in inputs]
    Nq, Nk = H * W, k.flatten(2).shape[2]
    if backend == "sdpa":
        fn = lambda q, k, v, x, g: _sdpa(q, k, v, x, g, scale)                          # noqa: E731
    else:
        fn = lambda q, k, v, x, g: position_attention(q, k, v, x, g, scale=scale, backend=backend)  # noqa: E731
    benchmark.group = f"general-{pas}-{dev}-{H}x{W}-{kind.split()[0]}"
    per_image = 2 * Nq * Nk * ((CQ + C) if pas == "fwd" else (4 * CQ + 3 * C))
    _bench(benchmark, record, fn, inputs, dev,
           dict(op="pam", backend=backend, device=dev, dtype=str(dtype).split(".")[-1], B=B, C=C,
                Cq=CQ, H=H, W=W, N=Nq, Nk=Nk, flops=B * per_image, variant=kind, **{"pass": pas}))
