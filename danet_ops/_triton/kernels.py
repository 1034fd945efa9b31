"""Triton kernels of backend "triton" (PAM and CAM). Host code: pam.py, cam.py.

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
Importing this module imports triton; danet_ops imports it lazily (first kernel launch).
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


# ============================================================================ PAM forward
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
        g = tl.load(GAMMA).to(tl.float32)
        x = tl.load(X + b * s_xb + m64[:, None] * s_xn + c64[None, :] * s_xc,
                    mask=out_mask, other=0.0).to(tl.float32)
        tl.store(Y + b * s_yb + m64[:, None] * s_yn + c64[None, :] * s_yc,
                 (g * o + x).to(Y.dtype.element_ty), mask=out_mask)


# ============================================================================ shared: row dot
@triton.jit
def rowdot_kernel(DY, O, R, N, C,
                  s_db, s_dc, s_dn, s_ob, s_oc, s_on, s_rb, s_rn,
                  ROUND_DY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """R[b, i] = sum_c dy[b, c, i] * o[b, c, i]   (fp32).

    DY, O: [B, C, N]; R: [B, N] fp32. Grid (cdiv(N, BLOCK_M), B). PAM's backward uses it for
    Delta = gamma * R and both PAM and CAM for dgamma = sum(R) (summed by torch: fixed order).
    ROUND_DY rounds dy to O's dtype first: the dy values the PAM gradient products use when dy
    is wider than v (autocast), so that dP - Delta cancels consistently.
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
            dy = dy.to(O.dtype.element_ty)
        dy = dy.to(tl.float32)
        o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(dy * o, 0)
        dy_ptrs += BLOCK_C * s_dc
        o_ptrs += BLOCK_C * s_oc
    tl.store(R + b * s_rb + m64 * s_rn, acc, mask=m_mask)


# ============================================================================ PAM backward
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


