"""Backend "triton", PAM: the kernels, their launch configs (autotune tables, shared-memory
estimates) and the host code (checks, allocation, grids, launches). Mirrors csrc/cuda/pam_kernels.cu.

forward:  pam_fwd_kernel, grid (query blocks, B, Cv chunks) -> o, lse, y
backward: rowdot_kernel (rowdot.py: R = rowsum(dy o), grid (query blocks, B))
          pam_bwd_dkdv_kernel (grid (key blocks, B, Cv chunks)) -> dv, per-chunk dK partials
          pam_bwd_dq_kernel (grid (query blocks, B)) -> dq
          dk = sum of the chunk partials (fixed order); dgamma = sum(R).
No atomics anywhere, so results are bitwise reproducible for a given device and config.

General form: E = scale * q^T k with keys/values of their own length Nk (q: [B, Cq, Nq],
k: [B, Cq, Nk], v: [B, Cv, Nk]; outputs have the queries' Nq). The kernels get
QK_SCALE = scale * log2(e) for the logits and SCALE for dq/dk (folded once at the store);
scale = 1 passes exactly log2(e) and 1.0, so DANet's results are unchanged bitwise.
Kernel conventions (strides, int64 offsets, fp32 accumulation, exp2 softmax): _jit.py.
Importing this module imports triton (ops.py imports it on the first call).
"""
import math

import torch
import triton
import triton.language as tl
from triton import cdiv

from ._autotune import IEEE, Tuned, tiles
from ._jit import LOG2E, _dot, _store_residual
from ._runtime import (check_device, check_dtypes, dot_precision, f32_dot, n_key, next_pow2,
                       on_device, strides)
from .rowdot import rowdot
from .._contract import CQ_MAX, CQ_MIN, CV_MAX, CV_MIN, output_dtype, stats_dtype


