"""The op contract (danet_ops/_contract.py) is the one source of the limits and modes: the
generated C++ header matches it, and every backend that runs here accepts the boundary values
and refuses the values just past them, before any kernel runs."""
from pathlib import Path

import pytest
import torch

import danet_ops  # noqa: F401  (registers torch.ops.danet_ops)
from danet_ops import _contract, channel_attention, position_attention
from conftest import backend_params, device_for

ROOT = Path(__file__).resolve().parent.parent


def test_cpp_header_is_generated_from_the_contract():
    committed = (ROOT / "csrc" / "contract.h").read_text()
    assert committed == _contract.header(), \
        "csrc/contract.h is stale: run `python -m danet_ops._contract > csrc/contract.h`"


@pytest.mark.parametrize("backend_id", backend_params())
def test_pam_channel_limits_at_the_boundary(backend_id):
    # Every backend that can run in this process (conftest.BACKENDS: the interpreted Triton in
    # the `-m interpreter` invocation, triton/cuda on a GPU); the others skip, saying why.
    backend, device = device_for(backend_id, "pam")
    N = 3
    for Cq, Cv, ok in [(_contract.CQ_MIN, 2, True), (_contract.CQ_MAX, 2, True),
                       (_contract.CQ_MAX + 1, 2, False), (2, _contract.CV_MIN, True),
                       (2, _contract.CV_MAX, True), (2, _contract.CV_MAX + 1, False)]:
        q = torch.randn(1, Cq, N, device=device) * 0.1
        v = torch.randn(1, Cv, N, device=device)
        if ok:
            out = position_attention(q, q, v, backend=backend)
            ref = position_attention(q, q, v, backend="reference")
            assert out.shape == (1, Cv, N) and torch.allclose(out, ref, atol=1e-5), (Cq, Cv)
        else:
            with pytest.raises(ValueError, match="outside the supported range"):
                position_attention(q, q, v, backend=backend)


@pytest.mark.parametrize("backend_id", backend_params())
def test_cam_modes_and_channel_cap(backend_id):
    backend, device = device_for(backend_id, "cam")
    x = torch.randn(1, 3, 4, device=device)
    for mode in _contract.CAM_MODES:
        assert channel_attention(x, mode=mode, backend=backend).shape == x.shape
    with pytest.raises(ValueError, match="mode must be one of"):
        channel_attention(x, mode="Original", backend=backend)
    cap = _contract.CAM_C_MAX.get(backend)
    if cap is not None:           # only the CUDA kernels have a C cap: at it, and one past it
        assert channel_attention(torch.randn(1, cap, 1, device=device), backend=backend).shape[1] == cap
        with pytest.raises(ValueError, match=f"exceeds the 'cuda' backend's limit {cap}"):
            channel_attention(torch.randn(1, cap + 1, 1, device=device), backend=backend)


def test_cam_cap_is_checked_before_the_kernel(monkeypatch):
    # The CUDA cap logic, exercised on CPU: resolve as if the chosen backend were "cuda".
    from danet_ops import backends
    monkeypatch.setattr(backends, "resolve", lambda *a, **k: "cuda")
    monkeypatch.setattr(backends.get("cuda"), "cam_forward",
                        lambda *a: (_ for _ in ()).throw(AssertionError))
    cap = _contract.CAM_C_MAX["cuda"]
    with pytest.raises(ValueError, match=f"C = {cap + 1} exceeds the 'cuda' backend's limit"):
        channel_attention(torch.zeros(1, cap + 1, 1))


def test_output_dtype_rule():
    f16, f32, f64, bf = torch.float16, torch.float32, torch.float64, torch.bfloat16
    assert _contract.output_dtype(f16) == f16
    assert _contract.output_dtype(bf, f32, f32) == f32          # autocast: bf16 v, fp32 x
    assert _contract.output_dtype(f16, f16, f32) == f32          # gamma is a [1] fp32 tensor
    assert _contract.output_dtype(f64, f64, f64) == f64
    q = torch.randn(1, 2, 5, dtype=bf)
    y = position_attention(q, q, q, torch.randn(1, 2, 5), torch.ones(1), backend="cpu")
    assert y.dtype == _contract.output_dtype(bf, f32, f32)


def test_compiled_ops_follow_the_output_dtype_rule():
    # csrc/dtype_rules.h is the C++ twin of _contract.output_dtype (CPU kernels, CUDA bindings):
    # every (value, x, gamma) dtype combination gives the dtype the Python rule (and the fakes) say.
    dts = _contract.FLOAT_DTYPES
    for vt in dts:
        q = torch.randn(1, 2, 5, dtype=vt)
        v = torch.randn(1, 3, 5, dtype=vt)
        for xt in dts:
            for gt in dts:
                x, g = torch.randn(1, 3, 5, dtype=xt), torch.tensor([0.5], dtype=gt)
                _, _, y = torch.ops.danet_ops.pam_forward(q, q, v, x, g, 1.0)
                assert y.dtype == _contract.output_dtype(vt, xt, gt), (vt, xt, gt, y.dtype)
                xc = torch.randn(1, 3, 5, dtype=vt)
                _, _, yc = torch.ops.danet_ops.cam_forward(xc, g, "original")
                assert yc.dtype == _contract.output_dtype(vt, vt, gt), (vt, gt, yc.dtype)
