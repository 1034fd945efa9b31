"""Triton kernels of CAM (mirrors csrc/cuda/cam_kernels.cu). Host code: cam.py.

forward:  cam_mm_nt_partial_kernel (Gram partials), cam_softmax_kernel, cam_apply_kernel;
backward: cam_mm_nt_partial_kernel (dy a^T partials), cam_bwd_ds_kernel, cam_bwd_dx_kernel
(dgamma from the shared rowdot_kernel of _common_kernels.py). Conventions (strides, int64
offsets, fp32 accumulation, exp2 softmax): _common_kernels.py. Importing this module imports triton.
"""
import triton
import triton.language as tl

# rowdot_kernel: launched by the host as K.rowdot_kernel (_common.rowdot)
from ._common_kernels import LOG2E, _dot, _store_residual, rowdot_kernel  # noqa: F401


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
def _row_block(C, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Rows of a [C, C] matrix owned by a program of grid (cdiv(C, BLOCK_R), B), and the column
    offsets of one BLOCK_J step: (b, offs_i, offs_j, i_mask, i64) (b, i64: int64)."""
    offs_i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    return (tl.program_id(1).to(tl.int64), offs_i, tl.arange(0, BLOCK_J), offs_i < C,
            offs_i.to(tl.int64))


@triton.jit
def cam_softmax_kernel(P, A, C, S, s_ps, s_pb, s_pi, s_ab, s_ai,
                       NEG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Reduce the Gram partials, mirror the upper triangle, and softmax each row:

        E[i, j] = sum_s P[s, b, min(i, j), max(i, j)]
        A[b, i, :] = softmax_j(-E[i, :])  (NEG, mode "original" = softmax(rowmax(E) - E))
                   | softmax_j(E[i, :])   (mode paper: the paper's Eq. 3)

    computed stably (max subtracted, exp2 with log2(e) folded). P: [S, B, C, C] fp32 (upper
    triangle valid); A: [B, C, C] fp32 (unit stride along j). Grid (cdiv(C, BLOCK_R), B): a
    program owns whole rows. First pass: sum the S partials once, keep the logits z (log2
    units) in A's rows as scratch, online max/sum; second pass: A = exp2(z - m) / l in place.
    """
    b, offs_i, offs_j, i_mask, i64 = _row_block(C, BLOCK_R, BLOCK_J)
    sign = 1.0
    if NEG:
        sign = -1.0
    a_rows = A + b * s_ab + i64[:, None] * s_ai
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    for j0 in range(0, C, BLOCK_J):
        j_mask = (j0 + offs_j) < C
        mask = i_mask[:, None] & j_mask[None, :]
        j64 = (j0 + offs_j).to(tl.int64)
        e = _gram_rows(P, b, i64, j64, mask, S, s_ps, s_pb, s_pi, BLOCK_R, BLOCK_J)
        z = tl.where(j_mask[None, :], sign * e * LOG2E, float("-inf"))
        tl.store(a_rows + j64[None, :], z, mask=mask)
        m_new = tl.maximum(m_i, tl.max(z, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)   # only -inf so far: weights 0
        l_i = l_i * tl.exp2(m_i - base) + tl.sum(tl.exp2(z - base[:, None]), 1)
        m_i = m_new
    tl.debug_barrier()   # the z stored above (by any thread of the program) before it is read
    for j0 in range(0, C, BLOCK_J):
        mask = i_mask[:, None] & ((j0 + offs_j) < C)[None, :]
        ptrs = a_rows + (j0 + offs_j).to(tl.int64)[None, :]
        z = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, tl.exp2(z - m_i[:, None]) / l_i[:, None], mask=mask)


@triton.jit
def _channel_position_tile(C, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """The [BLOCK_M channels, BLOCK_N positions] output tile of a [C, C] x [C, N] product for a
    program of grid (cdiv(C, BLOCK_M) * cdiv(N, BLOCK_N), B), row blocks fastest (programs that
    run together share a column block of a in L2): (b, offs_m, offs_n, offs_k, m_mask, n_mask)."""
    pid = tl.program_id(0)
    pid_m = pid % tl.cdiv(C, BLOCK_M)
    pid_n = pid // tl.cdiv(C, BLOCK_M)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return b, offs_m, offs_n, tl.arange(0, BLOCK_K), offs_m < C, offs_n < N


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
    b, offs_m, offs_n, offs_k, m_mask, n_mask = _channel_position_tile(C, N, BLOCK_M, BLOCK_N,
                                                                       BLOCK_K)
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
        _store_residual(GAMMA, X, Y, b * s_xb + m64[:, None] * s_xc + n64[None, :] * s_xn,
                        b * s_yb + m64[:, None] * s_yc + n64[None, :] * s_yn, acc, mask)


@triton.jit
def cam_bwd_ds_kernel(P, A, GAMMA, G, C, S, s_ps, s_pb, s_pi, s_ab, s_ai, s_gb, s_gi,
                      NEG: tl.constexpr, HAS_GAMMA: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Softmax backward on whole rows:

        dA[i, j] = g * sum_s P[s, b, i, j]   (P: split-N partials of dy a^T; g = gamma or 1)
        r_i      = sum_j dA[i, j] A[i, j]
        G[i, j]  = dE[i, j] = +-A[i, j] (dA[i, j] - r_i)   (- for NEG: A = softmax(-E))

    P: [S, B, C, C] fp32; A, G: [B, C, C] fp32 (unit stride along j). Grid (cdiv(C, BLOCK_R), B).
    First pass: sum the S partials once into dA, kept in G's rows as scratch, and r; second
    pass: G = +-A (dA - r) in place.
    """
    b, offs_i, offs_j, i_mask, i64 = _row_block(C, BLOCK_R, BLOCK_J)
    g = 1.0
    if HAS_GAMMA:
        g = tl.load(GAMMA).to(tl.float32)
    sign = 1.0
    if NEG:
        sign = -1.0
    p_rows = P + b * s_pb + i64[:, None] * s_pi
    a_rows = A + b * s_ab + i64[:, None] * s_ai
    g_rows = G + b * s_gb + i64[:, None] * s_gi
    r = tl.zeros((BLOCK_R,), tl.float32)
    for j0 in range(0, C, BLOCK_J):
        j64 = (j0 + offs_j).to(tl.int64)
        mask = i_mask[:, None] & ((j0 + offs_j) < C)[None, :]
        da = tl.zeros((BLOCK_R, BLOCK_J), tl.float32)
        for s in range(0, S):
            da += tl.load(p_rows + s * s_ps + j64[None, :], mask=mask, other=0.0)
        da = g * da
        tl.store(g_rows + j64[None, :], da, mask=mask)
        a = tl.load(a_rows + j64[None, :], mask=mask, other=0.0)
        r += tl.sum(da * a, 1)
    tl.debug_barrier()   # the dA stored above (by any thread of the program) before it is read
    for j0 in range(0, C, BLOCK_J):
        j64 = (j0 + offs_j).to(tl.int64)
        mask = i_mask[:, None] & ((j0 + offs_j) < C)[None, :]
        da = tl.load(g_rows + j64[None, :], mask=mask, other=0.0)
        a = tl.load(a_rows + j64[None, :], mask=mask, other=0.0)
        tl.store(g_rows + j64[None, :], sign * a * (da - r[:, None]), mask=mask)


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
    b, offs_m, offs_n, offs_k, m_mask, n_mask = _channel_position_tile(C, N, BLOCK_M, BLOCK_N,
                                                                       BLOCK_K)
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