# ============================================================================ forward
@triton.jit
def pam_fwd_kernel(
        Q, K, V, X, GAMMA, O, LSE, Y,
        NQ, NK, CQ, CV, QK_SCALE,
        s_qb, s_qc, s_qn, s_kb, s_kc, s_kn, s_vb, s_vc, s_vn, s_xb, s_xc, s_xn,
        s_ob, s_oc, s_on, s_lb, s_ln, s_yb, s_yc, s_yn,
        N_KEY, NK_KEY,  # autotune buckets of NQ and NK only
        CQ_P: tl.constexpr, HAS_RES: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr):
    """Flash-attention forward for one (query block, batch, value-channel chunk).

        E[i, j] = scale * sum_c q[c, i] k[c, j]      (DANet: scale = 1)
        O[c, i] = sum_j v[c, j] exp(E[i, j] - lse[i]),  lse[i] = log sum_j exp(E[i, j])
        Y[c, i] = gamma * O[c, i] + x[c, i]          (HAS_RES)

    Q: [B, CQ, NQ]; K: [B, CQ, NK]; V: [B, CV, NK]; X, O, Y: [B, CV, NQ]; GAMMA: [1];
    LSE: [B, NQ] fp32. QK_SCALE = scale * log2(e) (fp32; scale = 1 gives LOG2E exactly).
    Grid (cdiv(NQ, BLOCK_M), B, cdiv(CV, BLOCK_CV)): each chunk recomputes q.k^T (CQ << CV),
    which keeps the accumulator at [BLOCK_M, BLOCK_CV] instead of [BLOCK_M, CV]. CQ is padded
    to CQ_P (a power of two >= 16) with zeros, which leaves E unchanged.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)            # query positions i
    offs_n = tl.arange(0, BLOCK_N)                              # key positions j (block-local)
    offs_d = tl.arange(0, CQ_P)                                 # q/k channels
    offs_c = pid_c * BLOCK_CV + tl.arange(0, BLOCK_CV)          # value channels of this chunk
    m_mask = offs_m < NQ
    d_mask = offs_d < CQ
    c_mask = offs_c < CV
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    c64 = offs_c.to(tl.int64)

    # q tile [BLOCK_M, CQ_P]: q[b, d, i]
    q = tl.load(Q + b * s_qb + m64[:, None] * s_qn + d64[None, :] * s_qc,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptrs = K + b * s_kb + d64[:, None] * s_kc + n64[None, :] * s_kn   # [CQ_P, BLOCK_N]
    v_ptrs = V + b * s_vb + n64[:, None] * s_vn + c64[None, :] * s_vc   # [BLOCK_N, BLOCK_CV]

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)        # running max of z (log2 units)
    l_i = tl.zeros((BLOCK_M,), tl.float32)                       # running sum of exp2(z - m)
    acc = tl.zeros((BLOCK_M, BLOCK_CV), tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        n_mask = (start_n + offs_n) < NK
        k = tl.load(k_ptrs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = _dot(q, k, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC, F32_DOT)
        z = tl.where(n_mask[None, :], s * QK_SCALE, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        # A row that has seen only -inf logits so far (a whole key block of them) subtracts 0,
        # not -inf: exp2(-inf - -inf) would be NaN, and its weights must be 0 as in softmax.
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(z - base[:, None])
        alpha = tl.exp2(m_i - base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PREC, F32_DOT)
        m_i = m_new
        k_ptrs += BLOCK_N * s_kn
        v_ptrs += BLOCK_N * s_vn

    o = acc / l_i[:, None]
    out_mask = m_mask[:, None] & c_mask[None, :]
    tl.store(O + b * s_ob + m64[:, None] * s_on + c64[None, :] * s_oc,
             o.to(O.dtype.element_ty), mask=out_mask)
    lse = (m_i + tl.log2(l_i)) / LOG2E
    first = (pid_c + tl.zeros((BLOCK_M,), tl.int32)) == 0         # one chunk stores lse
    tl.store(LSE + b * s_lb + m64 * s_ln, lse, mask=m_mask & first)
    if HAS_RES:
        _store_residual(GAMMA, X, Y, b * s_xb + m64[:, None] * s_xn + c64[None, :] * s_xc,
                        b * s_yb + m64[:, None] * s_yn + c64[None, :] * s_yc, o, out_mask)


# ============================================================================ backward
@triton.jit
def pam_bwd_dkdv_kernel(
        Q, K, V, DY, LSE, R, GAMMA, DV, DKP,
        NQ, NK, CQ, CV, SCALE, QK_SCALE,
        s_qb, s_qc, s_qn, s_kb, s_kc, s_kn, s_vb, s_vc, s_vn, s_db, s_dc, s_dn,
        s_lb, s_ln, s_rb, s_rn, s_vgb, s_vgc, s_vgn, s_kpp, s_kpb, s_kpc, s_kpn,
        N_KEY, NK_KEY,
        CQ_P: tl.constexpr, HAS_GAMMA: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr):
    """dV and a chunk's share of dK for one (key block, batch, value-channel chunk h).

        P[i, j]  = exp(E[i, j] - lse[i]),  dO = g * dy (g = gamma, or 1),  Delta = g * R
        dV[c, j] = g * sum_i P[i, j] dy[c, i]                          (c in chunk h)
        dA_h[i, j] = g * sum_{c in h} dy[c, i] v[c, j]
        dK_h[d, j] = scale * sum_i P[i, j] (dA_h[i, j] - [h == 0] Delta_i) q[d, i]

    dK = sum_h dK_h (the host sums the chunk partials in a fixed order: no atomics), because
    dE = scale * P o (dA - Delta) is linear in dA = sum_h dA_h (scale applied once, at the
    store; 1.0 changes nothing). Q: [B, CQ, NQ]; K: [B, CQ, NK]; V, DV: [B, CV, NK]; DY:
    [B, CV, NQ]; LSE, R: [B, NQ] fp32; DKP: [H, B, CQ, NK] (or dk itself when H == 1).
    QK_SCALE = scale * log2(e). Grid (cdiv(NK, BLOCK_N), B, H). The loop runs over query blocks; P^T is built as
    [BLOCK_N, BLOCK_M] so that every product has the key block as its row dimension.
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)            # key positions j
    offs_m = tl.arange(0, BLOCK_M)                              # query positions (block-local)
    offs_d = tl.arange(0, CQ_P)
    offs_c = h * BLOCK_CV + tl.arange(0, BLOCK_CV)
    n_mask = offs_n < NK
    d_mask = offs_d < CQ
    c_mask = offs_c < CV
    n64 = offs_n.to(tl.int64)
    m64 = offs_m.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    c64 = offs_c.to(tl.int64)

    g = 1.0
    if HAS_GAMMA:
        g = tl.load(GAMMA).to(tl.float32)
    first = (h == 0).to(tl.float32)                             # Delta enters one chunk only

    kt = tl.load(K + b * s_kb + n64[:, None] * s_kn + d64[None, :] * s_kc,
                 mask=n_mask[:, None] & d_mask[None, :], other=0.0)        # [BLOCK_N, CQ_P]
    v = tl.load(V + b * s_vb + n64[:, None] * s_vn + c64[None, :] * s_vc,
                mask=n_mask[:, None] & c_mask[None, :], other=0.0)         # [BLOCK_N, BLOCK_CV]
    q_ptrs = Q + b * s_qb + d64[:, None] * s_qc + m64[None, :] * s_qn      # [CQ_P, BLOCK_M]
    dy_ptrs = DY + b * s_db + c64[:, None] * s_dc + m64[None, :] * s_dn    # [BLOCK_CV, BLOCK_M]
    lse_ptrs = LSE + b * s_lb + m64 * s_ln
    r_ptrs = R + b * s_rb + m64 * s_rn

    dv = tl.zeros((BLOCK_N, BLOCK_CV), tl.float32)
    dk = tl.zeros((BLOCK_N, CQ_P), tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        m_mask = (start_m + offs_m) < NQ
        qt = tl.load(q_ptrs, mask=d_mask[:, None] & m_mask[None, :], other=0.0)
        lse = tl.load(lse_ptrs, mask=m_mask, other=float("inf"))   # masked rows: P = 0
        delta = g * tl.load(r_ptrs, mask=m_mask, other=0.0) * first
        st = _dot(kt, qt, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), PREC, F32_DOT)
        pt = tl.exp2(st * QK_SCALE - (lse * LOG2E)[None, :])        # P^T [BLOCK_N, BLOCK_M]
        dy = tl.load(dy_ptrs, mask=c_mask[:, None] & m_mask[None, :], other=0.0).to(v.dtype)
        dv = _dot(pt.to(v.dtype), tl.trans(dy), dv, PREC, F32_DOT)
        dpt = g * _dot(v, dy, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), PREC, F32_DOT)
        dst = pt * (dpt - delta[None, :])                           # dE_h^T
        dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, PREC, F32_DOT)
        q_ptrs += BLOCK_M * s_qn
        dy_ptrs += BLOCK_M * s_dn
        lse_ptrs += BLOCK_M * s_ln
        r_ptrs += BLOCK_M * s_rn

    tl.store(DV + b * s_vgb + n64[:, None] * s_vgn + c64[None, :] * s_vgc,
             (g * dv).to(DV.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])
    tl.store(DKP + h.to(tl.int64) * s_kpp + b * s_kpb + n64[:, None] * s_kpn + d64[None, :] * s_kpc,
             (SCALE * dk).to(DKP.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


@triton.jit
def pam_bwd_dq_kernel(
        Q, K, V, DY, LSE, R, GAMMA, DQ,
        NQ, NK, CQ, CV, SCALE, QK_SCALE,
        s_qb, s_qc, s_qn, s_kb, s_kc, s_kn, s_vb, s_vc, s_vn, s_db, s_dc, s_dn,
        s_lb, s_ln, s_rb, s_rn, s_gb, s_gc, s_gn,
        N_KEY, NK_KEY,
        CQ_P: tl.constexpr, HAS_GAMMA: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CV: tl.constexpr):
    """dQ for one (query block, batch):

        dA[i, j] = g * sum_c dy[c, i] v[c, j],   dE[i, j] = scale * P[i, j] (dA[i, j] - g R_i)
        dQ[d, i] = sum_j dE[i, j] k[d, j]             (scale applied once, at the store)

    Q, DQ: [B, CQ, NQ]; K: [B, CQ, NK]; V: [B, CV, NK]; DY: [B, CV, NQ]; LSE, R: [B, NQ] fp32.
    QK_SCALE = scale * log2(e). Grid (cdiv(NQ, BLOCK_M), B).
    The program owns its rows of dQ (no atomics); dA sums all CV channels in BLOCK_CV steps
    inside the key loop, so no [BLOCK_M, CV] tile is ever held.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, CQ_P)
    offs_c = tl.arange(0, BLOCK_CV)
    m_mask = offs_m < NQ
    d_mask = offs_d < CQ
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    c64 = offs_c.to(tl.int64)

    g = 1.0
    if HAS_GAMMA:
        g = tl.load(GAMMA).to(tl.float32)
    q = tl.load(Q + b * s_qb + m64[:, None] * s_qn + d64[None, :] * s_qc,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)         # [BLOCK_M, CQ_P]
    lse2 = tl.load(LSE + b * s_lb + m64 * s_ln, mask=m_mask, other=0.0) * LOG2E
    delta = g * tl.load(R + b * s_rb + m64 * s_rn, mask=m_mask, other=0.0)
    k_ptrs = K + b * s_kb + d64[:, None] * s_kc + n64[None, :] * s_kn      # [CQ_P, BLOCK_N]
    dy_base = DY + b * s_db + m64[:, None] * s_dn + c64[None, :] * s_dc    # [BLOCK_M, BLOCK_CV]
    v_base = V + b * s_vb + c64[:, None] * s_vc + n64[None, :] * s_vn      # [BLOCK_CV, BLOCK_N]

    dq = tl.zeros((BLOCK_M, CQ_P), tl.float32)
    v_col = v_base                                              # column block of v at start_n
    for start_n in range(0, NK, BLOCK_N):
        n_mask = (start_n + offs_n) < NK
        k = tl.load(k_ptrs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = _dot(q, k, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), PREC, F32_DOT)
        p = tl.where(n_mask[None, :], tl.exp2(s * QK_SCALE - lse2[:, None]), 0.0)
        dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        v_ptrs = v_col
        dy_ptrs = dy_base
        for c0 in range(0, CV, BLOCK_CV):
            c_mask = (c0 + offs_c) < CV
            vt = tl.load(v_ptrs, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            dy = tl.load(dy_ptrs, mask=m_mask[:, None] & c_mask[None, :], other=0.0).to(vt.dtype)
            dp = _dot(dy, vt, dp, PREC, F32_DOT)
            v_ptrs += BLOCK_CV * s_vc
            dy_ptrs += BLOCK_CV * s_dc
        ds = p * (g * dp - delta[:, None])                          # dE [BLOCK_M, BLOCK_N]
        dq = _dot(ds.to(k.dtype), tl.trans(k), dq, PREC, F32_DOT)
        k_ptrs += BLOCK_N * s_kn
        v_col += BLOCK_N * s_vn

    tl.store(DQ + b * s_gb + m64[:, None] * s_gn + d64[None, :] * s_gc,
             (SCALE * dq).to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# ============================================================================ launch configs
# Autotune candidates (_autotune.py: groups, pruning) and shared-memory estimates: bytes of the
# pipelined operand tiles of a config, to prune the impossible (es: the operand's element size).
_KEY = ["N_KEY", "NK_KEY", "CQ", "CV"]


def _fwd_smem(meta, stages, args):
    es, cq = args["elt"], args["CQ_P"]
    return es * (meta["BLOCK_M"] * cq + stages * meta["BLOCK_N"] * (cq + meta["BLOCK_CV"]))


def _dkdv_smem(meta, stages, args):  # + an fp32 [BLOCK_M, BLOCK_N] layout-conversion buffer
    es, cq, cv = args["elt"], args["CQ_P"], args["BLOCK_CV"]
    return (es * (meta["BLOCK_N"] * (cq + cv) + stages * meta["BLOCK_M"] * (cq + cv))
            + 4 * meta["BLOCK_M"] * meta["BLOCK_N"])


def _dq_smem(meta, stages, args):
    es, cq = args["elt"], args["CQ_P"]
    return es * (meta["BLOCK_M"] * cq + stages * (meta["BLOCK_N"] * cq
                 + meta["BLOCK_CV"] * (meta["BLOCK_M"] + meta["BLOCK_N"])))


FWD = Tuned(
    pam_fwd_kernel, names=("BLOCK_M", "BLOCK_N", "BLOCK_CV"), dims=("NQ", "NK", "CV"),
    operand="Q", key=_KEY, smem=_fwd_smem, interp=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_CV=16),
    tiles=tiles("sm90", [((128, 64, 128), 8, 3), ((128, 128, 128), 8, 2), ((128, 128, 64), 8, 3),
                         ((64, 64, 128), 4, 3), ((64, 128, 64), 4, 4), ((128, 32, 128), 8, 4)])
    + tiles("sm80", [((128, 64, 128), 8, 2), ((128, 32, 128), 8, 3), ((64, 64, 128), 4, 3),
                     ((64, 64, 64), 4, 4), ((128, 64, 64), 4, 3)])
    + tiles(IEEE, [((32, 32, 64), 4, 2), ((32, 32, 64), 4, 3)]))

BWD_DKDV = Tuned(
    pam_bwd_dkdv_kernel, names=("BLOCK_M", "BLOCK_N"), dims=("NQ", "NK"),
    operand="Q", key=_KEY, smem=_dkdv_smem, interp=dict(BLOCK_M=16, BLOCK_N=16),
    tiles=tiles("sm90", [((64, 128), 8, 2), ((64, 64), 8, 3), ((32, 128), 8, 3), ((32, 64), 4, 3)])
    + tiles("sm80", [((64, 64), 4, 2), ((32, 128), 8, 2), ((32, 64), 4, 3)])
    + tiles(IEEE, [((16, 16), 4, 2)]))

BWD_DQ = Tuned(
    pam_bwd_dq_kernel, names=("BLOCK_M", "BLOCK_N", "BLOCK_CV"), dims=("NQ", "NK", "CV"),
    operand="Q", key=_KEY, smem=_dq_smem, interp=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_CV=16),
    tiles=tiles("sm90", [((128, 64, 64), 8, 2), ((64, 64, 64), 4, 3), ((128, 32, 128), 8, 2),
                         ((64, 128, 64), 8, 2)])
    + tiles("sm80", [((64, 64, 64), 4, 2), ((128, 32, 64), 8, 2), ((64, 32, 128), 4, 3)])
    + tiles(IEEE, [((32, 32, 32), 4, 2)]))

# The backward's value-channel chunk (dK partials are per chunk, so it is chosen before launch).
BWD_BLOCK_CV = {"gpu": 128, "interp": 16}


# ============================================================================ host
def _cq_pad(cq):
    return max(16, next_pow2(cq))


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
    check_dtypes((("q", q),))
    check_device(q)


def _scales(scale):
    """(SCALE, QK_SCALE) kernel arguments: scale for dq/dk, scale*log2(e) for the logits."""
    return float(scale), float(scale) * LOG2E.value


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
        check_dtypes((("x", x), ("gamma", gamma)))
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
    _, qk_scale = _scales(scale)

    xs = strides(x) if residual else (0, 0, 0)
    ys = strides(y) if residual else (0, 0, 0)

    def grid(m):
        return (cdiv(N, m["BLOCK_M"]), B, cdiv(Cv, m["BLOCK_CV"]))

    with on_device(q):
        FWD.launch(
            dev, grid,
            q, k, v, x if residual else o, gamma if residual else lse, o, lse, y if residual else o,
            N, Nk, Cq, Cv, qk_scale,
            *strides(q), *strides(k), *strides(v), *xs,
            *strides(o), *strides(lse), *ys,
            n_key(N), n_key(Nk),
            CQ_P=_cq_pad(Cq), HAS_RES=residual, PREC=dot_precision(v.dtype),
            F32_DOT=f32_dot(v.dtype))
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
    check_dtypes((("dy", dy), ("o", o), ("gamma", gamma)))
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
    # into Delta, which a sharp softmax amplifies in dE = P (dA - Delta).
    r_exact = rowdot(dy, o)
    r = r_exact if dy.dtype == v.dtype else rowdot(dy, o, round_like=v)
    lse = lse if lse.dtype == torch.float32 else lse.float()
    gptr = gamma if has_gamma else r
    cq_p = _cq_pad(Cq)
    prec, f32 = dot_precision(v.dtype), f32_dot(v.dtype)
    interp = dev.type == "cpu"

    # dK/dV: one program per (key block, batch, Cv chunk); chunks > 1 write fp32 dK partials.
    block_cv = min(max(16, next_pow2(Cv)), BWD_BLOCK_CV["interp" if interp else "gpu"])
    chunks = cdiv(Cv, block_cv)
    dkp = dk.unsqueeze(0) if chunks == 1 else torch.empty((chunks, B, Cq, Nk), dtype=torch.float32,
                                                          device=dev)

    def grid_kv(m):
        return (cdiv(Nk, m["BLOCK_N"]), B, chunks)

    common = (*strides(q), *strides(k), *strides(v), *strides(dy),
              *strides(lse), *strides(r))
    with on_device(q):
        BWD_DKDV.launch(
            dev, grid_kv,
            q, k, v, dy, lse, r, gptr, dv, dkp, N, Nk, Cq, Cv, scale_arg, qk_scale, *common,
            *strides(dv), *strides(dkp), n_key(N), n_key(Nk),
            CQ_P=cq_p, HAS_GAMMA=has_gamma, PREC=prec, F32_DOT=f32, BLOCK_CV=block_cv)
        BWD_DQ.launch(
            dev, lambda m: (cdiv(N, m["BLOCK_M"]), B),
            q, k, v, dy, lse, r, gptr, dq, N, Nk, Cq, Cv, scale_arg, qk_scale, *common,
            *strides(dq), n_key(N), n_key(Nk),
            CQ_P=cq_p, HAS_GAMMA=has_gamma, PREC=prec, F32_DOT=f32)
    if chunks > 1:
        dk.copy_(dkp.sum(0))                            # fixed-order sum of the chunk partials
    if has_gamma:
        dgamma = r_exact.sum().reshape(1)
    else:
        dgamma = torch.empty((0,), dtype=torch.float32, device=dev)
    return dq, dk, dv, dgamma

