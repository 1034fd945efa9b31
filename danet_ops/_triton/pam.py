"""Host side of the Triton PAM ops: checks, allocation, grids, launches (pam_kernels.py).

forward:  pam_fwd_kernel, grid (query blocks, B, Cv chunks) -> o, lse, y
backward: rowdot_kernel (R = rowsum(dy o), grid (query blocks, B))
          pam_bwd_dkdv_kernel (grid (key blocks, B, Cv chunks)) -> dv, per-chunk dK partials
          pam_bwd_dq_kernel (grid (query blocks, B)) -> dq
          dk = sum of the chunk partials (fixed order); dgamma = sum(R).
No atomics anywhere, so results are bitwise reproducible for a given device and config.

General form (SPEC §1 "Generalisation"): E = scale * q^T k with keys/values of their own
length Nk (q: [B, Cq, Nq], k: [B, Cq, Nk], v: [B, Cv, Nk]; outputs have the queries' Nq).
The kernels get QK_SCALE = scale * log2(e) for the logits and SCALE for dq/dk (folded once at
the store); scale = 1 passes exactly log2(e) and 1.0, so DANet's results are unchanged bitwise.
"""
import math

import torch
from triton import cdiv

from . import _common as C
from . import pam_kernels as K
from .._contract import CQ_MAX, CQ_MIN, CV_MAX, CV_MIN, output_dtype, stats_dtype

_AUTOTUNE_KEY = ["N_KEY", "NK_KEY", "CQ", "CV"]
LOG2E = 1.4426950408889634


def _cq_pad(cq):
    return max(16, C.next_pow2(cq))