# ============================================================================ CAM
@triton.jit
def cam_mm_nt_partial_kernel(
        X, Y, P, C, N, CHUNK,
        s_xb, s_xc, s_xn, s_yb, s_yc, s_yn, s_ps, s_pb, s_pi,
        N_KEY,
        SYMMETRIC: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Split-N partial of a channel-by-channel product, for one (block pair, split s, batch):

        P[s, b, i, j] = sum_{n in [s*CHUNK, (s+1)*CHUNK) & n < N} X[b, i, n] * Y[b, j, n]

    X, Y: [B, C, N]; P: [S, B, C, C] fp32 (unit stride along j). Grid (T*T, S, B),
    T = cdiv(C, BLOCK_C). SYMMETRIC (the Gram matrix E = a a^T, X is Y): only block pairs
    I <= J do work and only elements i <= j are stored; the other programs loop zero times
    and store nothing. Readers mirror (cam_softmax_kernel). The split-N partials are summed
    by the reader in a fixed order: deterministic, no atomics. X tiles are cast to Y's dtype.
    """
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    T = tl.cdiv(C, BLOCK_C)
    bi = pid // T
    bj = pid % T
    n_lo = s * CHUNK
    n_hi = tl.minimum(n_lo + CHUNK, N)
    if SYMMETRIC:
        n_hi = tl.where(bi <= bj, n_hi, n_lo)                    # lower block pairs: no work
    offs_i = bi * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = bj * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    i_mask = offs_i < C
    j_mask = offs_j < C
    i64 = offs_i.to(tl.int64)
    j64 = offs_j.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    x_ptrs = X + b * s_xb + i64[:, None] * s_xc + (n_lo + k64)[None, :] * s_xn  # [BLOCK_C, BLOCK_K]
    y_ptrs = Y + b * s_yb + (n_lo + k64)[:, None] * s_yn + j64[None, :] * s_yc  # [BLOCK_K, BLOCK_C]
    acc = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_K):
        k_mask = (n0 + offs_k) < n_hi
        yt = tl.load(y_ptrs, mask=k_mask[:, None] & j_mask[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=i_mask[:, None] & k_mask[None, :], other=0.0).to(yt.dtype)
        acc = _dot(xt, yt, acc, PREC, F32_DOT)
        x_ptrs += BLOCK_K * s_xn
        y_ptrs += BLOCK_K * s_yn
    mask = i_mask[:, None] & j_mask[None, :]
    if SYMMETRIC:
        upper = (offs_i[:, None] <= offs_j[None, :]) & ((bi + 0 * offs_j[None, :]) <= bj)
        mask = mask & upper
    tl.store(P + s.to(tl.int64) * s_ps + b * s_pb + i64[:, None] * s_pi + j64[None, :], acc,
             mask=mask)


@triton.jit
def _gram_rows(P, b, i64, j64, mask, S, s_ps, s_pb, s_pi, R: tl.constexpr, J: tl.constexpr):
    """E[b, i, j] = sum_s P[s, b, min(i, j), max(i, j)] over the S split-N partials (fixed order).
    i64: [R] rows, j64: [J] columns (int64); returns [R, J] fp32 (0 where ~mask)."""
    lo = tl.minimum(i64[:, None], j64[None, :])
    hi = tl.maximum(i64[:, None], j64[None, :])
    ptrs = P + b * s_pb + lo * s_pi + hi
    e = tl.zeros((R, J), tl.float32)
    for s in range(0, S):
        e += tl.load(ptrs + s * s_ps, mask=mask, other=0.0)
    return e


@triton.jit
def cam_softmax_kernel(P, A, C, S, s_ps, s_pb, s_pi, s_ab, s_ai,
                       NEG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Reduce the Gram partials, mirror the upper triangle, and softmax each row:

        E[i, j] = sum_s P[s, b, min(i, j), max(i, j)]
        A[b, i, :] = softmax_j(-E[i, :])  (NEG, mode "original" = softmax(rowmax(E) - E))
                   | softmax_j(E[i, :])   (mode "paper")

    computed stably (max subtracted, exp2 with log2(e) folded). P: [S, B, C, C] fp32 (upper
    triangle valid); A: [B, C, C] fp32 (unit stride along j). Grid (cdiv(C, BLOCK_R), B): a
    program owns whole rows, first pass = online max/sum, second pass = normalised store.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_i = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, BLOCK_J)
    i_mask = offs_i < C
    i64 = offs_i.to(tl.int64)
    sign = 1.0
    if NEG:
        sign = -1.0
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    for j0 in range(0, C, BLOCK_J):
        j_mask = (j0 + offs_j) < C
        mask = i_mask[:, None] & j_mask[None, :]
        e = _gram_rows(P, b, i64, (j0 + offs_j).to(tl.int64), mask, S, s_ps, s_pb, s_pi,
                       BLOCK_R, BLOCK_J)
        z = tl.where(j_mask[None, :], sign * e * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)   # only -inf so far: weights 0
        l_i = l_i * tl.exp2(m_i - base) + tl.sum(tl.exp2(z - base[:, None]), 1)
        m_i = m_new
    for j0 in range(0, C, BLOCK_J):
        j_mask = (j0 + offs_j) < C
        mask = i_mask[:, None] & j_mask[None, :]
        j64 = (j0 + offs_j).to(tl.int64)
        e = _gram_rows(P, b, i64, j64, mask, S, s_ps, s_pb, s_pi,
                       BLOCK_R, BLOCK_J)
        a = tl.exp2(sign * e * LOG2E - m_i[:, None]) / l_i[:, None]
        tl.store(A + b * s_ab + i64[:, None] * s_ai + j64[None, :], a, mask=mask)


@triton.jit
def cam_apply_kernel(
        A, X, GAMMA, O, Y, C, N,
        s_ab, s_ai, s_xb, s_xc, s_xn, s_ob, s_oc, s_on, s_yb, s_yc, s_yn,
        N_KEY,
        HAS_RES: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """O[b, i, n] = sum_k A[b, i, k] a[b, k, n];  Y = gamma * O + a  (HAS_RES).

    A: [B, C, C] fp32 (cast to a's dtype for the product); X (= a), O, Y: [B, C, N].
    Grid (cdiv(C, BLOCK_M) * cdiv(N, BLOCK_N), B): row blocks vary fastest, so programs that
    run together share the same [C, BLOCK_N] column block of a in L2.
    """
    pid = tl.program_id(0)
    pid_m = pid % tl.cdiv(C, BLOCK_M)
    pid_n = pid // tl.cdiv(C, BLOCK_M)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < C
    n_mask = offs_n < N
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    a_ptrs = A + b * s_ab + m64[:, None] * s_ai + k64[None, :]             # [BLOCK_M, BLOCK_K]
    x_ptrs = X + b * s_xb + k64[:, None] * s_xc + n64[None, :] * s_xn      # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_mask = (k0 + offs_k) < C
        x = tl.load(x_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(x.dtype)
        acc = _dot(a, x, acc, PREC, F32_DOT)
        a_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * s_xc
    mask = m_mask[:, None] & n_mask[None, :]
    tl.store(O + b * s_ob + m64[:, None] * s_oc + n64[None, :] * s_on,
             acc.to(O.dtype.element_ty), mask=mask)
    if HAS_RES:
        g = tl.load(GAMMA).to(tl.float32)
        x = tl.load(X + b * s_xb + m64[:, None] * s_xc + n64[None, :] * s_xn,
                    mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + b * s_yb + m64[:, None] * s_yc + n64[None, :] * s_yn,
                 (g * acc + x).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def cam_bwd_ds_kernel(P, A, GAMMA, G, C, S, s_ps, s_pb, s_pi, s_ab, s_ai, s_gb, s_gi,
                      NEG: tl.constexpr, HAS_GAMMA: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Softmax backward on whole rows:

        dA[i, j] = g * sum_s P[s, b, i, j]   (P: split-N partials of dy a^T; g = gamma or 1)
        r_i      = sum_j dA[i, j] A[i, j]
        G[i, j]  = dE[i, j] = +-A[i, j] (dA[i, j] - r_i)   (- for NEG: A = softmax(-E))

    P: [S, B, C, C] fp32; A, G: [B, C, C] fp32 (unit stride along j). Grid (cdiv(C, BLOCK_R), B).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_i = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, BLOCK_J)
    i_mask = offs_i < C
    i64 = offs_i.to(tl.int64)
    g = 1.0
    if HAS_GAMMA:
        g = tl.load(GAMMA).to(tl.float32)
    sign = 1.0
    if NEG:
        sign = -1.0
    r = tl.zeros((BLOCK_R,), tl.float32)
    for j0 in range(0, C, BLOCK_J):
        j64 = (j0 + offs_j).to(tl.int64)
        mask = i_mask[:, None] & ((j0 + offs_j) < C)[None, :]
        da = tl.zeros((BLOCK_R, BLOCK_J), tl.float32)
        for s in range(0, S):
            da += tl.load(P + s * s_ps + b * s_pb + i64[:, None] * s_pi + j64[None, :],
                          mask=mask, other=0.0)
        a = tl.load(A + b * s_ab + i64[:, None] * s_ai + j64[None, :], mask=mask, other=0.0)
        r += tl.sum(g * da * a, 1)
    for j0 in range(0, C, BLOCK_J):
        j64 = (j0 + offs_j).to(tl.int64)
        mask = i_mask[:, None] & ((j0 + offs_j) < C)[None, :]
        da = tl.zeros((BLOCK_R, BLOCK_J), tl.float32)
        for s in range(0, S):
            da += tl.load(P + s * s_ps + b * s_pb + i64[:, None] * s_pi + j64[None, :],
                          mask=mask, other=0.0)
        a = tl.load(A + b * s_ab + i64[:, None] * s_ai + j64[None, :], mask=mask, other=0.0)
        tl.store(G + b * s_gb + i64[:, None] * s_gi + j64[None, :],
                 sign * a * (g * da - r[:, None]), mask=mask)


@triton.jit
def cam_bwd_dx_kernel(
        A, G, X, DY, GAMMA, DX, C, N,
        s_ab, s_ai, s_gb, s_gi, s_xb, s_xc, s_xn, s_db, s_dc, s_dn, s_eb, s_ec, s_en,
        N_KEY,
        HAS_GAMMA: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
        M_F32: tl.constexpr, PREC_M: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Full gradient of a (value, both sides of the Gram product, residual):

        dx[i, n] = sum_k g A[k, i] dy[k, n]                      (A^T dO, dO = g dy)
                 + sum_k (G[i, k] + G[k, i]) a[k, n]             (one product with dE + dE^T)
                 + [HAS_GAMMA] dy[i, n]                          (residual y = gamma O + a)

    A, G: [B, C, C] fp32; X (= a), DY, DX: [B, C, N]. Grid (cdiv(C, BLOCK_M) * cdiv(N, BLOCK_N), B),
    row blocks fastest. The (dE + dE^T) tile stays fp32 when M_F32 (fp32 and fp16 inputs: dE
    can exceed the fp16 range), with input_precision PREC_M; for bf16 it is cast to bf16.
    """
    pid = tl.program_id(0)
    pid_m = pid % tl.cdiv(C, BLOCK_M)
    pid_n = pid // tl.cdiv(C, BLOCK_M)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < C
    n_mask = offs_n < N
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    g = 1.0
    if HAS_GAMMA:
        g = tl.load(GAMMA).to(tl.float32)
    at_ptrs = A + b * s_ab + k64[None, :] * s_ai + m64[:, None]            # A^T [BLOCK_M, BLOCK_K]
    g_ptrs = G + b * s_gb + m64[:, None] * s_gi + k64[None, :]             # G   [BLOCK_M, BLOCK_K]
    gt_ptrs = G + b * s_gb + k64[None, :] * s_gi + m64[:, None]            # G^T [BLOCK_M, BLOCK_K]
    x_ptrs = X + b * s_xb + k64[:, None] * s_xc + n64[None, :] * s_xn      # [BLOCK_K, BLOCK_N]
    dy_ptrs = DY + b * s_db + k64[:, None] * s_dc + n64[None, :] * s_dn    # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_mask = (k0 + offs_k) < C
        mk = m_mask[:, None] & k_mask[None, :]
        kn = k_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptrs, mask=kn, other=0.0)
        dy = tl.load(dy_ptrs, mask=kn, other=0.0).to(x.dtype)
        at = tl.load(at_ptrs, mask=mk, other=0.0)
        acc = _dot((g * at).to(x.dtype), dy, acc, PREC, F32_DOT)
        msym = tl.load(g_ptrs, mask=mk, other=0.0) + tl.load(gt_ptrs, mask=mk, other=0.0)
        if M_F32:
            acc = tl.dot(msym, x.to(tl.float32), acc, input_precision=PREC_M)
        else:
            acc = _dot(msym.to(x.dtype), x, acc, PREC, F32_DOT)
        at_ptrs += BLOCK_K * s_ai
        g_ptrs += BLOCK_K
        gt_ptrs += BLOCK_K * s_gi
        x_ptrs += BLOCK_K * s_xc
        dy_ptrs += BLOCK_K * s_dc
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_GAMMA:
        acc += tl.load(DY + b * s_db + m64[:, None] * s_dc + n64[None, :] * s_dn,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + b * s_eb + m64[:, None] * s_ec + n64[None, :] * s_en,
             acc.to(DX.dtype.element_ty), mask=mask)
