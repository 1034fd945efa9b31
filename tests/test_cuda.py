"""Backend "cuda" (csrc/cuda, compiled CUDA kernels) against the float64 oracle.

Every test skips cleanly without a CUDA device or without a build that has the CUDA kernels
(set DANET_OPS_REQUIRE_CUDA=1 on GPU CI to turn the second skip into a failure). Nothing here
touches the GPU at import time. Error bound: conftest's rule (2x the same-dtype reference
error, plus a floor).

DANET_OPS_TEST_GPU_ON_CPU=1 (conftest.GPU_ON_CPU): the same test bodies run on CPU tensors, with
the ops danet_ops_emu::* standing in for danet_ops::pam_forward etc. They call the real
csrc/cuda launchers and kernels through the host emulator of tests/cuda_emu (the one
test_cuda_emu.py uses), and position_attention / channel_attention(backend="cuda") reach them
through the package's own validation, flattening and registered autograd (danet_ops._fake_and_autograd).
Shapes are shrunk by _gpu_shape. So every argument the tests build goes through the kernels'
logic here; what the emulator cannot show (hardware semantics, races, speed: tests/cuda_emu/
README.md) and the binding's own argument checks (C++; test_bad_inputs_raise_before_launch
skips) still wait for a GPU.
"""
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import Tensor

from danet_ops import channel_attention, position_attention, reference
from conftest import (GPU_ON_CPU, cam_inputs, compare_to_oracle, floor, make, max_err, pam_inputs,
                      run_with_grads, tf32, to64)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PAM_NAMES = ("y", "dq", "dk", "dv", "dx", "dgamma")
CAM_NAMES = ("y", "dx", "dgamma")


def _gpu_shape(*shape):
    """The GPU shape, or in GPU-on-CPU mode one the emulator runs in seconds: B and Cq kept, at
    most 136 value channels (two value splits of 128, the last ragged) or 72 CAM channels (two
    channel tiles of 64, the last ragged), H x W at most 8 x 9 (N = 72: a full block of 64 and a
    ragged one)."""
    if not GPU_ON_CPU:
        return shape
    *lead, c, H, W = shape
    return (*lead, min(c, 136 if len(shape) == 5 else 72), min(H, 8), min(W, 9))


