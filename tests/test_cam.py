"""Channel attention against the float64 oracle, both modes: every case on every backend x device
x CPU path this process can run, in every dtype it supports (conftest.BACKENDS), through one
comparison (danet_ops.testing.compare_cam) and one error bound (2x the reference's own error in
that dtype plus the analysis terms of the fused kernels' own error sources, or the dtype's floor).
The CPU kernels' internals (threads, determinism, inference form): test_cpu_kernels.py."""
import pytest
import torch

from danet_ops import ChannelAttention, channel_attention, reference
from danet_ops.testing import check_bound
from conftest import (FLOOR, LAYOUTS, backend_grid, backend_params, cam_inputs, compare_cam,
                      device_for, floor, max_err, run_with_grads, tf32)

MODES = ("original", "paper")


def _compare(inputs, mode, floor, backend="cpu"):
    return compare_cam(backend, inputs, mode, floor)


def _run(backend_id, shape, dtype, mode, **inputs_kw):
    """cam_inputs on the backend's device, compared with the oracle under floor(dtype, backend)."""
    name, dev = device_for(backend_id, "cam", dtype)
    inputs = cam_inputs(*shape, dtype=dtype, device=dev, **inputs_kw)
    return _compare(inputs, mode, floor(dtype, backend_id), name)


def _small(shape):
    """Shapes the Triton interpreter runs in about a second: C <= 64, B * N <= 128."""
    return shape[1] <= 64 and shape[0] * shape[2] * shape[3] <= 128


def _interp_small(backend, case, dtype=None):
    shape = case[0] if isinstance(case[0], tuple) else case
    return backend != "triton-interp" or _small(shape)


CASES = [  # (B, C, H, W), activation scale (E ~ N scale^2)
    ((2, 5, 13, 1), 0.2), ((1, 64, 20, 20), 0.2), ((2, 130, 9, 7), 0.2), ((1, 1, 4, 4), 0.2),
    ((3, 7, 97, 1), 0.2),
    # the interpreter's blocks (16 channels, N split in two when long enough), larger activations
    ((2, 20, 7, 7), 0.3),   # C = 20: two channel blocks (upper pair mirrored); N = 49: two N splits
    ((1, 5, 3, 3), 0.3),    # one block, one split
    ((1, 33, 10, 5), 0.3),  # three blocks, the last ragged
    ((2, 6, 1, 1), 0.3),    # N = 1
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,case,dtype", backend_grid(CASES, [torch.float64, torch.float32],
                                                            keep=_interp_small))
def test_matches_oracle(backend, case, dtype, mode):
    shape, scale = case
    _run(backend, shape, dtype, mode, scale=scale, gamma=0.7 if scale == 0.2 else 0.6)


@pytest.mark.parametrize("backend,C,dtype", backend_grid([1, 2, 63, 64, 65, 257, 2048],
                                                         [torch.float64, torch.float32],
                                                         keep=lambda b, C, dt: b != "triton-interp" or C <= 65))
def test_channel_counts(backend, C, dtype):
    # Channel blocks of 64 (CPU) / 16 (interpreter): diagonal-only, ragged and many-block Gram tilings.
    _run(backend, (1, C, 3, 5), dtype, "original")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,case,dtype", backend_grid(
    [(layout, shape) for shape in [(2, 9, 11, 7), (2, 20, 7, 7)] for layout in LAYOUTS],
    [torch.float64, torch.float32, torch.float16], keep=lambda b, c, dt: b != "triton-interp" or _small(c[1])))
def test_layouts(backend, case, dtype, mode):
    # Read in place (run_with_grads keeps the view: its leaves are detached views, not clones).
    layout, shape = case
    name, dev = device_for(backend, "cam", dtype)
    inputs = cam_inputs(*shape, dtype=dtype, layout=layout, device=dev)
    assert layout == "contiguous" or not inputs[0].is_contiguous()
    _compare(inputs, mode, floor(dtype, backend), name)


@pytest.mark.parametrize("kind", ["step", "expand"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,shape,dtype", backend_grid([(3, 20, 5, 5)],
                                                             [torch.float64, torch.float32]))
def test_batch_strided_and_expanded_inputs(backend, shape, dtype, mode, kind):
    # x's batch dimension a view: every second image of a batch of 2B, or one image expanded over
    # B (batch stride 0).
    name, dev = device_for(backend, "cam", dtype)
    B = shape[0]
    if kind == "step":
        x, g = cam_inputs(2 * B, *shape[1:], dtype=dtype, device=dev)
        x = x[::2]
    else:
        x, g = cam_inputs(1, *shape[1:], dtype=dtype, device=dev)
        x = x.expand(B, *x.shape[1:])
        assert x.stride(0) == 0
    assert x.shape[0] == B and not x.is_contiguous()
    _compare([x, g], mode, floor(dtype, backend), name)


