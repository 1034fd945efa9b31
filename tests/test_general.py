"""The general op (SPEC §1 "Generalisation"): E = scale * qᵀk with keys/values of their own length
Nk, the PositionAttention scale / kv_pool options, and the attention maps, against the float64
oracle. The Triton and CUDA kernels' own Nk != Nq / scale cases live in test_triton.py and
test_cuda_emu.py."""
import pytest
import torch
import torch.nn.functional as F

import danet_ops
from danet_ops import PositionAttention, position_attention, reference, testing
from conftest import FLOOR, make, max_err, run_with_grads, to64

NAMES = ("y", "dq", "dk", "dv", "dx", "dgamma")
BACKENDS = ["reference", "cpu"]


def general_inputs(B, Cq, Cv, q_hw, k_hw, dtype=torch.float64, layout="contiguous", seed=0,
                   residual=True):
    """q [B, Cq, *q_hw], k [B, Cq, *k_hw], v [B, Cv, *k_hw], x [B, Cv, *q_hw] (hw: (H, W) or (N,))."""
    gen = torch.Generator().manual_seed(seed)

    def t(C, hw, s=1.0):
        shape = (B, C, *hw) if len(hw) == 2 else (B, C, hw[0], 1)
        out = make(shape, dtype, layout, gen, s)
        return out if len(hw) == 2 else out.flatten(2)
    q, k, v = t(Cq, q_hw, 0.5), t(Cq, k_hw, 0.5), t(Cv, k_hw)
    if not residual:
        return [q, k, v, None, None]
    return [q, k, v, t(Cv, q_hw), torch.tensor([0.7], dtype=torch.float64 if dtype == torch.float64
                                                else torch.float32)]


def oracle(q, k, v, x=None, gamma=None, scale=1.0):
    """The formula, written out independently of danet_ops.reference (float64)."""
    q3, k3, v3 = (t.double().flatten(2) for t in (q, k, v))
    a = torch.softmax(scale * torch.einsum("bci,bcj->bij", q3, k3), dim=-1)
    o = torch.einsum("bcj,bij->bci", v3, a).reshape(v.shape[0], v.shape[1], *q.shape[2:])
    return o if gamma is None else gamma.double() * o + x.double()


CASES = [  # (B, Cq, Cv, q spatial, k spatial, scale)   Nq vs Nk: fewer, more, one, ragged
    (2, 8, 16, (12, 10), (6, 5), 1.0),          # SAGAN-official: keys pooled 2x2, Nk = Nq / 4
    (1, 4, 12, (9, 7), (110,), 4 ** -0.5),      # ANN: a pyramid of 110 pooled keys, 1/sqrt(d)
    (2, 6, 5, (5, 3), (19,), 6 ** -0.5),        # OCR: class-region keys [B, C, K]
    (1, 3, 4, (7, 7), (1,), 2.0),               # Nk = 1: A = 1 everywhere
    (1, 5, 9, (17, 1), (300,), 0.3),            # Nk > Nq, ragged past a 256 block
    (2, 8, 16, (6, 6), (6, 6), 1.0),            # DANet itself
]


def _ids(c):
    return f"B{c[0]}-Cq{c[1]}-Cv{c[2]}-q{'x'.join(map(str, c[3]))}-k{'x'.join(map(str, c[4]))}-s{c[5]:.2g}"


def test_reference_is_the_formula():
    for c in CASES:
        q, k, v, x, g = general_inputs(*c[:5])
        assert max_err(reference.position_attention(q, k, v, x, g, c[5]), oracle(q, k, v, x, g, c[5])) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_general_op_matches_oracle(case, dtype, backend):
    inputs = general_inputs(*case[:5], dtype=dtype)
    fn = lambda *t: position_attention(*t, scale=case[5], backend=backend)  # noqa: E731
    got, _ = testing.compare_pam(fn, inputs, FLOOR[dtype], scale=case[5])
    assert got.shape == (case[0], case[2], *case[3]) if len(case[3]) == 2 else True


