"""Backend "triton", CAM: the kernels, their launch configs (autotune tables, shared-memory
estimates) and the host code (checks, allocation, grids, launches). Mirrors csrc/cuda/cam_kernels.cu.

forward:  cam_mm_nt_partial_kernel (SYMMETRIC: upper block pairs of E = a a^T, split over N)
          cam_softmax_kernel (sum the partials in fixed order, mirror, softmax rows) -> attn
          cam_apply_kernel (O = A a, y = gamma O + a)
backward: rowdot_kernel (rowdot.py) -> dgamma = sum(dy o)          (gamma given)
          cam_mm_nt_partial_kernel (dy a^T split over N, all block pairs)
          cam_bwd_ds_kernel (dA = g sum, dE = +-A (dA - rowsum(dA A)))  -> G [B, C, C]
          cam_bwd_dx_kernel (dx = A^T dO + (G + G^T) a + dy)
No atomics anywhere. Kernel conventions (strides, int64 offsets, fp32 accumulation, exp2
softmax): _jit.py. Importing this module imports triton (ops.py imports it on the first call).
"""
import torch
import triton
import triton.language as tl
from triton import cdiv

from ._autotune import IEEE, Fixed, Tuned, tiles
from ._jit import LOG2E, _dot, _store_residual
from ._runtime import (check_device, check_dtypes, dot_precision, f32_dot, n_key, on_device,
                       sm_count, strides)
from .rowdot import rowdot
from .._contract import CAM_MODES, output_dtype


# ============================================================================ kernels
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


# ============================================================================ launch configs
# Autotune candidates (_autotune.py: groups, pruning) and shared-memory estimates: bytes of the
# pipelined operand tiles of a config, to prune the impossible (es: the operand's element size).
def _mm_smem(meta, stages, args):
    return args["elt"] * stages * 2 * meta["BLOCK_C"] * meta["BLOCK_K"]


def _apply_smem(meta, stages, args):  # fp32 A tile + a tile
    return stages * meta["BLOCK_K"] * (4 * meta["BLOCK_M"] + args["elt"] * meta["BLOCK_N"])


def _dx_smem(meta, stages, args):  # fp32 A^T, G, G^T tiles + a and dy tiles
    return stages * meta["BLOCK_K"] * (3 * 4 * meta["BLOCK_M"] + 2 * args["elt"] * meta["BLOCK_N"])


MM_NT_PARTIAL = Tuned(
    cam_mm_nt_partial_kernel, names=("BLOCK_C", "BLOCK_K"), dims=("C", "N"), operand="Y",
    key=["N_KEY", "C", "CHUNK", "SYMMETRIC"], smem=_mm_smem, interp=dict(BLOCK_C=16, BLOCK_K=16),
    tiles=tiles("sm90", [((64, 128), 4, 4), ((128, 64), 8, 3), ((64, 64), 4, 4), ((128, 128), 8, 3)])
    + tiles("sm80", [((64, 64), 4, 4), ((128, 32), 4, 4), ((128, 64), 8, 3)])
    + tiles(IEEE, [((64, 32), 4, 2), ((32, 64), 4, 3), ((128, 32), 8, 2)]))

APPLY = Tuned(
    cam_apply_kernel, names=("BLOCK_M", "BLOCK_N", "BLOCK_K"), dims=("C", "N", "C"), operand="X",
    key=["N_KEY", "C", "HAS_RES"], smem=_apply_smem,
    interp=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
    tiles=tiles("sm90", [((64, 128, 64), 4, 3), ((128, 128, 64), 8, 3), ((128, 64, 64), 4, 4),
                         ((64, 256, 32), 8, 3)])
    + tiles("sm80", [((64, 128, 32), 4, 3), ((128, 128, 32), 8, 3), ((64, 64, 64), 4, 4)]))

