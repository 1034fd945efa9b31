"""Backend "cuda" (csrc/cuda, compiled CUDA kernels) against the float64 oracle.

Every test skips cleanly without a CUDA device or without a build that has the CUDA kernels
(set DANET_OPS_REQUIRE_CUDA=1 on GPU CI to turn the second skip into a failure). Nothing here
touches the GPU at import time. Error bound: conftest's rule (2x the same-dtype reference
error, plus a floor).
"""
import os

import pytest
import torch

from danet_ops import channel_attention, position_attention, reference
from conftest import (cam_inputs, compare_to_oracle, make, max_err, pam_inputs, run_with_grads,
                      tf32, to64)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
PAM_NAMES = ("y", "dq", "dk", "dv", "dx", "dgamma")
CAM_NAMES = ("y", "dx", "dgamma")
ops = torch.ops.danet_ops


@pytest.fixture
def dev(no_tf32):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from danet_ops import _backends
    ok, why = _backends.check("cuda", "pam", torch.device("cuda"), torch.float32)
    if not ok:
        if os.environ.get("DANET_OPS_REQUIRE_CUDA") == "1":
            pytest.fail(f"backend 'cuda' unavailable on a GPU machine: {why}")
        pytest.skip(f"backend 'cuda' unavailable: {why}")
    # fp32 comparisons are exact-precision (no_tf32) unless a test turns TF32 on itself.
    return torch.device("cuda")


def _to(inputs, dev):
    return [None if t is None else t.to(dev) for t in inputs]


def _pam(inputs, dtype):
    fn = lambda *t: position_attention(*t, backend="cuda")  # noqa: E731
    return compare_to_oracle(fn, reference.position_attention, inputs, PAM_NAMES, FLOOR[dtype])


def _cam(inputs, mode, dtype):
    fn = lambda x, g: channel_attention(x, g, mode=mode, backend="cuda")  # noqa: E731
    ref = lambda x, g: reference.channel_attention(x, g, mode=mode)       # noqa: E731
    return compare_to_oracle(fn, ref, inputs, CAM_NAMES, FLOOR[dtype])