# The GPU backends at DANet's C = 512 and a ragged size (small activations: E = a a^T sums N terms).
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    [(2, 512, 32, 32), (1, 37, 29, 31)], [torch.float32, torch.float16, torch.bfloat16],
    backends=("triton-cuda", "cuda")))
def test_gpu_sizes_match_oracle(backend, shape, dtype, mode):
    _run(backend, shape, dtype, mode, scale=0.05)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,shape,dtype", backend_grid([(2, 6, 5, 5)],
                                                             [torch.float64, torch.float32]))
def test_without_residual(backend, shape, dtype, mode):
    _run(backend, shape, dtype, mode, residual=False)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    x, g = cam_inputs(2, 5, 3, 4, dtype=torch.float64)
    x.requires_grad_()
    g.requires_grad_()
    fn = lambda x, g: channel_attention(x, g, mode=mode, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, g))
    assert torch.autograd.gradcheck(lambda x: channel_attention(x, mode=mode, backend="cpu"), (x,))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,shape,dtype", backend_grid([(1, 8, 6, 6)],
                                                             [torch.float64, torch.float32]))
def test_dgamma_exact_at_zero_gamma(backend, shape, dtype, mode):
    name, dev = device_for(backend, "cam", dtype)
    x, g = cam_inputs(*shape, dtype=dtype, device=dev)
    g = torch.zeros_like(g)
    y, grads = _compare([x, g], mode, floor(dtype, backend), name)
    _, grads64 = run_with_grads(lambda x, g: reference.channel_attention(x, g, mode),
                                [x.double(), g.double()])
    assert grads64[1].abs().item() > 1e-3
    # dgamma = sum of B*C*N = 288 products: fp64 to a few ulps; fp32 accumulation ~N*u
    check_bound("dgamma", max_err(grads[1], grads64[1]), 1e-12 if dtype == torch.float64 else 1e-5,
                "sum-length")
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1),   # run_with_grads' dy
                    dtype=torch.float64).to(device=dev, dtype=y.dtype)
    assert torch.equal(y, x)                          # gamma = 0: y is exactly the residual
    assert max_err(grads[0], w) == 0.0                # ... and dx exactly the residual's dy


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,case,dtype", backend_grid(
    [((2, 16, 9, 9), 0.2), ((2, 20, 7, 7), 0.3), ((1, 5, 3, 3), 0.3), ((1, 33, 10, 5), 0.3),
     ((2, 40, 19, 23), 0.2)],    # N = 437: ragged N blocks of the CPU kernels
    [torch.float16, torch.bfloat16], keep=_interp_small))
def test_half_inputs_match_oracle(backend, case, dtype, mode):
    # CPU: fp32 tiles or low-precision products (both forced); GPU: tensor-core tiles.
    shape, scale = case
    _run(backend, shape, dtype, mode, scale=scale, gamma=0.7 if scale == 0.2 else 0.6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,shape,dtype", backend_grid([(2, 20, 7, 7)], [torch.bfloat16]))
def test_half_inputs_without_residual(backend, shape, dtype, mode):
    _run(backend, shape, dtype, mode, residual=False, scale=0.3)


def _cam_fp32_gram(x, g, mode, chunks):
    """The reference CAM in fp32, its Gram summed over `chunks` N-chunks (another fp32 order)."""
    a = x.float().flatten(2)
    energy = sum(torch.bmm(c, c.transpose(1, 2)) for c in a.chunk(chunks, dim=2))
    if mode == "original":
        energy = energy.max(-1, keepdim=True)[0].expand_as(energy) - energy
    out = torch.bmm(torch.softmax(energy, dim=-1), a).view_as(x)
    return g * out + x.float()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", backend_params("cpu", "cpu-lowp", "cpu-fp32tiles", "triton-interp",
                                                   "triton-cuda", "cuda"))