BWD_DX = Tuned(  # three fp32 [M, K] tiles (A^T, G, G^T) per step: smaller K than APPLY
    cam_bwd_dx_kernel, names=("BLOCK_M", "BLOCK_N", "BLOCK_K"), dims=("C", "N", "C"), operand="X",
    key=["N_KEY", "C", "HAS_GAMMA"], smem=_dx_smem, interp=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
    tiles=tiles("sm90", [((64, 128, 32), 4, 3), ((128, 128, 32), 8, 3), ((64, 64, 32), 4, 4),
                         ((128, 64, 32), 4, 3)])
    + tiles("sm80", [((64, 128, 32), 8, 2), ((128, 64, 32), 8, 2), ((64, 64, 32), 4, 3)]))

# The row-wise kernels (whole rows of a [C, C] matrix per program): one fixed config.
_ROWS = dict(gpu=dict(BLOCK_R=16, BLOCK_J=128), num_warps=4, interp=dict(BLOCK_R=16, BLOCK_J=16))
SOFTMAX = Fixed(cam_softmax_kernel, **_ROWS)
BWD_DS = Fixed(cam_bwd_ds_kernel, **_ROWS)


# ============================================================================ host
# CAM_MODES[0], the released code's mode: A = softmax(rowmax(E) - E) = softmax(-E); the other
# (the paper's Eq. 3): A = softmax(E).
_NEGATED = CAM_MODES[0]


def _check(x, gamma, mode, what):
    if x.dim() != 3:
        raise ValueError(f"{what} (triton): x must be [B, C, N]; got {tuple(x.shape)}")
    if mode not in CAM_MODES:
        raise ValueError(f"{what} (triton): mode must be one of {CAM_MODES}; got {mode!r}")
    if gamma is not None and gamma.numel() != 1:
        raise ValueError(f"{what} (triton): gamma must have one element; got {tuple(gamma.shape)}")
    check_dtypes((("x", x), ("gamma", gamma)))
    check_device(x)


def _splits(B, C, N, device, symmetric):
    """(S, CHUNK): the N axis of a C x C product is cut into S chunks of CHUNK positions so that
    enough programs run (about 2 per SM); each writes its own fp32 partial (no atomics)."""
    if device.type == "cpu":              # interpreter: at most 2 splits (tests exercise both paths)
        want, min_chunk, align = 2, 32, 16
    else:
        t = cdiv(C, 64)
        blocks = t * (t + 1) // 2 if symmetric else t * t
        want = cdiv(2 * sm_count(device), blocks * B)
        min_chunk, align = 1024, 128
    s = max(1, min(want, cdiv(N, min_chunk)))
    chunk = cdiv(cdiv(N, s), align) * align
    return cdiv(N, chunk), chunk


def _mm_nt_partial(X, Y, symmetric):
    """P[s, b, i, j] = sum over split s of X[b, i, n] Y[b, j, n]; [S, B, C, C] fp32."""
    B, C, N = Y.shape
    dev = Y.device
    S, chunk = _splits(B, C, N, dev, symmetric)
    part = torch.empty((S, B, C, C), dtype=torch.float32, device=dev)
    with on_device(Y):
        MM_NT_PARTIAL.launch(
            dev, lambda m: (cdiv(C, m["BLOCK_C"]) ** 2, S, B),
            X, Y, part, C, N, chunk, *strides(X), *strides(Y), *strides(part)[:3],
            n_key(N), SYMMETRIC=symmetric, PREC=dot_precision(Y.dtype), F32_DOT=f32_dot(Y.dtype))
    return part, S