# ----------------------------------------------------------------------------- GPU-on-CPU: the emulated ops
if GPU_ON_CPU:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import emu_api as E  # noqa: E402
    sys.path.pop(0)
    from danet_ops import _fake_and_autograd

    _EMU = {}

    def _emu_lib():
        """The emulator library, built once per content of its sources (csrc/cuda, tests/cuda_emu)
        and cached under ~/.cache/danet_ops/cuda_emu/<hash> (DANET_OPS_CACHE moves it)."""
        if "lib" not in _EMU:
            if E.cuda_include_dir() is None:
                pytest.skip("GPU-on-CPU mode of the CUDA tests needs the CUDA headers (CUDA_HOME)")
            opt = os.environ.get("DANET_CUDA_EMU_OPT", "-O1")
            h = hashlib.sha256(f"{opt} {E.cuda_include_dir()}".encode())
            for f in sorted(list(E.CSRC_CUDA.iterdir()) + list(E.HERE.iterdir())):
                if f.is_file() and f.suffix in (".cu", ".cuh", ".h", ".cpp", ".inc", ".py"):
                    h.update(f.name.encode() + f.read_bytes())
            cache = Path(os.environ.get("DANET_OPS_CACHE", Path.home() / ".cache" / "danet_ops"))
            out = cache / "cuda_emu" / h.hexdigest()[:16]
            if not (out / "libemu.so").exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = tempfile.mkdtemp(prefix="build-", dir=out.parent)
                E.build(tmp, opt=opt)
                try:
                    os.rename(tmp, out)  # atomic: a concurrent build that finished first wins
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)
            _EMU["lib"] = E.load(out / "libemu.so")
        return _EMU["lib"]

    def _need(cond, msg):
        if not cond:
            raise RuntimeError(msg)

    def _dims3(op, **named):  # what the binding's TORCH_CHECKs say about ranks
        for name, t in named.items():
            if t is not None:
                _need(t.dim() == 3, f"{op}: {name} must be [B, C, N]; got shape {tuple(t.shape)}")

    @torch.library.custom_op("danet_ops_emu::pam_forward", mutates_args=())
    def _emu_pam_forward(q: Tensor, k: Tensor, v: Tensor, x: Optional[Tensor],
                         gamma: Optional[Tensor], scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        _dims3("pam_forward", q=q, k=k, v=v, x=x)
        B, Cq, N = q.shape
        Nk = k.shape[2]
        _need(k.shape[:2] == q.shape[:2] and v.shape[0] == B and v.shape[2] == Nk,
              f"pam_forward: q [B, Cq, Nq], k [B, Cq, Nk], v [B, Cv, Nk]; got {q.shape}, {k.shape}, {v.shape}")
        _need(x is None or x.shape == (B, v.shape[1], N), "pam_forward: x must be [B, Cv, Nq]")
        if B == 0 or N == 0 or Nk == 0:
            return _fake_and_autograd.pam_forward_fake(q, k, v, x, gamma, scale)
        _emu_lib()
        o, lse, y = E.pam_forward(q, k, v, x, gamma, tf32=torch.backends.cuda.matmul.allow_tf32,
                                  scale=scale)
        return o, lse, (v.new_empty((0,)) if y is None else y)

    @torch.library.custom_op("danet_ops_emu::pam_backward", mutates_args=())
    def _emu_pam_backward(dy: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                          gamma: Optional[Tensor], scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _dims3("pam_backward", dy=dy, q=q, k=k, v=v, o=o)
        out_shape = (q.shape[0], v.shape[1], q.shape[2])
        _need(dy.shape == o.shape == out_shape and lse.shape == (q.shape[0], q.shape[2]),
              f"pam_backward: dy, o must be [B, Cv, Nq], lse [B, Nq]; got {dy.shape}, {o.shape}, {lse.shape}")
        if q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
            dq, dk, dv, dg = _fake_and_autograd.pam_backward_fake(dy, q, k, v, o, lse, gamma, scale)
            return dq.zero_(), dk.zero_(), dv.zero_(), dg.zero_()
        _emu_lib()
        return E.pam_backward(dy, q, k, v, o, lse, gamma, tf32=torch.backends.cuda.matmul.allow_tf32,
                              scale=scale)

    @torch.library.custom_op("danet_ops_emu::cam_forward", mutates_args=())
    def _emu_cam_forward(x: Tensor, gamma: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor, Tensor]:
        _dims3("cam_forward", x=x)
        _need(mode in ("original", "paper"), f"cam_forward: mode must be 'original' or 'paper'; got '{mode}'")
        if x.shape[0] == 0:   # the binding returns early for B = 0 only: N = 0 runs the kernels
            return _fake_and_autograd.cam_forward_fake(x, gamma, mode)
        _emu_lib()
        o, attn, y = E.cam_forward(x, gamma, mode == "paper", torch.backends.cuda.matmul.allow_tf32)
        return o, attn, (x.new_empty((0,)) if y is None else y)

    @torch.library.custom_op("danet_ops_emu::cam_backward", mutates_args=())
    def _emu_cam_backward(dy: Tensor, x: Tensor, attn: Tensor, o: Tensor, gamma: Optional[Tensor],
                          mode: str) -> tuple[Tensor, Tensor]:
        _dims3("cam_backward", dy=dy, x=x, attn=attn, o=o)
        _need(dy.shape == x.shape == o.shape and attn.shape == (x.shape[0], x.shape[1], x.shape[1]),
              f"cam_backward: dy, o must be x's shape, attn [B, C, C]; got {dy.shape}, {o.shape}, {attn.shape}")
        if x.shape[0] == 0 or x.shape[2] == 0:
            dx, dg = _fake_and_autograd.cam_backward_fake(dy, x, attn, o, gamma, mode)
            return dx.zero_(), dg.zero_()
        _emu_lib()
        return E.cam_backward(dy, x, attn, o, gamma, mode == "paper", torch.backends.cuda.matmul.allow_tf32)

    # O in fp32 for fp16/bf16 inputs, as the binding returns it (pam_binding.cpp)
    _fake_and_autograd.register_pam("danet_ops_emu::pam_forward", "danet_ops_emu::pam_backward")
    _fake_and_autograd.register_cam("danet_ops_emu::cam_forward", "danet_ops_emu::cam_backward")
    ops = torch.ops.danet_ops_emu

    def _emu_backend_pam_forward(q, k, v, x, gamma, scale=1.0):  # the "cuda" backend's entry point
        o, lse, y = ops.pam_forward(q, k, v, x, gamma, float(scale))
        return (o if o.dtype == v.dtype else o.to(v.dtype)), lse, y
else:
    ops = torch.ops.danet_ops


@pytest.fixture
def dev(no_tf32, monkeypatch):
    if GPU_ON_CPU:
        from danet_ops import backends
        cuda = backends.get("cuda")   # backend "cuda" runs the emulated ops on CPU tensors
        monkeypatch.setattr(cuda, "devices", ("cuda", "cpu"))
        monkeypatch.setattr(cuda, "check", lambda device, dtype, op: "")
        monkeypatch.setattr(cuda, "pam_forward", _emu_backend_pam_forward)
        monkeypatch.setattr(cuda, "cam_forward", lambda x, gamma, mode: ops.cam_forward(x, gamma, mode))
        _emu_lib()
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from danet_ops import backends
    why = backends.get("cuda").available(torch.device("cuda"), torch.float32, "pam")
    if why:
        if os.environ.get("DANET_OPS_REQUIRE_CUDA") == "1":
            pytest.fail(f"backend 'cuda' unavailable on a GPU machine: {why}")
        pytest.skip(f"backend 'cuda' unavailable: {why}")
    # fp32 comparisons are exact-precision (no_tf32) unless a test turns TF32 on itself.
    return torch.device("cuda")


def _to(inputs, dev):
    return [None if t is None else t.to(dev) for t in inputs]


def _pam(inputs, dtype):
    fn = lambda *t: position_attention(*t, backend="cuda")  # noqa: E731
    return compare_to_oracle(fn, reference.position_attention, inputs, PAM_NAMES, floor(dtype, "cuda"))


def _cam(inputs, mode, dtype):
    fn = lambda x, g: channel_attention(x, g, mode=mode, backend="cuda")  # noqa: E731
    ref = lambda x, g: reference.channel_attention(x, g, mode=mode)       # noqa: E731
    return compare_to_oracle(fn, ref, inputs, CAM_NAMES, floor(dtype, "cuda"))


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
    _pam(pam_inputs(*_gpu_shape(*shape), dtype=dtype, device=dev), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_pam_layouts(dev, dtype, layout):
    # device=dev: the layout is made on the device (.to(dev) would make a channel slice contiguous)
    inputs = pam_inputs(*_gpu_shape(2, 16, 72, 24, 20), dtype=dtype, layout=layout, device=dev)
    assert not inputs[0].is_contiguous()
    _pam(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pam_without_residual(dev, dtype):
    _pam(pam_inputs(*_gpu_shape(2, 8, 40, 11, 13), dtype=dtype, residual=False, device=dev), dtype)


def test_pam_autocast_style_mixed_dtypes(dev):
    # bf16 q, k, v (convolutions under autocast) with an fp32 residual and gamma: y is fp32.
    q, k, v, _, _ = pam_inputs(*_gpu_shape(1, 16, 48, 13, 11), dtype=torch.bfloat16, device=dev)
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
    # (GPU-on-CPU: N = 300; the emulator runs the O(N^2) work one CUDA thread at a time.)
    B, Cq, Cv, N = 1, 8, 32, (300 if GPU_ON_CPU else 70000)
    gen = torch.Generator().manual_seed(0)
    q, k, v = [(torch.randn(B, c, N, generator=gen) * s).to(dev)
               for c, s in ((Cq, 0.5), (Cq, 0.5), (Cv, 1.0))]
    o, lse, _ = ops.pam_forward(q, k, v, None, None)
    rows = torch.tensor([r for r in (0, 1, 63, 64, 65535, 65536) if r < N] + [N - 1], device=dev)
    E = torch.einsum("bci,bcj->bij", q[:, :, rows].double(), k.double())
    ref_o = torch.einsum("bij,bcj->bci", torch.softmax(E, -1), v.double())
    assert max_err(o[:, :, rows], ref_o) < 1e-4
    assert max_err(lse[:, rows], torch.logsumexp(E, -1)) < 1e-4


# ----------------------------------------------------------------------------- PAM, general op
# E = scale * q^T k with keys/values of their own length Nk, through position_attention.
# Kernel tiles are 64 positions: Nk < 64 < Nq, Nq < 64 < Nk, Nk = 1 (GPU-on-CPU: same sizes).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk,scale", [(97, 25, 16 ** -0.5), (40, 130, 2.0), (70, 1, 0.5)],
                         ids=lambda c: f"{c}")
def test_pam_general_nk_and_scale(dev, dtype, nq, nk, scale):
    gen = torch.Generator().manual_seed(0)
    B, Cq, Cv = 2, 16, 72
    q = make((B, Cq, nq, 1), dtype, gen=gen, scale=0.5, device=dev).flatten(2)
    k = make((B, Cq, nk, 1), dtype, gen=gen, scale=0.5, device=dev).flatten(2)
    v = make((B, Cv, nk, 1), dtype, gen=gen, device=dev).flatten(2)
    x = make((B, Cv, nq, 1), dtype, gen=gen, device=dev).flatten(2)
    g = torch.tensor([0.7], device=dev)
    fn = lambda *t: position_attention(*t, scale=scale, backend="cuda")  # noqa: E731
    ref = lambda *t: reference.position_attention(*t, scale=scale)       # noqa: E731
    compare_to_oracle(fn, ref, [q, k, v, x, g], PAM_NAMES, floor(dtype, "cuda"))


# ----------------------------------------------------------------------------- CAM
CAM_SHAPES = [(2, 512, 32, 32), (1, 37, 29, 31), (2, 130, 9, 7), (1, 1, 4, 4), (1, 65, 96, 96)]


@pytest.mark.parametrize("mode", ["original", "paper"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cam_matches_oracle(dev, shape, dtype, mode):
    shape = _gpu_shape(*shape)
    scale = 0.5 * (shape[2] * shape[3]) ** -0.25   # E entries of order 1: a non-trivial softmax
    _cam(cam_inputs(*shape, dtype=dtype, scale=scale, device=dev), mode, dtype)


@pytest.mark.parametrize("mode", ["original", "paper"])
@pytest.mark.parametrize("layout", ["channels_last", "channel_slice"])
def test_cam_layouts(dev, mode, layout):
    inputs = cam_inputs(*_gpu_shape(2, 40, 24, 20), dtype=torch.float16, layout=layout, scale=0.1,
                        device=dev)
    assert not inputs[0].is_contiguous()
    _cam(inputs, mode, torch.float16)


@pytest.mark.parametrize("mode", ["original", "paper"])
def test_cam_without_residual(dev, mode):
    _cam(_to(cam_inputs(2, 24, 7, 9, residual=False), dev), mode, torch.float32)


def test_cam_fp16_energy_beyond_fp16_range(dev):
    # E ~ 1e5 > 65504: the naive fp16 bmm overflows; fp32 accumulation must stay finite and exact.
    # (GPU-on-CPU: N = 64 x 40 and scale 7.0 keep E ~ 1.3e5 with a tenth of the emulated work)
    H, W, s = (64, 40, 7.0) if GPU_ON_CPU else (64, 64, 5.0)
    x, g = cam_inputs(1, 64, H, W, dtype=torch.float16, scale=s, device=dev)
    oracle = reference.channel_attention(x.double(), g.double(), mode="original")
    assert (x.double().flatten(2).pow(2).sum(-1) > 65504).all()
    for mode in ("original", "paper"):
        out = channel_attention(x, g, mode=mode, backend="cuda")
        assert torch.isfinite(out).all(), mode
    out = channel_attention(x, g, mode="original", backend="cuda")
    assert max_err(out, oracle) < 2e-2 * oracle.abs().max().item()


# ----------------------------------------------------------------------------- both
def test_tf32_only_when_allowed(dev):
    inputs = pam_inputs(*_gpu_shape(1, 64, 128, 32, 32), dtype=torch.float32, residual=False,
                        device=dev)
    oracle = reference.position_attention(*to64(inputs[:3]))
    err_ieee = max_err(position_attention(*inputs[:3], backend="cuda"), oracle)
    with tf32(True):
        err_tf32 = max_err(position_attention(*inputs[:3], backend="cuda"), oracle)
    assert err_ieee < 1e-5 < err_tf32 < 1e-2


def test_deterministic(dev):
    # No atomics anywhere: repeated calls are bitwise identical.
    q, k, v, x, g = pam_inputs(*_gpu_shape(2, 64, 256, 40, 40), dtype=torch.bfloat16, device=dev)
    q, k, v, x = [t.flatten(2) for t in (q, k, v, x)]
    dy = torch.randn_like(v)
    xc = make(_gpu_shape(2, 96, 48, 48), torch.bfloat16, device=dev).flatten(2)
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
    # gamma stays [1]: the ops take q, k, v, x as [B, C, N] and gamma as it is
    q, k, v, x, g = [t if t.dim() == 1 else t.flatten(2) for t in pam_inputs(1, 8, 16, 5, 7, device=dev)]
    torch.library.opcheck(ops.pam_forward.default, (q, k, v, x, g))
    torch.library.opcheck(ops.pam_forward.default, (q, k, v, None, None))
    # bf16: O comes back in fp32 (kept for the backward's Delta); the fake kernel must say so
    qb, kb, vb, xb = (t.bfloat16() for t in (q, k, v, x))
    torch.library.opcheck(ops.pam_forward.default, (qb, kb, vb, xb, g))
    assert ops.pam_forward(qb, kb, vb, None, None)[0].dtype == torch.float32
    xc, gc = cam_inputs(1, 12, 5, 7)
    xc = xc.to(dev).flatten(2)
    for mode in ("original", "paper"):
        torch.library.opcheck(ops.cam_forward.default, (xc, gc.to(dev), mode))


def test_bad_inputs_raise_before_launch(dev):
    if GPU_ON_CPU:
        pytest.skip("the binding's own C++ argument checks: only the real ops can show them")
    q = torch.randn(1, 300, 16, device=dev)   # Cq > 256
    with pytest.raises(RuntimeError, match="Cq"):
        ops.pam_forward(q, q, q, None, None)
    d = torch.randn(1, 8, 16, device=dev, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        ops.pam_forward(d, d, d, None, None)
    with pytest.raises(RuntimeError, match="mode"):
        ops.cam_forward(torch.randn(1, 4, 5, device=dev), None, "other")