def _check_qkv(q, k, v, scale):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"pam (triton): q, k, v must be [B, C, N]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (k.shape[:2] != q.shape[:2] or v.shape[0] != q.shape[0] or v.shape[2] != k.shape[2]):
        raise ValueError(f"pam (triton): expected q [B, Cq, Nq], k [B, Cq, Nk], v [B, Cv, Nk]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"pam (triton): scale must be finite; got {scale}")
    if not CQ_MIN <= q.shape[1] <= CQ_MAX:
        raise ValueError(f"pam (triton): Cq = {q.shape[1]} outside {CQ_MIN}..{CQ_MAX}")
    if not CV_MIN <= v.shape[1] <= CV_MAX:
        raise ValueError(f"pam (triton): Cv = {v.shape[1]} outside {CV_MIN}..{CV_MAX}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"pam (triton): q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    C.check_dtypes((("q", q),))
    C.check_device(q)


def _scales(scale):
    """(SCALE, QK_SCALE) kernel arguments: scale for dq/dk, scale*log2(e) for the logits."""
    return float(scale), float(scale) * LOG2E


def forward(q, k, v, x, gamma, scale=1.0):
    """q: [B, Cq, Nq]; k: [B, Cq, Nk]; v: [B, Cv, Nk]; x: [B, Cv, Nq] | None; gamma: [1] | None
    (any strides). E = scale * q^T k. -> o [B, Cv, Nq] (fp32 for fp16/bf16 v, kept unrounded
    for the backward's Delta, like the CPU kernel: functional callers get v's dtype; else v's
    dtype), lse [B, Nq] fp32 (log-sum-exp of E's rows), y = gamma*o + x [B, Cv, Nq] (or [0])."""
    _check_qkv(q, k, v, scale)
    if (x is None) != (gamma is None):
        raise ValueError("pam (triton): give both x and gamma, or neither")
    residual = x is not None
    if residual:
        C.check_dtypes((("x", x), ("gamma", gamma)))
    B, Cq, N = q.shape
    Nk = k.shape[2]
    Cv = v.shape[1]
    if residual and tuple(x.shape) != (B, Cv, N):
        raise ValueError(f"pam (triton): x must be [B, Cv, Nq] = {(B, Cv, N)}; got {tuple(x.shape)}")
    dev = q.device
    o = torch.empty((B, Cv, N), dtype=stats_dtype(v.dtype), device=dev)
    lse = torch.empty((B, N), dtype=torch.float32, device=dev)
    if residual:
        y_dtype = output_dtype(v.dtype, x.dtype, gamma.dtype)
        y = torch.empty((B, Cv, N), dtype=y_dtype, device=dev)
    else:
        y = v.new_empty((0,))
    if B == 0 or N == 0:
        return o, lse, y
    if Nk == 0:   # softmax over no keys: O = 0 (an empty sum), lse = log 0
        o.zero_()
        lse.fill_(float("-inf"))
        if residual:
            y.copy_(gamma.float() * o.float() + x.float())
        return o, lse, y
    scale_arg, qk_scale = _scales(scale)

    kern = C.launcher(K, "pam_fwd", "pam_fwd_kernel", _AUTOTUNE_KEY, dev)
    meta = C.meta_for("pam_fwd", dev)
    xs = C.strides(x) if residual else (0, 0, 0)
    ys = C.strides(y) if residual else (0, 0, 0)

    def grid(m):
        return (cdiv(N, m["BLOCK_M"]), B, cdiv(Cv, m["BLOCK_CV"]))

    with C.on_device(q):
        kern[grid](
            q, k, v, x if residual else o, gamma if residual else lse, o, lse, y if residual else o,
            N, Nk, Cq, Cv, qk_scale,
            *C.strides(q), *C.strides(k), *C.strides(v), *xs,
            *C.strides(o), *C.strides(lse), *ys,
            C.n_key(N), C.n_key(Nk),
            CQ_P=_cq_pad(Cq), HAS_RES=residual, PREC=C.dot_precision(v.dtype),
            F32_DOT=C.f32_dot(v.dtype), **meta)
    return o, lse, y


def backward(dy, q, k, v, o, lse, gamma, scale=1.0):
    """dy: [B, Cv, Nq] gradient of y (gamma given) or of o; scale: the forward's.
    -> dq, dk, dv (shapes/dtypes of q, k, v, contiguous), dgamma ([1] fp32 = sum(dy*o), or
    shape [0] without gamma). dE = scale * P (dA - Delta); dq = dE k^T, dk = dE^T q."""
    _check_qkv(q, k, v, scale)
    B, Cq, N = q.shape
    Nk = k.shape[2]
    Cv = v.shape[1]
    if tuple(dy.shape) != (B, Cv, N) or tuple(o.shape) != (B, Cv, N):
        raise ValueError(f"pam_backward (triton): dy and o must be [B, Cv, Nq] = {(B, Cv, N)}; "
                         f"got dy {tuple(dy.shape)}, o {tuple(o.shape)}")
    if lse.shape != (B, N):
        raise ValueError(f"pam_backward (triton): lse must be [B, Nq]; got {tuple(lse.shape)}")
    C.check_dtypes((("dy", dy), ("o", o), ("gamma", gamma)))
    dev = q.device
    dq = torch.empty((B, Cq, N), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Cq, Nk), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Cv, Nk), dtype=v.dtype, device=dev)
    has_gamma = gamma is not None
    if B == 0 or N == 0 or Nk == 0:   # (Nk == 0: o == 0, so dgamma = sum(dy*o) = 0 too)
        dgamma = torch.zeros((1,) if has_gamma else (0,), dtype=torch.float32, device=dev)
        return dq.zero_(), dk.zero_(), dv.zero_(), dgamma
    scale_arg, qk_scale = _scales(scale)

    # Delta = gamma * r inside the kernels, from the dy values their products use (dy rounded
    # to v's dtype); dgamma from the exact dy. They differ only when dy is wider (autocast).
    # o is the forward's fp32 O also for fp16/bf16 inputs: a rounded O would put its rounding
    # into Delta, which a sharp softmax amplifies in dE = P (dA - Delta) (issue 15).
    r_exact = C.rowdot(K, dy, o)
    r = r_exact if dy.dtype == v.dtype else C.rowdot(K, dy, o, round_like=v)
    lse = lse if lse.dtype == torch.float32 else lse.float()
    gptr = gamma if has_gamma else r
    cq_p = _cq_pad(Cq)
    prec, f32 = C.dot_precision(v.dtype), C.f32_dot(v.dtype)
    interp = dev.type == "cpu"

    # dK/dV: one program per (key block, batch, Cv chunk); chunks > 1 write fp32 dK partials.
    block_cv = min(max(16, C.next_pow2(Cv)), C.PAM_BWD_BLOCK_CV["interp" if interp else "gpu"])
    chunks = cdiv(Cv, block_cv)
    dkp = dk.unsqueeze(0) if chunks == 1 else torch.empty((chunks, B, Cq, Nk), dtype=torch.float32,
                                                          device=dev)
    kern = C.launcher(K, "pam_dkdv", "pam_bwd_dkdv_kernel", _AUTOTUNE_KEY, dev)
    meta = C.meta_for("pam_dkdv", dev)

    def grid_kv(m):
        return (cdiv(Nk, m["BLOCK_N"]), B, chunks)

    common = (*C.strides(q), *C.strides(k), *C.strides(v), *C.strides(dy),
              *C.strides(lse), *C.strides(r))
    with C.on_device(q):
        kern[grid_kv](
            q, k, v, dy, lse, r, gptr, dv, dkp, N, Nk, Cq, Cv, scale_arg, qk_scale, *common,
            *C.strides(dv), *C.strides(dkp), C.n_key(N), C.n_key(Nk),
            CQ_P=cq_p, HAS_GAMMA=has_gamma, PREC=prec, F32_DOT=f32, BLOCK_CV=block_cv, **meta)

        kern = C.launcher(K, "pam_dq", "pam_bwd_dq_kernel", _AUTOTUNE_KEY, dev)
        meta = C.meta_for("pam_dq", dev)
        kern[lambda m: (cdiv(N, m["BLOCK_M"]), B)](
            q, k, v, dy, lse, r, gptr, dq, N, Nk, Cq, Cv, scale_arg, qk_scale, *common,
            *C.strides(dq), C.n_key(N), C.n_key(Nk),
            CQ_P=cq_p, HAS_GAMMA=has_gamma, PREC=prec, F32_DOT=f32, **meta)
    if chunks > 1:
        dk.copy_(dkp.sum(0))                            # fixed-order sum of the chunk partials
    if has_gamma:
        dgamma = r_exact.sum().reshape(1)
    else:
        dgamma = torch.empty((0,), dtype=torch.float32, device=dev)
    return dq, dk, dv, dgamma