def forward(x, gamma, mode):
    """x: [B, C, N] (any strides); gamma: [1] | None; mode: one of _contract.CAM_MODES.
    -> o [B, C, N] (x's dtype), attn [B, C, C] fp32, y = gamma*o + x (or shape [0])."""
    _check(x, gamma, mode, "cam_forward")
    B, C, N = x.shape
    dev = x.device
    residual = gamma is not None
    o = torch.empty((B, C, N), dtype=x.dtype, device=dev)
    attn = torch.empty((B, C, C), dtype=torch.float32, device=dev)
    if residual:
        y = torch.empty((B, C, N), dtype=output_dtype(x.dtype, x.dtype, gamma.dtype), device=dev)
    else:
        y = x.new_empty((0,))
    if B == 0 or C == 0:
        return o, attn, y
    if N == 0:                                          # E = 0: uniform rows
        return o, attn.fill_(1.0 / C), y

    part, S = _mm_nt_partial(x, x, symmetric=True)
    ys = strides(y) if residual else (0, 0, 0)
    with on_device(x):
        SOFTMAX.launch(
            dev, lambda m: (cdiv(C, m["BLOCK_R"]), B),
            part, attn, C, S, *strides(part)[:3], *strides(attn)[:2], NEG=(mode == _NEGATED))
        APPLY.launch(
            dev, lambda m: (cdiv(C, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]), B),
            attn, x, gamma if residual else attn, o, y if residual else o, C, N,
            *strides(attn)[:2], *strides(x), *strides(o), *ys, n_key(N),
            HAS_RES=residual, PREC=dot_precision(x.dtype), F32_DOT=f32_dot(x.dtype))
    return o, attn, y


def backward(dy, x, attn, o, gamma, mode):
    """dy: gradient of y (gamma given) or of o, [B, C, N] any strides.
    -> dx [B, C, N] (x's dtype; full gradient: Gram both sides + value + residual), dgamma."""
    _check(x, gamma, mode, "cam_backward")
    if dy.shape != x.shape or o.shape != x.shape:
        raise ValueError(f"cam_backward (triton): dy and o must have x's shape {tuple(x.shape)}; "
                         f"got dy {tuple(dy.shape)}, o {tuple(o.shape)}")
    B, C, N = x.shape
    if attn.shape != (B, C, C):
        raise ValueError(f"cam_backward (triton): attn must be [B, C, C]; got {tuple(attn.shape)}")
    check_dtypes((("dy", dy), ("o", o)))
    dev = x.device
    has_gamma = gamma is not None
    dx = torch.empty((B, C, N), dtype=x.dtype, device=dev)
    if B == 0 or C == 0 or N == 0:
        dgamma = torch.zeros((1,) if has_gamma else (0,), dtype=torch.float32, device=dev)
        return dx, dgamma
    attn = attn.float().contiguous()                    # kernels assume unit stride along j
    if has_gamma:
        dgamma = rowdot(dy, o).sum().reshape(1)
    else:
        dgamma = torch.empty((0,), dtype=torch.float32, device=dev)

    part, S = _mm_nt_partial(dy, x, symmetric=False)   # dA / g, split over N
    g_mat = torch.empty((B, C, C), dtype=torch.float32, device=dev)
    gptr = gamma if has_gamma else attn
    m_f32 = x.dtype in (torch.float32, torch.float16)
    with on_device(x):
        BWD_DS.launch(
            dev, lambda m: (cdiv(C, m["BLOCK_R"]), B),
            part, attn, gptr, g_mat, C, S, *strides(part)[:3], *strides(attn)[:2],
            *strides(g_mat)[:2], NEG=(mode == _NEGATED), HAS_GAMMA=has_gamma)
        BWD_DX.launch(
            dev, lambda m: (cdiv(C, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]), B),
            attn, g_mat, x, dy, gptr, dx, C, N,
            *strides(attn)[:2], *strides(g_mat)[:2], *strides(x), *strides(dy), *strides(dx), n_key(N),
            HAS_GAMMA=has_gamma, PREC=dot_precision(x.dtype), F32_DOT=f32_dot(x.dtype),
            M_F32=m_f32, PREC_M=dot_precision(torch.float32) if x.dtype == torch.float32 else "tf32")
    return dx, dgamma
