"""The general op around its kernels: E = scale * qᵀk with keys/values of their own length Nk is
the reference's formula; PositionAttention's scale / kv_pool options; the attention maps. The op
itself (every backend, dtype and layout, with scale and Nk != Nq) is in test_pam.py's matrix."""
import pytest
import torch
import torch.nn.functional as F

import danet_ops
from danet_ops import PositionAttention, position_attention, reference, testing
from conftest import GENERAL_CASES as CASES, general_inputs, max_err

BACKENDS = ["reference", "cpu"]


def oracle(q, k, v, x=None, gamma=None, scale=1.0):
    """The formula, written out independently of danet_ops.reference (float64)."""
    q3, k3, v3 = (t.double().flatten(2) for t in (q, k, v))
    a = torch.softmax(scale * torch.einsum("bci,bcj->bij", q3, k3), dim=-1)
    o = torch.einsum("bcj,bij->bci", v3, a).reshape(v.shape[0], v.shape[1], *q.shape[2:])
    return o if gamma is None else gamma.double() * o + x.double()




def test_reference_is_the_formula():
    for c in CASES:
        q, k, v, x, g = general_inputs(*c[:5])
        assert max_err(reference.position_attention(q, k, v, x, g, c[5]), oracle(q, k, v, x, g, c[5])) < 1e-12


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
