"""The row dot both ops' backwards launch: R[b, i] = sum_c dy[b, c, i] o[b, c, i] in fp32.

PAM's backward uses it for Delta = gamma * R and both PAM and CAM for dgamma = sum(R) (summed by
torch: fixed order). Kernel, launch config and host code; importing this module imports triton.
"""
import torch
import triton
import triton.language as tl

from ._autotune import Fixed
from ._runtime import on_device, strides


@triton.jit
def rowdot_kernel(DY, O, RND, R, N, C,
                  s_db, s_dc, s_dn, s_ob, s_oc, s_on, s_rb, s_rn,
                  ROUND_DY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """R[b, i] = sum_c dy[b, c, i] * o[b, c, i]   (fp32).

    DY, O: [B, C, N]; R: [B, N] fp32. Grid (cdiv(N, BLOCK_M), B).
    ROUND_DY rounds dy to RND's dtype first (RND: only its element type is used): the dy values
    the PAM gradient products use when dy is wider than v (autocast), so that dP - Delta cancels
    consistently. PAM's O is fp32 also for fp16/bf16 inputs (pam.forward): Delta unrounded.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    m_mask = offs_m < N
    m64 = offs_m.to(tl.int64)
    c64 = offs_c.to(tl.int64)
    dy_ptrs = DY + b * s_db + c64[:, None] * s_dc + m64[None, :] * s_dn     # [BLOCK_C, BLOCK_M]
    o_ptrs = O + b * s_ob + c64[:, None] * s_oc + m64[None, :] * s_on
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        mask = ((c0 + offs_c) < C)[:, None] & m_mask[None, :]
        dy = tl.load(dy_ptrs, mask=mask, other=0.0)
        if ROUND_DY:
            dy = dy.to(RND.dtype.element_ty)
        dy = dy.to(tl.float32)
        o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(dy * o, 0)
        dy_ptrs += BLOCK_C * s_dc
        o_ptrs += BLOCK_C * s_oc
    tl.store(R + b * s_rb + m64 * s_rn, acc, mask=m_mask)


ROWDOT = Fixed(rowdot_kernel, gpu=dict(BLOCK_M=128, BLOCK_C=32), num_warps=4,
               interp=dict(BLOCK_M=16, BLOCK_C=16))


def rowdot(dy, o, round_like=None):
    """R = rowsum(dy o) over the channels: [B, N] fp32 (dy, o: [B, C, N], any strides;
    round_like: a tensor whose dtype dy is rounded to first)."""
    B, C, N = o.shape
    r = torch.empty((B, N), dtype=torch.float32, device=o.device)
    if B == 0 or N == 0:
        return r
    with on_device(o):
        ROWDOT.launch(o.device, lambda m: (triton.cdiv(N, m["BLOCK_M"]), B),
                      dy, o, o if round_like is None else round_like, r, N, C,
                      *strides(dy), *strides(o), *strides(r), ROUND_DY=round_like is not None)
    return r
