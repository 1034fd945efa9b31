"""torch.library integration of the compiled ops: opcheck, torch.compile, autocast."""
import pytest
import torch

import danet_ops
from danet_ops import ChannelAttention, PositionAttention
from conftest import max_err, pam_inputs

ops = torch.ops.danet_ops


def _flat(*ts):
    return [None if t is None else t.flatten(2) for t in ts]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_pam(residual, layout):
    q, k, v, x, g = pam_inputs(2, 4, 6, 5, 3, dtype=torch.float64, layout=layout, residual=residual)
    args = _flat(q, k, v, x) + [g]
    args = [None if a is None else a.requires_grad_() for a in args]
    torch.library.opcheck(ops.pam_forward.default, tuple(args))
    o, lse, y = ops.pam_forward(*[None if a is None else a.detach() for a in args])
    dy = torch.randn_like(o)
    torch.library.opcheck(ops.pam_backward.default, (dy, args[0].detach(), args[1].detach(),
                                                      args[2].detach(), o, lse,
                                                      None if g is None else g.detach()))


def test_double_backward_is_refused_not_silently_wrong():
    q, k, v, x, g = [t.requires_grad_() for t in pam_inputs(1, 2, 3, 4, 4, dtype=torch.float64)]
    y = danet_ops.position_attention(q, k, v, x, g, backend="cpu")
    (dq,) = torch.autograd.grad(y.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


def _compiled_matches_eager(module, x, backend):
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    ye = module(xe)
    ye.sum().backward()
    ge = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    yc = compiled(xc)
    yc.sum().backward()
    assert max_err(yc, ye) < 1e-4
    assert max_err(xc.grad, xe.grad) < 1e-4
    for p, g in zip(module.parameters(), ge):
        assert max_err(p.grad, g) < 1e-3


def _pam_module():
    torch.manual_seed(0)
    m = PositionAttention(16, backend="cpu")
    with torch.no_grad():
        m.gamma.fill_(0.5)
    return m


def test_compile_fullgraph_pam_aot_eager():
    # fullgraph=True raises on any graph break; aot_eager runs AOTAutograd (fake kernels +
    # registered autograd) without the C++ code generation cost.
    _compiled_matches_eager(_pam_module(), torch.randn(2, 16, 7, 9), "aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_pam_inductor():
    _compiled_matches_eager(_pam_module(), torch.randn(2, 16, 7, 9), "inductor")


def test_autocast_cpu_bf16_pam():
    m = _pam_module()
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert torch.isfinite(y).all()
    assert max_err(y, y32) < 0.1 * y32.abs().max().item()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.gamma.grad).all()
    assert m.query_conv.weight.grad is not None
