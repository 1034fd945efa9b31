"""Channel attention: the fused CPU backend against the float64 oracle, both modes."""
import pytest
import torch

from danet_ops import ChannelAttention, channel_attention, reference
from conftest import FLOOR, LAYOUTS, cam_inputs, compare_to_oracle, max_err, run_with_grads

MODES = ("original", "paper")
NAMES = ("y", "dx", "dgamma")


def _compare(inputs, mode, floor, backend="cpu"):
    fn = lambda x, g: channel_attention(x, g, mode=mode, backend=backend)  # noqa: E731
    ref = lambda x, g: reference.channel_attention(x, g, mode=mode)        # noqa: E731
    return compare_to_oracle(fn, ref, inputs, NAMES, floor)


SHAPES = [(2, 5, 13, 1), (1, 64, 20, 20), (2, 130, 9, 7), (1, 1, 4, 4), (3, 7, 97, 1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_matches_oracle(mode, shape, dtype):
    _compare(cam_inputs(*shape, dtype=dtype), mode, FLOOR[dtype])


@pytest.mark.parametrize("C", [1, 2, 63, 64, 65, 257, 2048])
def test_channel_counts(C):
    # Channel blocks of 64: exercises diagonal-only, ragged and many-block Gram tilings.
    _compare(cam_inputs(1, C, 3, 5, dtype=torch.float64), "original", 1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(mode, layout):
    inputs = cam_inputs(2, 9, 11, 7, dtype=torch.float64, layout=layout)
    assert layout == "contiguous" or not inputs[0].is_contiguous()
    _compare(inputs, mode, 1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_without_residual(mode):
    _compare(cam_inputs(2, 6, 5, 5, dtype=torch.float64, residual=False), mode, 1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    x, g = cam_inputs(2, 5, 3, 4, dtype=torch.float64)
    x.requires_grad_()
    g.requires_grad_()
    fn = lambda x, g: channel_attention(x, g, mode=mode, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, g))
    assert torch.autograd.gradcheck(lambda x: channel_attention(x, mode=mode, backend="cpu"), (x,))


@pytest.mark.parametrize("mode", MODES)
def test_dgamma_exact_at_zero_gamma(mode):
    x, _ = cam_inputs(1, 8, 6, 6, dtype=torch.float64)
    g = torch.zeros(1, dtype=torch.float64)
    _, grads = _compare([x, g], mode, 1e-10)
    _, grads64 = run_with_grads(lambda x, g: reference.channel_attention(x, g, mode), [x, g])
    assert grads64[1].abs().item() > 1e-3
    assert max_err(grads[1], grads64[1]) < 1e-12
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert max_err(grads[0], w) == 0.0        # gamma = 0: dx is exactly the residual's dy


@pytest.mark.parametrize("mode", MODES)
def test_half_inputs_computed_in_fp32(mode):
    for dtype in (torch.float16, torch.bfloat16):
        _compare(cam_inputs(2, 16, 9, 9, dtype=dtype), mode, FLOOR[dtype])


def _cam_fp32_gram(x, g, mode, chunks):
    """The reference CAM in fp32, its Gram summed over `chunks` N-chunks (another fp32 order)."""
    a = x.float().flatten(2)
    energy = sum(torch.bmm(c, c.transpose(1, 2)) for c in a.chunk(chunks, dim=2))
    if mode == "original":
        energy = energy.max(-1, keepdim=True)[0].expand_as(energy) - energy
    out = torch.bmm(torch.softmax(energy, dim=-1), a).view_as(x)
    return g * out + x.float()


@pytest.mark.parametrize("mode", MODES)
def test_fp16_gram_overflow_stays_finite(mode):
    """C=64 at 64x64 with activations around 6: Gram entries ~1.5e5 > 65504 (fp16 max)."""
    gen = torch.Generator().manual_seed(0)
    x64 = 6.0 + torch.randn(1, 64, 64, 64, generator=gen, dtype=torch.float64)
    x = x64.half()
    g = torch.tensor([0.5])
    energy = torch.bmm(x.double().flatten(2), x.double().flatten(2).transpose(1, 2))
    assert energy.max().item() > 65504
    oracle = reference.channel_attention(x.double(), g.double(), mode)
    ours = channel_attention(x, g, mode=mode, backend="cpu")
    assert torch.isfinite(ours).all()
    # The fp16 reference gives NaN here, so the bound is 2x the fp32 reference's own error on the
    # same (fp16-valued) inputs: E ~ 1.5e5 summed in fp32 carries ~1e-2 absolute error before the
    # softmax, in a summation order that differs between BLAS builds, CPUs and thread counts. The
    # fp32 reference's error is taken as the larger of two summation orders of its Gram (one bmm
    # over N; four N-chunks added), so that the bound does not hinge on one order's luck.
    err32 = max(max_err(_cam_fp32_gram(x, g, mode, chunks), oracle) for chunks in (1, 4))
    err = max_err(ours, oracle)
    assert err <= 2.0 * err32, f"error {err:.2e} > 2x the fp32 reference's {err32:.2e}"
    try:   # the naive fp16 computation, side by side
        naive = reference.channel_attention(x, g.half(), mode)
    except RuntimeError as exc:  # fp16 bmm not implemented on this device/build
        pytest.skip(f"naive fp16 bmm unsupported here: {exc}")
    assert not torch.isfinite(naive).all(), "the naive fp16 Gram was expected to overflow"


@pytest.mark.parametrize("mode", MODES)
def test_nan_propagates_like_reference(mode):
    x, g = cam_inputs(1, 6, 5, 5)
    x[0, 2, 1, 1] = float("nan")
    ours = channel_attention(x, g, mode=mode, backend="cpu")
    ref = reference.channel_attention(x, g, mode)
    assert torch.equal(ours.isnan(), ref.isnan()) and ours.isnan().any()
    # ... and exactly there: the finite entries are the reference's.
    assert max_err(torch.nan_to_num(ours), torch.nan_to_num(ref)) <= 1e-5 * ref.nan_to_num().abs().max()


@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (2, 4, 0, 5)])
@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_empty(shape, backend):
    x, g = cam_inputs(*shape)
    x.requires_grad_()
    y = channel_attention(x, g, backend=backend)
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


# ----------------------------------------------------------------------------- issue 15: CPU
@pytest.mark.parametrize("lowp", ["0", "1"], ids=["fp32-tiles", "lowp-tiles"])
@pytest.mark.parametrize("mode", MODES)
def test_lowp_path_forced(monkeypatch, mode, lowp):
    # DANET_OPS_CPU_LOWP=1: bf16/fp16 products with fp32 accumulation (the Gram always sums in
    # fp32); =0: fp32 products. Policy: 2x the reference's own error in that dtype.
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", lowp)
    for dtype in (torch.float16, torch.bfloat16):
        _compare(cam_inputs(2, 16, 23, 29, dtype=dtype), mode, FLOOR[dtype])


@pytest.mark.parametrize("mode", MODES)
def test_fp16_gram_overflow_stays_finite_on_lowp_path(monkeypatch, mode):
    # fp16 products on the low-precision path still sum the Gram in fp32: no overflow.
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", "1")
    test_fp16_gram_overflow_stays_finite(mode)


@pytest.mark.parametrize("mode", MODES)
def test_inference_form_matches_training_form(mode):
    # Under no_grad the op runs its inference form (no attn, no O kept beside y): same bits.
    x, g = cam_inputs(1, 24, 13, 17)
    train = channel_attention(x.clone().requires_grad_(), g, mode=mode, backend="cpu")
    with torch.inference_mode():
        infer = channel_attention(x, g, mode=mode, backend="cpu")
    assert infer.dtype == train.dtype and torch.equal(infer, train.detach())
