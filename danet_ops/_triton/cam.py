"""Host side of the Triton CAM ops: checks, allocation, grids, launches (cam_kernels.py).

forward:  cam_mm_nt_partial_kernel (SYMMETRIC: upper block pairs of E = a a^T, split over N)
          cam_softmax_kernel (sum the partials in fixed order, mirror, softmax rows) -> attn
          cam_apply_kernel (O = A a, y = gamma O + a)
backward: rowdot_kernel -> dgamma = sum(dy o)                       (gamma given)
          cam_mm_nt_partial_kernel (dy a^T split over N, all block pairs)
          cam_bwd_ds_kernel (dA = g sum, dE = +-A (dA - rowsum(dA A)))  -> G [B, C, C]
          cam_bwd_dx_kernel (dx = A^T dO + (G + G^T) a + dy)
"""
import torch
from triton import cdiv

from . import _common as C
from . import cam_kernels as K
from .._contract import CAM_MODES, output_dtype

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
    C.check_dtypes((("x", x), ("gamma", gamma)))
    C.check_device(x)


def _splits(B, Cc, N, device, symmetric):
    """(S, CHUNK): the N axis of a C x C product is cut into S chunks of CHUNK positions so that
    enough programs run (about 2 per SM); each writes its own fp32 partial (no atomics)."""
    if device.type == "cpu":              # interpreter: at most 2 splits (tests exercise both paths)
        want, min_chunk, align = 2, 32, 16
    else:
        t = cdiv(Cc, 64)
        blocks = t * (t + 1) // 2 if symmetric else t * t
        want = cdiv(2 * C.sm_count(device), blocks * B)
        min_chunk, align = 1024, 128
    s = max(1, min(want, cdiv(N, min_chunk)))
    chunk = cdiv(cdiv(N, s), align) * align
    return cdiv(N, chunk), chunk


def _mm_nt_partial(X, Y, symmetric):
    """P[s, b, i, j] = sum over split s of X[b, i, n] Y[b, j, n]; [S, B, C, C] fp32."""
    B, Cc, N = Y.shape
    dev = Y.device
    S, chunk = _splits(B, Cc, N, dev, symmetric)
    part = torch.empty((S, B, Cc, Cc), dtype=torch.float32, device=dev)
    kern = C.launcher(K, "cam_mm", "cam_mm_nt_partial_kernel",
                      ["N_KEY", "C", "CHUNK", "SYMMETRIC"], dev)
    with C.on_device(Y):
        kern[lambda m: (cdiv(Cc, m["BLOCK_C"]) ** 2, S, B)](
            X, Y, part, Cc, N, chunk, *C.strides(X), *C.strides(Y), *C.strides(part)[:3],
            C.n_key(N), SYMMETRIC=symmetric, PREC=C.dot_precision(Y.dtype),
            F32_DOT=C.f32_dot(Y.dtype), **C.meta_for("cam_mm", dev))
    return part, S


def forward(x, gamma, mode):
    """x: [B, C, N] (any strides); gamma: [1] | None; mode: one of _contract.CAM_MODES.
    -> o [B, C, N] (x's dtype), attn [B, C, C] fp32, y = gamma*o + x (or shape [0])."""
    _check(x, gamma, mode, "cam_forward")
    B, Cc, N = x.shape
    dev = x.device
    residual = gamma is not None
    o = torch.empty((B, Cc, N), dtype=x.dtype, device=dev)
    attn = torch.empty((B, Cc, Cc), dtype=torch.float32, device=dev)
    if residual:
        y = torch.empty((B, Cc, N), dtype=output_dtype(x.dtype, x.dtype, gamma.dtype), device=dev)
    else:
        y = x.new_empty((0,))
    if B == 0 or Cc == 0:
        return o, attn, y
    if N == 0:                                          # E = 0: uniform rows
        return o, attn.fill_(1.0 / Cc), y

    part, S = _mm_nt_partial(x, x, symmetric=True)
    meta, warps = C.fixed("cam_rows", dev)
    with C.on_device(x):
        K.cam_softmax_kernel[(cdiv(Cc, meta["BLOCK_R"]), B)](
            part, attn, Cc, S, *C.strides(part)[:3], *C.strides(attn)[:2],
            NEG=(mode == _NEGATED), num_warps=warps, **meta)

        kern = C.launcher(K, "cam_apply", "cam_apply_kernel", ["N_KEY", "C", "HAS_RES"], dev)
        ys = C.strides(y) if residual else (0, 0, 0)
        kern[lambda m: (cdiv(Cc, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]), B)](
            attn, x, gamma if residual else attn, o, y if residual else o, Cc, N,
            *C.strides(attn)[:2], *C.strides(x), *C.strides(o), *ys, C.n_key(N),
            HAS_RES=residual, PREC=C.dot_precision(x.dtype), F32_DOT=C.f32_dot(x.dtype),
            **C.meta_for("cam_apply", dev))
    return o, attn, y