# ----------------------------------------------------------------------------- PAM
PAM_SHAPES = [  # B, Cq, Cv, H, W
    (2, 64, 512, 32, 32),   # the DANet head (Cq = C/8), two value-channel splits per block row
    (1, 8, 24, 37, 29),     # ragged N = 1073
    (2, 72, 130, 9, 7),     # Cq > 64 (streamed q tiles), ragged Cv split, ragged N
    (1, 256, 64, 16, 16),   # Cq = 256 (two dq/dk channel splits)
    (1, 16, 4096, 8, 8),    # Cv = 4096
    (1, 1, 1, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pam_matches_oracle(dev, dtype, shape):
    _pam(_to(pam_inputs(*shape, dtype=dtype), dev), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_pam_layouts(dev, dtype, layout):
    inputs = _to(pam_inputs(2, 16, 72, 24, 20, dtype=dtype, layout=layout), dev)
    assert not inputs[0].is_contiguous()
    _pam(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pam_without_residual(dev, dtype):
    _pam(_to(pam_inputs(2, 8, 40, 11, 13, dtype=dtype, residual=False), dev), dtype)


def test_pam_autocast_style_mixed_dtypes(dev):
    # bf16 q, k, v (convolutions under autocast) with an fp32 residual and gamma: y is fp32.
    q, k, v, _, _ = _to(pam_inputs(1, 16, 48, 13, 11, dtype=torch.bfloat16), dev)
    x = torch.randn(v.shape, device=dev)
    g = torch.tensor([0.5], device=dev)
    got, grads = run_with_grads(lambda *t: position_attention(*t, backend="cuda"), [q, k, v, x, g])
    ref, grads64 = run_with_grads(reference.position_attention, to64([q, k, v, x, g]))
    assert got.dtype == torch.float32
    assert max_err(got, ref) < 3e-2
    for name, a, b in zip(PAM_NAMES[1:], grads, grads64):
        assert max_err(a, b) < 5e-2 * max(b.abs().max().item(), 1.0), name


def test_pam_large_logits_stay_finite(dev):
    inputs = _to(pam_inputs(1, 8, 16, 12, 12, dtype=torch.float32, qk_scale=40.0), dev)
    out = position_attention(*inputs, backend="cuda")
    assert torch.isfinite(out).all()
    assert max_err(out, reference.position_attention(*to64(inputs))) < 1e-3


def test_pam_nan_propagates_like_reference(dev):
    q, k, v, x, g = _to(pam_inputs(1, 4, 6, 9, 9, dtype=torch.float32), dev)
    q[0, 1, 2, 3] = float("nan")
    v[0, 0, 4, 4] = float("nan")
    out = position_attention(q, k, v, x, g, backend="cuda")
    ref = reference.position_attention(q, k, v, x, g)
    assert torch.equal(out.isnan(), ref.isnan())


def test_pam_gamma_zero(dev):
    q, k, v, x, _ = _to(pam_inputs(1, 8, 16, 10, 10, dtype=torch.float32), dev)
    g = torch.zeros(1, device=dev)
    _, grads = run_with_grads(lambda *t: position_attention(*t, backend="cuda"), [q, k, v, x, g])
    _, grads64 = run_with_grads(reference.position_attention, to64([q, k, v, x, g]))
    assert max_err(grads[4], grads64[4]) < 1e-4 * max(grads64[4].abs().item(), 1.0)
    for got in grads[:3]:
        assert torch.count_nonzero(got) == 0


def test_pam_long_sequence_rows(dev):
    # N = 70000 > 2^16: check the lse and a few output rows against an exact row oracle.
    B, Cq, Cv, N = 1, 8, 32, 70000
    gen = torch.Generator().manual_seed(0)
    q, k, v = [(torch.randn(B, c, N, generator=gen) * s).to(dev)
               for c, s in ((Cq, 0.5), (Cq, 0.5), (Cv, 1.0))]
    o, lse, _ = ops.pam_forward(q, k, v, None, None)
    rows = torch.tensor([0, 1, 63, 64, 65535, 65536, N - 1], device=dev)
    E = torch.einsum("bci,bcj->bij", q[:, :, rows].double(), k.double())
    ref_o = torch.einsum("bij,bcj->bci", torch.softmax(E, -1), v.double())
    assert max_err(o[:, :, rows], ref_o) < 1e-4
    assert max_err(lse[:, rows], torch.logsumexp(E, -1)) < 1e-4


# ----------------------------------------------------------------------------- CAM
CAM_SHAPES = [(2, 512, 32, 32), (1, 37, 29, 31), (2, 130, 9, 7), (1, 1, 4, 4), (1, 65, 96, 96)]


@pytest.mark.parametrize("mode", ["original", "paper"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cam_matches_oracle(dev, shape, dtype, mode):
    scale = 0.5 * (shape[2] * shape[3]) ** -0.25   # E entries of order 1: a non-trivial softmax
    _cam(_to(cam_inputs(*shape, dtype=dtype, scale=scale), dev), mode, dtype)


@pytest.mark.parametrize("mode", ["original", "paper"])
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_cam_layouts(dev, mode, layout):
    inputs = _to(cam_inputs(2, 40, 24, 20, dtype=torch.float16, layout=layout, scale=0.1), dev)
    _cam(inputs, mode, torch.float16)


@pytest.mark.parametrize("mode", ["original", "paper"])
def test_cam_without_residual(dev, mode):
    _cam(_to(cam_inputs(2, 24, 7, 9, residual=False), dev), mode, torch.float32)


def test_cam_fp16_energy_beyond_fp16_range(dev):
    # E ~ 1e5 > 65504: the naive fp16 bmm overflows; fp32 accumulation must stay finite and exact.
    x, g = cam_inputs(1, 64, 64, 64, dtype=torch.float16, scale=5.0)
    x, g = x.to(dev), g.to(dev)
    oracle = reference.channel_attention(x.double(), g.double(), mode="original")
    assert (x.double().flatten(2).pow(2).sum(-1) > 65504).all()
    for mode in ("original", "paper"):
        out = channel_attention(x, g, mode=mode, backend="cuda")
        assert torch.isfinite(out).all(), mode
    out = channel_attention(x, g, mode="original", backend="cuda")
    assert max_err(out, oracle) < 2e-2 * oracle.abs().max().item()


# ----------------------------------------------------------------------------- both
def test_tf32_only_when_allowed(dev):
    inputs = _to(pam_inputs(1, 64, 128, 32, 32, dtype=torch.float32, residual=False), dev)
    oracle = reference.position_attention(*to64(inputs[:3]))
    err_ieee = max_err(position_attention(*inputs[:3], backend="cuda"), oracle)
    with tf32(True):
        err_tf32 = max_err(position_attention(*inputs[:3], backend="cuda"), oracle)
    assert err_ieee < 1e-5 < err_tf32 < 1e-2


def test_deterministic(dev):
    # No atomics anywhere: repeated calls are bitwise identical.
    q, k, v, x, g = _to(pam_inputs(2, 64, 256, 40, 40, dtype=torch.bfloat16), dev)
    q, k, v, x = [t.flatten(2) for t in (q, k, v, x)]
    dy = torch.randn_like(v)
    xc = make((2, 96, 48, 48), torch.bfloat16).to(dev).flatten(2)
    dyc = torch.randn_like(xc)
    runs = []
    for _ in range(2):
        o, lse, y = ops.pam_forward(q, k, v, x, g)
        run = (o, lse, y) + tuple(ops.pam_backward(dy, q, k, v, o, lse, g))
        o, attn, y = ops.cam_forward(xc, g, "original")
        runs.append(run + (o, attn, y) + tuple(ops.cam_backward(dyc, xc, attn, o, g, "original")))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_empty_and_degenerate_sizes(dev):
    z = torch.zeros(2, 4, 0, device=dev)
    o, lse, y = ops.pam_forward(z, z, torch.zeros(2, 6, 0, device=dev), None, None)
    assert o.shape == (2, 6, 0) and lse.shape == (2, 0) and y.shape == (0,)
    e = torch.zeros(0, 4, 5, device=dev)
    assert ops.pam_forward(e, e, e, None, None)[0].shape == (0, 4, 5)
    o, attn, y = ops.cam_forward(torch.zeros(1, 3, 0, device=dev), None, "paper")
    assert o.shape == (1, 3, 0) and torch.allclose(attn, torch.full((1, 3, 3), 1 / 3, device=dev))


def test_opcheck(dev):
    q, k, v, x, g = [t.flatten(2) for t in _to(pam_inputs(1, 8, 16, 5, 7), dev)]
    torch.library.opcheck(ops.pam_forward.default, (q, k, v, x, g))
    torch.library.opcheck(ops.pam_forward.default, (q, k, v, None, None))
    xc, gc = cam_inputs(1, 12, 5, 7)
    xc = xc.to(dev).flatten(2)
    for mode in ("original", "paper"):
        torch.library.opcheck(ops.cam_forward.default, (xc, gc.to(dev), mode))


def test_bad_inputs_raise_before_launch(dev):
    q = torch.randn(1, 300, 16, device=dev)   # Cq > 256
    with pytest.raises(RuntimeError, match="Cq"):
        ops.pam_forward(q, q, q, None, None)
    d = torch.randn(1, 8, 16, device=dev, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        ops.pam_forward(d, d, d, None, None)
    with pytest.raises(RuntimeError, match="mode"):
        ops.cam_forward(torch.randn(1, 4, 5, device=dev), None, "other")
