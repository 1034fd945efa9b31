"""Triton kernels of PAM (mirrors csrc/cuda/pam_kernels.cu). Host code: pam.py.

forward:  pam_fwd_kernel; backward: pam_bwd_dkdv_kernel, pam_bwd_dq_kernel (after the shared
rowdot_kernel of _common_kernels.py). Conventions (strides, int64 offsets, fp32 accumulation,
exp2 softmax): _common_kernels.py. Importing this module imports triton.
"""
import triton
import triton.language as tl

# rowdot_kernel: launched by the host as K.rowdot_kernel (_common.rowdot)
from ._common_kernels import LOG2E, _dot, _store_residual, rowdot_kernel  # noqa: F401


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
