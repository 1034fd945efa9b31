"""torch.library.opcheck of every op of every fused backend in danet_ops.backends.REGISTRY that
this process can run: the schema, the fake kernel against the real outputs (shapes, dtypes,
strides), the autograd registration and AOT dispatch with dynamic shapes.

Each op in fp32 and bf16, with and without the residual (x, gamma), on contiguous and on
channels-last-like [B, C, N] tensors (unit stride along C: what flatten(2) of a channels_last
map gives); PAM with keys of their own length (Nk != Nq) and a scale != 1. Backends by
conftest.BACKENDS: "cpu" (with its inference forms) in every run, "triton" on CPU tensors under
the Triton interpreter (`TRITON_INTERPRET=1 pytest -m interpreter`), "cuda" and "triton" on
CUDA tensors marked gpu.
"""
import pytest
import torch

from danet_ops import backends
from conftest import BACKENDS, backend_grid, device_for

DTYPES = [torch.float32, torch.bfloat16]
# every target (backend x device) whose backend has ops, in the dtypes it runs; of the CPU paths
# for fp16/bf16 the low-precision one (the op files allocate the outputs the fakes describe
# before choosing a path, so one path checks the registration)
FUSED = [i for i, t in BACKENDS.items() if backends.get(t.backend).ops and i != "cpu-fp32tiles"]
GRID = backend_grid(["ops"], DTYPES, backends=FUSED)
LAYOUTS = ["contiguous", "channels_last"]


def _bcn(B, C, N, dtype, layout, device, gen, scale=1.0):
    t = (torch.randn(B, N, C, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    t = t.transpose(1, 2)                               # [B, C, N], unit stride along C
    return t if layout == "channels_last" else t.contiguous()


def _gamma(dtype, device, value):
    return torch.tensor([value], dtype=torch.float32 if dtype != torch.float64 else dtype, device=device)


def _grad(args):
    return tuple(None if t is None else t.detach().requires_grad_() for t in args)


def _plain(args):
    return tuple(None if t is None else t.detach() for t in args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("backend,case,dtype", GRID)
def test_pam_ops(backend, case, dtype, residual, layout):
    name, device = device_for(backend, "pam", dtype)
    backend = backends.get(name)
    backend.prepare()                                   # loads (or builds) the C++ ops
    gen = torch.Generator().manual_seed(0)
    B, Cq, Cv, Nq, Nk, scale = 2, 3, 4, 7, 5, 0.35
    q = _bcn(B, Cq, Nq, dtype, layout, device, gen, 0.5)
    k = _bcn(B, Cq, Nk, dtype, layout, device, gen, 0.5)
    v = _bcn(B, Cv, Nk, dtype, layout, device, gen)
    x, g = (_bcn(B, Cv, Nq, dtype, layout, device, gen), _gamma(dtype, device, 0.7)) if residual else (None, None)

    torch.library.opcheck(backend.op("pam_forward"), _grad((q, k, v, x, g)) + (scale,))
    o, lse, _ = backend.op("pam_forward")(q, k, v, x, g, scale)
    assert o.shape == (B, Cv, Nq) and lse.shape == (B, Nq)
    dy = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=o.dtype)
    torch.library.opcheck(backend.op("pam_backward"), (dy, q, k, v, o, lse, g, scale))
    if "pam_forward_inference" in backend.ops:     # used only when no gradient is taken
        torch.library.opcheck(backend.op("pam_forward_inference"), _plain((q, k, v, x, g)) + (scale,))


@pytest.mark.parametrize("mode", ["original", "paper"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("backend,case,dtype", GRID)
def test_cam_ops(backend, case, dtype, residual, layout, mode):
    name, device = device_for(backend, "cam", dtype)
    backend = backends.get(name)
    backend.prepare()                                   # loads (or builds) the C++ ops
    gen = torch.Generator().manual_seed(0)
    x = _bcn(2, 5, 12, dtype, layout, device, gen, 0.3)
    g = _gamma(dtype, device, 0.4) if residual else None

    torch.library.opcheck(backend.op("cam_forward"), _grad((x, g)) + (mode,))
    o, attn, _ = backend.op("cam_forward")(x, g, mode)
    assert o.shape == x.shape and attn.shape == (2, 5, 5)
    dy = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=o.dtype)
    torch.library.opcheck(backend.op("cam_backward"), (dy, x, attn, o, g, mode))
    if "cam_forward_inference" in backend.ops:
        torch.library.opcheck(backend.op("cam_forward_inference"), (x, g, mode))


def test_every_backend_with_ops_is_checked():
    # The matrix above comes from the registry: a backend with ops and no test id would be unchecked.
    checked = {BACKENDS[p.values[0]].backend for p in GRID}
    assert checked == {name for name, b in backends.REGISTRY.items() if b.ops}
