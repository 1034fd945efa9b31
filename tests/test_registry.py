"""torch.library integration of the compiled ops: registered autograd (double backward refused),
torch.compile, autocast, the general PAM op's schema and gradients. opcheck of every op of
every backend: tests/test_opcheck.py."""
import copy

import pytest
import torch

import danet_ops
from danet_ops import ChannelAttention, PositionAttention
from conftest import compiled_matches_eager, max_err, pam_inputs

ops = torch.ops.danet_ops


def test_double_backward_is_refused_not_silently_wrong():
    q, k, v, x, g = [t.requires_grad_() for t in pam_inputs(1, 2, 3, 4, 4, dtype=torch.float64)]
    y = danet_ops.position_attention(q, k, v, x, g, backend="cpu")
    (dq,) = torch.autograd.grad(y.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


def _pam_module():
    torch.manual_seed(0)
    m = PositionAttention(16, backend="cpu")
    with torch.no_grad():
        m.gamma.fill_(0.5)
    return m


def test_compile_fullgraph_pam_aot_eager():
    # fullgraph=True raises on any graph break; aot_eager runs AOTAutograd (fake kernels +
    # registered autograd) without the C++ code generation cost.
    compiled_matches_eager(_pam_module(), torch.randn(2, 16, 7, 9), "aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_pam_inductor():
    compiled_matches_eager(_pam_module(), torch.randn(2, 16, 7, 9), "inductor")


def _autocast_error(m, x):
    """Error of m(x) under bf16 autocast vs the float64 module, and the policy's bound: 2x the
    error of the same module run with backend="reference" under the same autocast (both see the
    same bf16 convolutions; the attention is what differs). y ~ x + gamma*O, so the check is on
    y - x, the attention's share: y itself would hide a wrong attention at gamma = 0.5."""
    m64 = copy.deepcopy(m).double()
    m64.backend = "reference"
    want = m64(x.detach().double()) - x.detach().double()
    mref = copy.deepcopy(m)
    mref.backend = "reference"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yref = m(x), mref(x)
    return y, max_err(y - x, want), 2.0 * max_err(yref - x, want)


def test_autocast_cpu_bf16_pam():
    m = _pam_module()
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    y, err, bound = _autocast_error(m, x)
    assert torch.isfinite(y).all()
    assert 0 < err <= bound, (err, bound)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.gamma.grad).all()
    assert m.query_conv.weight.grad is not None


def _cam_module(mode):
    m = ChannelAttention(mode=mode, backend="cpu")
    with torch.no_grad():
        m.gamma.fill_(0.5)
    return m


@pytest.mark.parametrize("mode", ["original", "paper"])
def test_compile_fullgraph_cam_aot_eager(mode):
    compiled_matches_eager(_cam_module(mode), 0.3 * torch.randn(2, 16, 7, 9), "aot_eager")


def test_compile_fullgraph_danet_head_like_model():
    # Both attentions in one graph, as in the DANet head.
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pam = _pam_module()
            self.cam = _cam_module("original")

        def forward(self, x):
            return self.pam(x) + self.cam(x)

    compiled_matches_eager(Head(), 0.3 * torch.randn(1, 16, 6, 6), "aot_eager")


def test_autocast_cpu_bf16_cam():
    m = _cam_module("original")
    x = (0.3 * torch.randn(2, 16, 9, 9)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert torch.isfinite(y).all() and y.dtype == torch.float32   # promote(bf16 x, fp32 gamma)
    want = m.gamma.detach().double() * (
        danet_ops.reference.channel_attention(x.detach().bfloat16().double(), None, "original"))
    yref = danet_ops.reference.channel_attention(x.bfloat16(), m.gamma, "original")
    got, ref = (y - x.bfloat16()).double(), (yref - x.bfloat16()).double()
    # 2x the reference's own error in bf16 (its Gram and products in bf16), attention share only.
    assert max_err(got, want) <= 2.0 * max_err(ref, want), (max_err(got, want), max_err(ref, want))
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.gamma.grad).all()


# ----------------------------------------------------------------------------- general PAM op
# pam_forward / pam_backward take `scale` (E = scale * q^T k) and keys/values with their
# own number of positions Nk (k [B, Cq, Nk], v [B, Cv, Nk]; o, y, x: [B, Cv, Nq]).
def _general(B, Cq, Cv, Nq, Nk, residual=True, layout="contiguous", dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def mk(c, n, s):
        t = torch.randn(B, n, c, generator=gen, dtype=dtype) * s
        # channels_last-like [B, C, N] view (unit stride along C), or contiguous
        return t.transpose(1, 2) if layout == "channels_last" else t.transpose(1, 2).contiguous()
    q, k, v = mk(Cq, Nq, 0.5), mk(Cq, Nk, 0.5), mk(Cv, Nk, 1.0)
    if not residual:
        return [q, k, v, None, None]
    return [q, k, v, mk(Cv, Nq, 1.0), torch.tensor([0.7], dtype=dtype)]


def test_compiled_schemas_have_scale():
    assert str(ops.pam_forward.default._schema) == (
        "danet_ops::pam_forward(Tensor q, Tensor k, Tensor v, Tensor? x, Tensor? gamma, "
        "float scale=1.) -> (Tensor, Tensor, Tensor)")
    assert str(ops.pam_backward.default._schema) == (
        "danet_ops::pam_backward(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
        "Tensor? gamma, float scale=1.) -> (Tensor, Tensor, Tensor, Tensor)")


@pytest.mark.parametrize("nq,nk,scale", [(7, 3, 0.35), (3, 8, -1.5), (5, 1, 0.6)])
def test_gradcheck_general_cpu_op_float64(nq, nk, scale):
    # Through the registered autograd (forward op -> backward op), in float64: q, k, v, x, gamma.
    leaves = [t.requires_grad_() for t in _general(2, 3, 4, nq, nk)]

    def fn(q, k, v, x, g):
        return ops.pam_forward(q, k, v, x, g, scale)[2]
    assert torch.autograd.gradcheck(fn, tuple(leaves))
    q, k, v, _, _ = [t if t is None else t.detach().requires_grad_()
                     for t in _general(1, 2, 3, nq, nk, residual=False, seed=1)]
    assert torch.autograd.gradcheck(lambda *t: ops.pam_forward(*t, None, None, scale)[0], (q, k, v))


def test_general_cpu_op_matches_naive_float64_and_scale_one_is_default():
    q, k, v, x, g = _general(2, 5, 6, 300, 77)          # Nq ragged against the 256 tile
    e = torch.bmm(q.transpose(1, 2), k) * 0.3
    want = g * torch.bmm(v, torch.softmax(e, -1).transpose(1, 2)) + x
    o, lse, y = ops.pam_forward(q, k, v, x, g, 0.3)
    assert max_err(y, want) < 1e-12 and max_err(lse, torch.logsumexp(e, -1)) < 1e-12  # fp64 sums
    a, b = ops.pam_forward(q, k, v, x, g), ops.pam_forward(q, k, v, x, g, 1.0)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_general_torch_compile_fullgraph_nk_ne_nq():
    q, k, v, x, g = _general(1, 4, 6, 12, 5, dtype=torch.float32)

    def f(q, k, v, x, g):
        return ops.pam_forward(q, k, v, x, g, 0.5)[2]
    want = f(q, k, v, x, g)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, x, g)
    assert torch.equal(got, want)