def backward(dy, x, attn, o, gamma, mode):
    """dy: gradient of y (gamma given) or of o, [B, C, N] any strides.
    -> dx [B, C, N] (x's dtype; full gradient: Gram both sides + value + residual), dgamma."""
    _check(x, gamma, mode, "cam_backward")
    if dy.shape != x.shape or o.shape != x.shape:
        raise ValueError(f"cam_backward (triton): dy and o must have x's shape {tuple(x.shape)}; "
                         f"got dy {tuple(dy.shape)}, o {tuple(o.shape)}")
    B, Cc, N = x.shape
    if attn.shape != (B, Cc, Cc):
        raise ValueError(f"cam_backward (triton): attn must be [B, C, C]; got {tuple(attn.shape)}")
    C.check_dtypes((("dy", dy), ("o", o)))
    dev = x.device
    has_gamma = gamma is not None
    dx = torch.empty((B, Cc, N), dtype=x.dtype, device=dev)
    if B == 0 or Cc == 0 or N == 0:
        dgamma = torch.zeros((1,) if has_gamma else (0,), dtype=torch.float32, device=dev)
        return dx, dgamma
    attn = attn.float().contiguous()                    # kernels assume unit stride along j
    if has_gamma:
        dgamma = C.rowdot(K, dy, o).sum().reshape(1)
    else:
        dgamma = torch.empty((0,), dtype=torch.float32, device=dev)

    part, S = _mm_nt_partial(dy, x, symmetric=False)   # dA / g, split over N
    g_mat = torch.empty((B, Cc, Cc), dtype=torch.float32, device=dev)
    meta, warps = C.fixed("cam_rows", dev)
    gptr = gamma if has_gamma else attn
    with C.on_device(x):
        K.cam_bwd_ds_kernel[(cdiv(Cc, meta["BLOCK_R"]), B)](
            part, attn, gptr, g_mat, Cc, S, *C.strides(part)[:3], *C.strides(attn)[:2],
            *C.strides(g_mat)[:2], NEG=(mode == _NEGATED), HAS_GAMMA=has_gamma,
            num_warps=warps, **meta)

        kern = C.launcher(K, "cam_dx", "cam_bwd_dx_kernel", ["N_KEY", "C", "HAS_GAMMA"], dev)
        m_f32 = x.dtype in (torch.float32, torch.float16)
        kern[lambda m: (cdiv(Cc, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]), B)](
            attn, g_mat, x, dy, gptr, dx, Cc, N,
            *C.strides(attn)[:2], *C.strides(g_mat)[:2], *C.strides(x), *C.strides(dy),
            *C.strides(dx), C.n_key(N),
            HAS_GAMMA=has_gamma, PREC=C.dot_precision(x.dtype), F32_DOT=C.f32_dot(x.dtype),
            M_F32=m_f32, PREC_M=C.dot_precision(torch.float32) if x.dtype == torch.float32 else "tf32",
            **C.meta_for("cam_dx", dev))
    return dx, dgamma
