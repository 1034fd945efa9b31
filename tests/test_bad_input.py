"""Every bad-input class raises a clear error naming the argument, before any kernel."""
import pytest
import torch

import danet_ops
from danet_ops import channel_attention, position_attention
from conftest import pam_inputs

BACKENDS = ["auto", "reference", "cpu"]


def _pam(B=1, Cq=4, Cv=8, H=5, W=5, dtype=torch.float32):
    return list(pam_inputs(B, Cq, Cv, H, W, dtype=dtype))


def _cases():
    q, k, v, x, g = _pam()
    yield "rank", (q[0, 0], k[0, 0], v[0, 0], x[0, 0], g), r"q must be \[B, C, H, W\].*\(5, 5\)"
    yield "rank5", (q[None], k[None], v[None], x[None], g), r"q must be .*\(1, 1, 4, 5, 5\)"
    yield "k/v rank", (q, k, v.flatten(2), x.flatten(2), g), "k and v must have the same rank"
    yield "B mismatch", (q, k, torch.cat([v, v]), torch.cat([x, x]), g), r"batch size B.*v \(2, 8, 5, 5\)"
    yield "N mismatch v", (q, k, v[..., :4], x[..., :4], g), r"spatial size.*v \(1, 8, 5, 4\)"
    yield "q/k channels", (q, k[:, :2], v, x, g), r"same number of channels Cq.*k \(1, 2, 5, 5\)"
    yield "k/v positions", (q, k[..., :3], v, x, g), r"k and v must have the same spatial size"
    big_q = torch.randn(1, 257, 5, 5)
    yield "Cq range", (big_q, big_q, v, x, g), r"Cq = 257 outside .*1\.\.256"
    wide_v = torch.randn(1, 4097, 1, 2)
    qq = torch.randn(1, 4, 1, 2)
    yield "Cv range", (qq, qq, wide_v, None, None), r"Cv = 4097 outside .*1\.\.4096"
    yield "x shape", (q, k, v, x[:, :3], g), r"x must have the output's shape .* \(1, 8, 5, 5\); got x \(1, 3, 5, 5\)"
    # Nk != Nq is legal; x must then have q's positions, not k's.
    yield "x has k's positions", (q, k[..., :3], v[..., :3], x[..., :3], g), r"output's shape .*\(1, 8, 5, 5\)"
    yield "scale type", (q, k, v, x, g, "cpu"), r"scale must be a real number.*backend= by keyword"
    yield "scale inf", (q, k, v, x, g, float("inf")), "scale must be finite"
    yield "x without gamma", (q, k, v, x, None), "give both x and gamma"
    yield "gamma without x", (q, k, v, None, g), "give both x and gamma"
    yield "gamma numel", (q, k, v, x, torch.ones(2)), r"gamma must have one element; got shape \(2,\)"
    yield "int dtype", (q.long(), k.long(), v.long(), x, g), "q has unsupported dtype torch.int64"
    yield "complex dtype", (q, k, v, x.to(torch.complex64), g), "x has unsupported dtype torch.complex64"
    yield "dtype mismatch", (q, k.double(), v, x, g), "q, k, v must share one dtype"
    yield "device", (q, k, v.to("meta"), x, g), r"one device; got .*v on meta"
    yield "not a tensor", (q.numpy(), k, v, x, g), "q must be a torch.Tensor"


def _forbid_kernels(monkeypatch, op):
    """"Before any kernel runs": the reference and every backend's forward of `op` ("pam" | "cam")
    raise if reached."""
    def boom(*a, **kw):
        raise AssertionError("kernel reached")
    monkeypatch.setattr(danet_ops.reference, {"pam": "position_attention", "cam": "channel_attention"}[op], boom)
    for b in danet_ops.backends.REGISTRY.values():
        monkeypatch.setattr(b, f"{op}_forward", boom)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_pam_bad_input(case, backend, monkeypatch):
    _, args, pattern = case
    _forbid_kernels(monkeypatch, "pam")
    with pytest.raises((ValueError, TypeError), match=pattern):
        position_attention(*args, backend=backend)


def _cam_cases():
    x = torch.randn(1, 6, 4, 4)
    g = torch.zeros(1)
    yield "rank", (x[0, 0], g, "original"), r"x must be .*\(4, 4\)"
    yield "mode", (x, g, "Original"), "mode must be one of"
    yield "dtype", (x.int(), g, "original"), "x has unsupported dtype torch.int32"
    yield "gamma numel", (x, torch.zeros(3), "paper"), "gamma must have one element"
    yield "device", (x, g.to("meta"), "original"), "one device"
    yield "zero channels", (torch.randn(1, 0, 4, 4), g, "original"), "at least one channel"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_cam_cases()), ids=lambda c: c[0])
def test_cam_bad_input(case, backend, monkeypatch):
    _, (x, g, mode), pattern = case
    _forbid_kernels(monkeypatch, "cam")
    with pytest.raises((ValueError, TypeError), match=pattern):
        channel_attention(x, g, mode=mode, backend=backend)


def test_unknown_backend():
    q, k, v, x, g = _pam()
    with pytest.raises(ValueError, match="backend must be one of"):
        position_attention(q, k, v, x, g, backend="fast")


@pytest.mark.parametrize("backend,why", [("cuda", "CUDA tensors"), ("triton", "triton")])
def test_unavailable_backend_says_why_and_what_to_do(backend, why, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, x, g = _pam()
    with pytest.raises(danet_ops.BackendUnavailableError, match=why) as err:
        position_attention(q, k, v, x, g, backend=backend)
    assert "To fix" in str(err.value)


def test_cpu_backend_rejects_other_devices():
    q, k, v, x, g = [t.to("meta") for t in _pam()]
    with pytest.raises(danet_ops.BackendUnavailableError, match="runs on CPU tensors"):
        position_attention(q, k, v, x, g, backend="cpu")