@pytest.mark.parametrize("backend", BACKENDS)
def test_general_layouts_and_no_residual(backend):
    # channels_last q with contiguous pooled k, v; and O alone (no x, gamma).
    q, k, v, x, g = general_inputs(1, 4, 8, (8, 6), (4, 3), layout="channels_last")
    k, v = k.contiguous(), v.contiguous()
    fn = lambda *t: position_attention(*t, scale=0.5, backend=backend)      # noqa: E731
    testing.compare_pam(fn, [q, k, v, x, g], FLOOR[torch.float64], scale=0.5)
    testing.compare_pam(fn, [q, k, v, None, None], FLOOR[torch.float64], scale=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_general_gradcheck(backend):
    q, k, v, x, g = [t.requires_grad_() for t in general_inputs(1, 3, 4, (3, 2), (5,))]
    fn = lambda *t: position_attention(*t, scale=0.7, backend=backend)      # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, x, g))


def test_scale_one_is_danet_bitwise():
    q, k, v, x, g = general_inputs(1, 4, 8, (5, 5), (5, 5), dtype=torch.float32)
    for backend in BACKENDS:
        a = position_attention(q, k, v, x, g, backend=backend)
        b = position_attention(q, k, v, x, g, scale=1.0, backend=backend)
        assert torch.equal(a, b)


def test_empty_keys_or_queries():
    q, k, v, x, g = general_inputs(1, 4, 8, (3, 3), (0,), dtype=torch.float32)
    for backend in ["auto"] + BACKENDS:
        out = position_attention(q, k, v, x, g, backend=backend)
        assert out.shape == x.shape
    q, k, v, x, g = general_inputs(1, 4, 8, (0,), (5,), dtype=torch.float32)
    assert position_attention(q, k, v, x, g, backend="cpu").shape == (1, 8, 0)


# ------------------------------------------------------------------------------- module options
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_kv_pool_and_scale(backend):
    torch.manual_seed(0)
    m = PositionAttention(16, reduction=4, backend=backend, scale=0.25, kv_pool=2).double()
    with torch.no_grad():
        m.gamma.fill_(0.6)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64, requires_grad=True)
    y = m(x)
    k = F.max_pool2d(m.key_conv(x), 2)            # floor: 4 x 3 = 12 key positions
    v = F.max_pool2d(m.value_conv(x), 2)
    want = oracle(m.query_conv(x), k, v, x, m.gamma, 0.25)
    assert k.shape[-2:] == (4, 3) and max_err(y, want) < 1e-12
    y.sum().backward()
    assert x.grad.isfinite().all() and m.key_conv.weight.grad.abs().sum() > 0
    # The parameters are DANet's whatever the options: a default module's state dict loads.
    m.load_state_dict(PositionAttention(16, reduction=4).double().state_dict(), strict=True)
    assert "kv_pool=2" in repr(m) and "scale=0.25" in repr(m)
    with pytest.raises(ValueError, match="kv_pool"):
        PositionAttention(16, kv_pool=0)
    with pytest.raises(ValueError, match="kv_pool=2 needs H, W >= 2"):
        m(torch.randn(1, 16, 1, 5, dtype=torch.float64))


# ------------------------------------------------------------------------------- attention maps
def test_attention_map_rows():
    q, k, v, _, _ = general_inputs(2, 4, 8, (6, 5), (4, 4), dtype=torch.float32)
    index = [0, 7, 29]
    rows = danet_ops.attention_map(q, k, index, scale=0.5)
    full = torch.softmax(0.5 * torch.einsum("bci,bcj->bij", q.double().flatten(2),
                                             k.double().flatten(2)), dim=-1)
    assert rows.shape == (2, 3, 16) and rows.dtype == torch.float32
    testing.check_bound("A rows", max_err(rows, full[:, index]), 1e-6, "ulps")  # fp32: a few ulp of P
    testing.check_bound("row sums", max_err(rows.sum(-1), torch.ones(2, 3)), 1e-6, "ulps")
    assert danet_ops.attention_map(q.double(), k.double(), torch.tensor([3])).dtype == torch.float64
    # Only the asked rows are computed: O(len(index) * Nk) memory. The computation is
    # traced with meta tensors, so nothing of size Nq x Nk can be hiding in it.
    big_q = torch.empty(1, 8, 4096, device="meta")
    assert danet_ops.attention_map(big_q, big_q, [1, 2]).shape == (1, 2, 4096)
    with pytest.raises(ValueError, match=r"index must lie in \[0, Nq = 30\)"):
        danet_ops.attention_map(q, k, [30])
    with pytest.raises(ValueError, match="1-D sequence of integer"):
        danet_ops.attention_map(q, k, torch.tensor([0.5]))


@pytest.mark.parametrize("mode", ["original", "paper"])
def test_channel_attention_map(mode):
    x = 0.2 * torch.randn(2, 6, 5, 4, dtype=torch.float64)
    a = danet_ops.channel_attention_map(x, mode)
    e = torch.einsum("bcn,bdn->bcd", x.flatten(2), x.flatten(2))
    want = torch.softmax(-e if mode == "original" else e, dim=-1)
    assert a.shape == (2, 6, 6) and max_err(a, want) < 1e-12
    # Applying the map is CAM: A a = O.
    o = torch.bmm(a, x.flatten(2)).view_as(x)
    assert max_err(o, reference.channel_attention(x, None, mode)) < 1e-12
    # fp16 input whose Gram exceeds 65504: finite (fp32 accumulation).
    xh = (6.0 + torch.randn(1, 8, 40, 40)).half()
    assert danet_ops.channel_attention_map(xh, mode).isfinite().all()
