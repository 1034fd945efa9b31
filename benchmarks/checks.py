"""Which fused backends run here, and the sanity check of a benchmarked backend: its result and
every input gradient against the float64 oracle, with the tests' own bound (danet_ops.testing:
2x the reference's error in that dtype, the analysis terms, the floor `testing.FLOOR`).

The benchmarks check each fused backend once per op, device and dtype (`sanity`) before timing
it, at a small shape with the benchmarks' channels; the GPU proof's smoke stage
(benchmarks.gpu_cases) compares every backend at three shapes with `compare`.
"""
import functools

import torch

from danet_ops import backends, channel_attention, position_attention, testing


def fused_backends(op, device, dtype):
    """The fused backends of the registry that can run `op` ("pam" | "cam") on `device` / `dtype`
    tensors here (asking builds nothing)."""
    device = torch.device(device)
    return [name for name, b in backends.REGISTRY.items()
            if name != "reference" and not b.available(device, dtype, op)]


def _randn(gen, shape, scale, dtype, device):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def pam_inputs(B, Cq, Cv, H, W, dtype, device, seed=0):
    """q, k (entries N(0, 0.5^2)), v, x, gamma = 0.7 (fp32 for half inputs), as the tests draw them."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (_randn(gen, (B, Cq, H, W), 0.5, dtype, device) for _ in range(2))
    v, x = (_randn(gen, (B, Cv, H, W), 1.0, dtype, device) for _ in range(2))
    gdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return [q, k, v, x, torch.tensor([0.7], dtype=gdt, device=device)]


def cam_inputs(B, C, H, W, dtype, device, seed=0):
    """x with entries N(0, s^2), s = 0.5 N^-1/4 (Gram entries of a few units at any N), gamma 0.6."""
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, (B, C, H, W), 0.5 * (H * W) ** -0.25, dtype, device)
    gdt = torch.float64 if dtype == torch.float64 else torch.float32
    return [x, torch.tensor([0.6], dtype=gdt, device=device)]


def compare(op, backend, inputs, mode="original"):
    """`backend`'s op on `inputs` (result and every input gradient) against the float64 oracle
    with danet_ops.testing's bound and floor. Returns the comparisons (name, err, bound, term);
    AssertionError names the first one over its bound."""
    seen = []
    observe = seen.append
    testing.observers.append(observe)
    try:
        if op == "pam":
            fn = lambda *t: position_attention(*t, backend=backend)  # noqa: E731
        else:
            fn = lambda x, g: channel_attention(x, g, mode=mode, backend=backend)  # noqa: E731
        testing.assert_close_to_reference(op, fn, inputs, mode=mode)
    finally:
        testing.observers.remove(observe)
    return seen


@functools.lru_cache(maxsize=None)
def sanity(op, backend, device, dtype, C=512, Cq=64, H=16, W=16):
    """Check `backend` on a [1, C, H, W] problem (PAM: Cq query channels) once per argument set;
    returns the largest err / bound, raises AssertionError when a result is over its bound."""
    if op == "pam":
        inputs = pam_inputs(1, Cq, C, H, W, dtype, device)
    else:
        inputs = cam_inputs(1, C, H, W, dtype, device)
    return max(c.err / c.bound for c in compare(op, backend, inputs))
