"""Shared @triton.jit helpers of backend "triton" (like csrc/cuda/device_utils.cuh): the dot with
the precision policy, log2(e), and the residual epilogue. Each op's kernels, launch configs and
host code are in its own file: pam.py, cam.py, and rowdot.py (the row dot both backwards use).

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
Importing this module imports triton: only the op files import it (on the first launch).
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
def _store_residual(GAMMA, X, Y, x_offs, y_offs, o, mask):
    """Y[y_offs] = gamma * o + X[x_offs] in fp32, rounded once to Y's dtype (o: fp32 tile)."""
    g = tl.load(GAMMA).to(tl.float32)
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + y_offs, (g * o + x).to(Y.dtype.element_ty), mask=mask)
