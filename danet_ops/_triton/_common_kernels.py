"""Shared @triton.jit helpers of backend "triton" (like csrc/cuda/device_utils.cuh): the dot
with the precision policy, log2(e), and the row dot both ops' backwards use. The kernels of each
op are in pam_kernels.py and cam_kernels.py; host code in pam.py, cam.py and _common.py.

Conventions shared by every kernel:
  * tensors are [B, C, N] (or [B, N]) views read and written through explicit strides, so the
    channel-major output of a 1x1 conv (contiguous or channels_last) is read in place;
  * batch index and channel offsets are 64-bit (B*C*N may exceed 2^31); pointer tiles are
    built once and advanced by a scalar stride per loop step;
  * scalar conditions are broadcast to a block before they meet a block mask (the triton 3.9
    interpreter turns block_bool & scalar_bool into int32);
  * every product accumulates in fp32; PREC is tl.dot's input_precision ("ieee" or "tf32",
    only meaningful for fp32 operands); F32_DOT upcasts both operands to fp32 before a dot
    (set for bf16 under the interpreter, whose bf16 tl.dot is wrong in triton 3.9);
  * softmax uses exp2 with log2(e) folded into the logits (z = s * LOG2E); the stored
    log-sum-exp is natural-log (lse = (m + log2 l) / LOG2E).
Importing this module imports triton; danet_ops imports it lazily (first kernel launch), and
_common.py (imported by the package) never imports it at module import.
"""
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, F32_DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation. a: [M, K], b: [K, N], acc: [M, N] fp32."""
    if F32_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def rowdot_kernel(DY, O, RND, R, N, C,
                  s_db, s_dc, s_dn, s_ob, s_oc, s_on, s_rb, s_rn,
                  ROUND_DY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """R[b, i] = sum_c dy[b, c, i] * o[b, c, i]   (fp32).

    DY, O: [B, C, N]; R: [B, N] fp32. Grid (cdiv(N, BLOCK_M), B). PAM's backward uses it for
    Delta = gamma * R and both PAM and CAM for dgamma = sum(R) (summed by torch: fixed order).
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


@triton.jit
def _store_residual(GAMMA, X, Y, x_offs, y_offs, o, mask):
    """Y[y_offs] = gamma * o + X[x_offs] in fp32, rounded once to Y's dtype (o: fp32 tile)."""
    g = tl.load(GAMMA).to(tl.float32)
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + y_offs, (g * o + x).to(Y.dtype.element_ty), mask=mask)
