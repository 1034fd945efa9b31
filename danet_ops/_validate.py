"""Input checks, run before any kernel: wrong rank, mismatched shapes, Cq / Cv out of range, a
device mismatch, an unsupported dtype, and a backend's own limits. Each error names the
argument and the shapes or dtypes seen."""
import math

import torch

from . import _contract
from ._contract import CAM_MODES, FLOAT_DTYPES

CQ_RANGE = (_contract.CQ_MIN, _contract.CQ_MAX)
CV_RANGE = (_contract.CV_MIN, _contract.CV_MAX)


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {t.dtype}; expected one of "
                         f"float16, bfloat16, float32, float64")


def _rank(name, t):
    if t.dim() not in (3, 4):
        raise ValueError(f"{name} must be [B, C, H, W] or [B, C, N]; got shape {tuple(t.shape)}")


def _same_device(named):
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {seen}")


def as_gamma(gamma, like):
    """gamma as a 1-element tensor view of shape [1] (accepts 0-dim, [1], or a Python number)."""
    if gamma is None:
        return None
    if not isinstance(gamma, torch.Tensor):
        gamma = torch.tensor([float(gamma)], dtype=torch.float32, device=like.device)
    if gamma.numel() != 1:
        raise ValueError(f"gamma must have one element; got shape {tuple(gamma.shape)}")
    if not gamma.dtype.is_floating_point:
        raise ValueError(f"gamma must be a floating tensor; got {gamma.dtype}")
    return gamma.reshape(1)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def check_scale(scale):
    """scale must be a finite real number (E = scale * q^T k)."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.requires_grad:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number (E = scale * q^T k); got "
                        f"{type(scale).__name__} {scale!r} (pass backend= by keyword)")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return float(scale)


def check_pam(q, k, v, x, gamma):
    """Validate position_attention's arguments; returns (B, Cq, Cv, Nq, Nk).

    q: [B, Cq, Hq, Wq] or [B, Cq, Nq]; k: [B, Cq, Hk, Wk] or [B, Cq, Nk]; v: k's spatial shape
    with Cv channels; x (when given): the output's shape [B, Cv, *q's spatial shape].
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t)
        _rank(name, t)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.dim() != v.dim():
        raise ValueError(f"k and v must have the same rank; got {shapes}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch size B differs between q, k and v; got {shapes}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same number of channels Cq; got {shapes}")
    if v.shape[2:] != k.shape[2:]:
        raise ValueError(f"k and v must have the same spatial size (Nk or Hk, Wk): keys and "
                         f"values are the same positions; got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    Cq, Cv = q.shape[1], v.shape[1]
    if not CQ_RANGE[0] <= Cq <= CQ_RANGE[1]:
        raise ValueError(f"q/k channels Cq = {Cq} outside the supported range "
                         f"{CQ_RANGE[0]}..{CQ_RANGE[1]}; got {shapes}")
    if not CV_RANGE[0] <= Cv <= CV_RANGE[1]:
        raise ValueError(f"v channels Cv = {Cv} outside the supported range "
                         f"{CV_RANGE[0]}..{CV_RANGE[1]}; got {shapes}")
    if (x is None) != (gamma is None):
        raise ValueError("give both x and gamma (y = gamma*O + x) or neither (returns O); got "
                         f"x={'None' if x is None else tuple(x.shape)}, "
                         f"gamma={'None' if gamma is None else 'given'}")
    out_shape = (q.shape[0], Cv, *q.shape[2:])
    if x is not None:
        _tensor("x", x)
        if tuple(x.shape) != out_shape:
            raise ValueError(f"x must have the output's shape [B, Cv, *q's spatial shape] = "
                             f"{out_shape}; got x {tuple(x.shape)} ({shapes})")
    _same_device({"q": q, "k": k, "v": v, "x": x,
                  "gamma": gamma if isinstance(gamma, torch.Tensor) else None})
    return q.shape[0], Cq, Cv, _numel(q.shape[2:]), _numel(k.shape[2:])


def check_cam(x, gamma, mode):
    """Validate channel_attention's arguments; returns (B, C, N)."""
    _tensor("x", x)
    _rank("x", x)
    if mode not in CAM_MODES:
        raise ValueError(f"mode must be one of {CAM_MODES}; got {mode!r}")
    if x.shape[1] < _contract.CAM_C_MIN:
        raise ValueError(f"x must have at least one channel; got shape {tuple(x.shape)}")
    _same_device({"x": x, "gamma": gamma if isinstance(gamma, torch.Tensor) else None})
    return x.shape[0], x.shape[1], _numel(x.shape[2:])


def check_backend_limits(backend, op, shape):
    """Limits of one backend beyond the op's (raised before its kernel runs)."""
    if op == "cam" and backend in _contract.CAM_C_MAX and shape[1] > _contract.CAM_C_MAX[backend]:
        raise ValueError(f"channel_attention: C = {shape[1]} exceeds the {backend!r} backend's "
                         f"limit {_contract.CAM_C_MAX[backend]} (x {tuple(shape)}); use "
                         f"backend='triton' or 'reference' for it")