def test_fp16_gram_overflow_stays_finite(backend, mode):
    """C=64 at 64x64 with activations around 6: Gram entries ~1.5e5 > 65504 (fp16 max); the
    interpreter's case is C=16 at 16x16 with activations around 17 (E ~ 7.4e4)."""
    name, dev = device_for(backend, "cam", torch.float16)
    gen = torch.Generator().manual_seed(0)
    C, H, mean = (16, 16, 17.0) if backend == "triton-interp" else (64, 64, 6.0)
    x64 = mean + torch.randn(1, C, H, H, generator=gen, dtype=torch.float64)
    x = x64.half().to(dev)
    g = torch.tensor([0.5], device=dev)
    energy = torch.bmm(x.double().flatten(2), x.double().flatten(2).transpose(1, 2))
    assert energy.max().item() > 65504
    oracle = reference.channel_attention(x.double(), g.double(), mode)
    with tf32(False):
        ours = channel_attention(x, g, mode=mode, backend=name)
    assert torch.isfinite(ours).all()
    # The fp16 reference gives NaN here, so the bound is 2x the fp32 reference's own error on the
    # same (fp16-valued) inputs. Its one error source that matters is the Gram's fp32 summation:
    # E ~ 1.5e5 carries ~5e-2 absolute error before the softmax, and two logits of a row lie
    # within 1 of each other, so y's error is set by the ORDER in which the N products are
    # summed. A worst-case bound (N u |E| ~ 37) says nothing here; instead the reference's error
    # is taken over the summation orders a blocked kernel can use: N split into 1 .. 64 chunks
    # (block lengths 4096 .. 64) summed in fp32. Measured on this input: 1.2e-3 .. 8.7e-3 across
    # those orders, so one order's luck must not set the bound.
    with tf32(False):
        err32 = max(max_err(_cam_fp32_gram(x, g, mode, chunks), oracle)
                    for chunks in (1, 2, 4, 8, 16, 32, 64))
    err = max_err(ours, oracle)
    check_bound("y", err, 2.0 * err32, "2x-reference")
    try:   # the naive fp16 computation, side by side
        naive = reference.channel_attention(x, g.half(), mode)
    except RuntimeError as exc:  # fp16 bmm not implemented on this device/build
        pytest.skip(f"naive fp16 bmm unsupported here: {exc}")
    assert not torch.isfinite(naive).all(), "the naive fp16 Gram was expected to overflow"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", backend_params())
def test_nan_propagates_like_reference(backend, mode):
    name, dev = device_for(backend, "cam", torch.float32)
    x, g = cam_inputs(1, 6, 5, 5, device=dev)
    x[0, 2, 1, 1] = float("nan")
    with tf32(False):
        ours = channel_attention(x, g, mode=mode, backend=name)
    ref = reference.channel_attention(x, g, mode)
    assert torch.equal(ours.isnan(), ref.isnan()) and ours.isnan().any()
    # ... and exactly there: the finite entries are the reference's (fp32 floor).
    check_bound("y", max_err(torch.nan_to_num(ours), torch.nan_to_num(ref)),
                FLOOR[torch.float32] * ref.nan_to_num().abs().max().item(), "floor")


@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (2, 4, 0, 5)])
@pytest.mark.parametrize("backend", [pytest.param("auto", id="auto")] + backend_params())
def test_empty(shape, backend):
    name, dev = ("auto", torch.device("cpu")) if backend == "auto" else device_for(backend, "cam")
    x, g = cam_inputs(*shape, device=dev)
    x.requires_grad_()
    y = channel_attention(x, g, backend=name)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


class CAM_Module(torch.nn.Module):
    """The released DANet CAM_Module's structure, written out for the compatibility test."""

    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = torch.nn.Parameter(torch.zeros(1))
        self.softmax = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.size()
        proj_query = x.view(b, c, -1)
        proj_key = x.view(b, c, -1).permute(0, 2, 1)
        energy = torch.bmm(proj_query, proj_key)
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = self.softmax(energy_new)
        out = torch.bmm(attention, x.view(b, c, -1)).view(b, c, h, w)
        return self.gamma * out + x


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_released_state_dict_loads_and_matches(backend):
    released = CAM_Module(24).double()
    with torch.no_grad():
        released.gamma.fill_(0.9)
    ours = ChannelAttention(mode="original", backend=backend).double()
    ours.load_state_dict(released.state_dict(), strict=True)
    x = 0.3 * torch.randn(2, 24, 7, 5, dtype=torch.float64)
    out_ref, grads_ref = run_with_grads(released, [x])
    out, grads = run_with_grads(ours, [x])
    assert max_err(out, out_ref) < 1e-12 and max_err(grads[0], grads_ref[0]) < 1e-12
    released.zero_grad()
    ours.zero_grad()
    released(x).sum().backward()
    ours(x).sum().backward()
    assert max_err(ours.gamma.grad, released.gamma.grad) < 1e-10


def test_modes_differ():
    x, g = cam_inputs(1, 8, 5, 5)
    a = channel_attention(x, g, mode="original", backend="cpu")
    b = channel_attention(x, g, mode="paper", backend="cpu")
    assert max_err(a, b) > 1e-3
