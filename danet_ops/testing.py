"""Check an implementation of the ops against the float64 oracle, like ``torch.testing``.

The oracle is ``backend="reference"`` (the released DANet code's bmm computation) run in
float64. A result computed from inputs of dtype D passes when, for the output and for every
input gradient,

    max |got - oracle|  <=  bound = max(2 * err_ref + analysis, floor(D) * max(|oracle|, 1))

* ``err_ref``: the error of the reference itself, run on the same inputs in D (flash-attention's
  rule: a fused kernel may be off by twice what PyTorch's own computation in that precision is
  off). It covers every error source the fused kernels share with the reference: the rounding of
  E = scale * q^T k, of the softmax, and of the N-long sums, in another order.
* ``analysis``: the first-order error terms of the sources a fused kernel has and the reference
  has not (derivations at `pam_extra_error`). Zero where the sources are the same (CAM; fp64).
* ``floor``: what one rounding of the result to D costs (table `FLOOR`); it matters only where
  the reference is (nearly) exact.

Every bound depends on the inputs only, never on the CPU or library that runs the test: the
reference's error is measured on the same machine (so it moves with the machine's BLAS), and the
analysis terms are computed in float64 from the inputs.

Use it to check your own build or backend::

    from danet_ops import testing
    testing.assert_close_to_reference("pam", lambda *t: my_pam(*t), [q, k, v, x, gamma])

Each comparison is reported to the callables in `observers` (name, err, bound, term): the test
suite's margin report (``pytest --margins``) uses that to list the comparisons closest to their
bound.
"""
import contextlib
import math
from typing import Callable, List, NamedTuple

import torch

from . import reference
from ._contract import output_dtype, stats_dtype

# The floor of the bound, relative to max(|oracle|, 1): one rounding of a result to the dtype
# (unit roundoff u = eps / 2) times a small factor for the few roundings a fused kernel does in
# another order than the reference.
FLOOR = {
    torch.float64: 1e-10,   # ~1e6 u: N-long fp64 sums in another order (any N the tests use)
    torch.float32: 1e-5,    # ~170 u: N-long fp32 sums in another blocking (N <= 1e4 here)
    torch.float16: 1e-3,    # 2 u (u = 2^-11): the result and one intermediate rounded to fp16
    torch.bfloat16: 8e-3,   # 2 u (u = 2^-8): the result and one intermediate rounded to bf16
}

# Unit roundoff of the precision the fused kernels compute in (stats_dtype: fp32, fp64 for fp64).
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
# Relative error of one exp() the kernels may use, in units of u: Sleef's u10 (ATen), glibc, CUDA
# __expf/ex2.approx (after the range reduction) and numpy's SIMD exp (the Triton interpreter) are
# each within 4 ulp of the exact value.
EXP_ULP = 4.0
# Standard deviations of the probabilistic bound of a long sum of independent roundings (Hoeffding):
# exceeded with probability at most 2 exp(-LAMBDA^2 / 2) < 3e-14.
LAMBDA = 8.0


PAM_NAMES = ("y", "dq", "dk", "dv", "dx", "dgamma")   # the result, then each input's gradient
CAM_NAMES = ("y", "dx", "dgamma")


class Comparison(NamedTuple):
    name: str
    err: float
    bound: float
    term: str         # which part of the bound is the largest: "2x-reference", "analysis", "floor"


observers: List[Callable[[Comparison], None]] = []


def max_err(a, b):
    """max |a - b| in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(name, got, oracle, reference_result=None, floor=1e-5, analysis=0.0):
    """Assert ``got`` is within the bound of the float64 ``oracle`` (module docstring); returns
    the `Comparison`. ``reference_result``: the reference's own result in the low precision."""
    scale = max(oracle.abs().max().item() if oracle.numel() else 0.0, 1.0)
    ref2 = 0.0 if reference_result is None else 2.0 * max_err(reference_result, oracle)
    fl = floor * scale
    bound = max(fl, ref2 + analysis)
    term = "floor" if fl >= ref2 + analysis else ("analysis" if analysis > ref2 else "2x-reference")
    return check_bound(name, max_err(got, oracle), bound, term, scale)


def check_bound(name, err, bound, term, scale=None):
    """Assert err <= bound (a bound derived elsewhere, with its reason beside it); report it."""
    result = Comparison(name, float(err), float(bound), term)
    for observe in observers:
        observe(result)
    where = "" if scale is None else f" (scale {scale:.2e})"
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} [{term}]{where}"
    return result


# ----------------------------------------------------------------------------- running the ops
def run_with_grads(fn, inputs, grad_seed=1):
    """fn(*inputs) and the gradients of <out, w> for a fixed random w (CPU generator)."""
    # detach(), not clone(): a clone of a view with gaps (channel slice, batch step, expand) is
    # contiguous, and the layout under test would silently be dropped.
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    w = upstream_grad(out, grad_seed)
    out.backward(w)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def upstream_grad(out, grad_seed=1):
    """The fixed random dy that `run_with_grads` feeds the backward."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed),
                       dtype=torch.float64).to(device=out.device, dtype=out.dtype)


def to64(inputs):
    return [None if t is None else t.detach().double() for t in inputs]


@contextlib.contextmanager
def tf32(allow):
    """Set torch's fp32-matmul TF32 policy (both switches the kernels read) and restore it after."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.set_float32_matmul_precision("high" if allow else "highest")
        yield
    finally:
        torch.set_float32_matmul_precision(prev[1])
        torch.backends.cuda.matmul.allow_tf32 = prev[0]


# ----------------------------------------------------------------------------- analysis terms
def _half_roundoff(dtype):
    """2u of a half input dtype (0 for fp32/fp64): the relative error of one conversion of an
    fp32 intermediate (P, dO, dE tiles) to that dtype before a tile product. 2u, not u: the
    Triton interpreter truncates fp32 -> bf16 where a GPU rounds to nearest."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2.0 * torch.finfo(dtype).eps / 2
    return 0.0


def pam_extra_error(q, k, v, x, gamma, scale, dy, block=1024):
    """First-order bounds of the errors a fused PAM may have and the reference has not, per result
    (y, dq, dk, dv, dx, dgamma), computed in float64 from the inputs: a dict name -> bound.

    u: unit roundoff of the compute precision (fp32; fp64 for fp64 inputs). h: 2u of the input
    dtype when it is fp16/bf16 (`_half_roundoff`), else 0.

    (1) The rebuilt softmax. The fused backward does not keep P: it rebuilds
    P^_ij = exp(E'_ij - lse_i) from E recomputed and the forward's log-sum-exp lse_i, stored in the
    compute precision. Relative to the P the forward used, P^_ij carries
        rho_ij <= u * (|lse_i|            lse_i = m_i + log l_i, rounded once when stored
                       + |lse_i|          ... and the sum m_i + log l_i, rounded once at |lse_i|
                       + |E_ij - lse_i|   the subtraction E'_ij - lse_i, rounded
                       + EXP_ULP          exp's own error
                       + EXP_ULP log Nk)  log's own error in log l_i (1 <= l_i <= Nk)
    With |lse| ~ max|E| in the hundreds (DANet's sharp rows) this is hundreds of ulps, while the
    softmax error both share is a few ulps. (E' itself carries the same kind and size of rounding
    as the reference's E; the factor 2 on the reference's error covers that second draw.)
    (2) Low-precision tiles. Kernels with fp16/bf16 inputs may convert P, dO and dE to the input
    dtype before their tile products (Triton, CUDA, the CPU low-precision path): each conversion
    a relative error <= h, which the reference (rounding E, A and its bmm outputs instead) does
    not have in the same places.
    Split rho_ij = r_i + e_ij into the row's common part r_i = u (2 |lse_i| + EXP_ULP log Nk)
    (one lse per row: it scales the whole row of P^) and e_ij = u (|E_ij - lse_i| + EXP_ULP).
    Propagated to first order, with dO = gamma dy, dA = dO^T v, Delta_i = sum_c dO_ci O_ci
    (read from the forward's O, not from P^: the row identity sum_j P_ij (dA_ij - Delta_i) = 0
    does not absorb the perturbation), dE = scale P (dA - Delta):
        |d O_ci|   <= (EXP_ULP u + h) sum_j P_ij |v_cj|                      (y: times |gamma|)
        |d dE_ij|  <= r_i |dE_ij| + D_ij,   D_ij = |scale| P_ij [(e_ij + h) |dA_ij - Delta_i|
                                    + h (sum_c |dO_ci||v_cj| + sum_c |dO_ci||O_ci|)] + h |dE_ij|
        |d dq_ci|  <= r_i |dq_ci| + sum_j D_ij |k_cj|    (r_i common to the row: sum_j dE_ij k_cj = dq_ci)
        |d dk_cj|  <= sum_i (r_i |dE_ij| + D_ij) |q_ci|
        |d dv_cj|  <= sum_i (rho_ij + 2h) P_ij |dO_ci|
    dx = dy exactly. Each of these is the worst case (the errors aligned), per component; the
    maximum over components is returned. dgamma = sum_ci dy_ci O_ci is ONE sum of B Cv Nq terms,
    for which the worst case (every rounding of every P_ij aligned) would be hundreds of times
    the error: there the roundings are taken as independent, each a bias common to all (at most
    h: a truncating conversion) plus a zero-mean part bounded by EXP_ULP u + h (the standard
    probabilistic model of rounding error, Higham & Mary 2019), and Hoeffding's inequality bounds
    the sum of the zero-mean parts by LAMBDA standard deviations except with probability
    2 exp(-LAMBDA^2 / 2) < 3e-14:
        |d dgamma| <= h |dgamma| + LAMBDA (EXP_ULP u + h) sqrt(sum_ij (P_ij a_ij)^2),
        a_ij = sum_c dy_ci v_cj         (d dgamma = sum_ij (d P_ij) a_ij).
    The online softmax's rescaling multiplies numerator and denominator by the same factor, and
    the forward uses E as the reference does: no other term.
    """
    u = UNIT_ROUNDOFF[stats_dtype(v.dtype)]
    h = _half_roundoff(v.dtype)
    q, k, v = (t.detach().double().flatten(2) for t in (q, k, v))
    dy = dy.detach().double().flatten(2)
    g = 1.0 if gamma is None else float(gamma.detach().double().reshape(-1)[0])
    s = float(scale)
    Nq = q.shape[2]
    log_nk = math.log(max(k.shape[2], 1))     # |log l_i| <= log Nk
    dO = g * dy
    ak, av = k.abs(), v.abs()
    out = dict.fromkeys(PAM_NAMES, 0.0)
    dk_acc, dv_acc = torch.zeros_like(k), torch.zeros_like(v)
    dgamma = dgamma_var = 0.0

    def peak(t):
        return t.max().item() if t.numel() else 0.0

    for i0 in range(0, Nq, block):   # query rows in blocks: O(block * Nk) memory
        qi, dOi, dyi = (t[:, :, i0:i0 + block] for t in (q, dO, dy))
        e = s * torch.bmm(qi.transpose(1, 2), k)                          # [B, n, Nk]
        lse = torch.logsumexp(e, dim=-1, keepdim=True)
        p = torch.exp(e - lse)
        o = torch.bmm(v, p.transpose(1, 2))                               # [B, Cv, n]
        d_a = torch.bmm(dOi.transpose(1, 2), v)                           # [B, n, Nk]
        delta = (dOi * o).sum(1).unsqueeze(-1)                            # [B, n, 1]
        d_e = s * p * (d_a - delta)
        r_row = u * (2 * lse.abs() + EXP_ULP * log_nk)                    # [B, n, 1]
        e_el = torch.nan_to_num(u * ((e - lse).abs() + EXP_ULP), posinf=0.0)   # -inf logits: P = 0
        d_el = abs(s) * p * ((e_el + h) * (d_a - delta).abs()
                             + h * (torch.bmm(dOi.abs().transpose(1, 2), av)
                                    + (dOi.abs() * o.abs()).sum(1).unsqueeze(-1))) + h * d_e.abs()
        dq = torch.bmm(k, d_e.transpose(1, 2))                            # [B, Cq, n]
        dq_err = r_row.transpose(1, 2) * dq.abs() + torch.bmm(ak, d_el.transpose(1, 2))
        out["dq"] = max(out["dq"], peak(dq_err))
        dk_acc += torch.bmm(qi.abs(), r_row * d_e.abs() + d_el)
        dv_acc += torch.bmm(dOi.abs(), (r_row + e_el + 2 * h) * p)
        o_err = (EXP_ULP * u + h) * torch.bmm(av, p.transpose(1, 2))      # [B, Cv, n]
        out["y"] = max(out["y"], abs(g) * peak(o_err))
        if gamma is not None:
            a_dy = torch.bmm(dyi.transpose(1, 2), v)                      # a_ij = sum_c dy_ci v_cj
            dgamma += (dyi * o).sum().item()
            dgamma_var += ((p * a_dy) ** 2).sum().item()
    out["dk"], out["dv"] = peak(dk_acc), peak(dv_acc)
    if gamma is not None:
        out["dgamma"] = h * abs(dgamma) + LAMBDA * (EXP_ULP * u + h) * math.sqrt(dgamma_var)
    return out


def cam_extra_error(x, gamma, mode, dy):
    """First-order bounds of the errors a fused CAM may have and the reference has not, per result
    (y, dx, dgamma): a dict name -> bound (derivation as in `pam_extra_error`).

    The fused kernels keep A (no rebuilt softmax); what differs is (2): with fp16/bf16 inputs they
    may convert A, dO and dS (the softmax gradient) to the input dtype before their products, and
    they return O in x's dtype (one rounding more, read again by the backward's Delta). With
    a = x [C, N], A = softmax(sigma E) (sigma = -1 "original", +1 "paper"), O = A a, dO = gamma dy,
    dA = dO a^T, Delta_i = sum_l A_il dA_il, dS = A (dA - Delta), dE = sigma dS:
        |d O_in|   <= (EXP_ULP u + h) sum_j A_ij |a_jn|
        |d dA_ij|  <= h sum_n |dO_in| |a_jn|
        |d Delta_i| <= sum_l A_il (h |dA_il| + |d dA_il|) + 2h sum_n |dO_in| |O_in|
        |d dS_ij|  <= A_ij (h |dA_ij - Delta_i| + |d dA_ij| + |d Delta_i|) + h |dS_ij|
        |d dx_jn|  <= 2h sum_i A_ij |dO_in| + sum_l (|d dS_jl| + |d dS_lj|) |a_ln|
    and for the one sum dgamma = sum_in dy_in O_in (A_ij and O_in rounded; as in `pam_extra_error`):
        |d dgamma| <= 2h |dgamma| + LAMBDA (EXP_ULP u + h) sqrt(sum_ij (A_ij b_ij)^2
                                                               + sum_in (dy_in O_in)^2),
        b_ij = sum_n dy_in a_jn.
    """
    u = UNIT_ROUNDOFF[stats_dtype(x.dtype)]
    h = _half_roundoff(x.dtype)
    a = x.detach().double().flatten(2)
    dy = dy.detach().double().flatten(2)
    g = 1.0 if gamma is None else float(gamma.detach().double().reshape(-1)[0])
    sigma = -1.0 if mode == "original" else 1.0
    e = torch.bmm(a, a.transpose(1, 2))
    A = torch.softmax(sigma * e, dim=-1)
    o = torch.bmm(A, a)
    dO = g * dy
    aa, adO = a.abs(), dO.abs()
    d_a = torch.bmm(dO, a.transpose(1, 2))                                # [B, C, C]
    delta = (A * d_a).sum(-1, keepdim=True)
    d_s = A * (d_a - delta)
    err_da = h * torch.bmm(adO, aa.transpose(1, 2))
    err_delta = ((A * (h * d_a.abs() + err_da)).sum(-1, keepdim=True)
                 + 2 * h * (adO * o.abs()).sum(-1, keepdim=True))
    err_ds = A * (h * (d_a - delta).abs() + err_da + err_delta) + h * d_s.abs()
    err_o = (EXP_ULP * u + h) * torch.bmm(A, aa)
    err_dx = 2 * h * torch.bmm(A.transpose(1, 2), adO) + torch.bmm(err_ds + err_ds.transpose(1, 2), aa)

    def peak(t):
        return t.max().item() if t.numel() else 0.0
    out = {"y": abs(g) * peak(err_o), "dx": peak(err_dx), "dgamma": 0.0}
    if gamma is not None:
        b = torch.bmm(dy, a.transpose(1, 2))
        dyo = dy * o
        sd = math.sqrt(((A * b) ** 2).sum().item() + (dyo ** 2).sum().item())
        out["dgamma"] = 2 * h * abs(dyo.sum().item()) + LAMBDA * (EXP_ULP * u + h) * sd
    return out


# ----------------------------------------------------------------------------- the comparisons


def compare_to_oracle(fn, oracle_fn, inputs, names, floor, analysis=None):
    """fn(*inputs) and its input gradients vs oracle_fn in float64 (bound: module docstring).

    names: one per compared quantity (the output, then each input's gradient); analysis: a dict
    name -> extra first-order term (pam_extra_error), or None. Where the oracle is finite the
    result must be too. Returns the outputs and gradients of fn.
    """
    dtype = inputs[0].dtype
    got, grads = run_with_grads(fn, inputs)
    ref64, grads64 = run_with_grads(oracle_fn, to64(inputs))
    lowp_all = [None] * (1 + len(grads64))
    if dtype != torch.float64:
        lowp, grads_lowp = run_with_grads(oracle_fn, inputs)
        lowp_all = [lowp] + grads_lowp
    for i, (name, g, o, lp) in enumerate(zip(names, [got] + grads, [ref64] + grads64, lowp_all)):
        if o is None:
            continue
        want = got.dtype if i == 0 else inputs[i - 1].dtype
        if i == 0 and lp is not None:
            want = lp.dtype                     # the output dtype the reference gives
        assert g.dtype == want, f"{name}: dtype {g.dtype}, expected {want}"
        assert g.shape == o.shape, f"{name}: shape {tuple(g.shape)} != {tuple(o.shape)}"
        assert torch.isfinite(g).all() or not torch.isfinite(o).all(), f"{name}: non-finite values"
        extra = (analysis or {}).get(name, 0.0)
        check(name, g, o, lp, floor, extra)
    return got, grads


def compare_pam(fn, inputs, floor, scale=1.0):
    """fn(q, k, v[, x, gamma]) (a PAM implementation, e.g. position_attention with a backend):
    y and every gradient vs the float64 oracle. fp32 at IEEE precision (no TF32)."""
    oracle = lambda *t: reference.position_attention(*t, scale=scale)   # noqa: E731
    q, k, v, x, gamma = (list(inputs) + [None, None])[:5]
    out_dtype = v.dtype if x is None else output_dtype(v.dtype, x.dtype, gamma.dtype)
    dy = upstream_grad(torch.empty((v.shape[0], v.shape[1], *q.shape[2:]), dtype=out_dtype))
    analysis = pam_extra_error(q, k, v, x, gamma, scale, dy)
    with tf32(False):
        return compare_to_oracle(fn, oracle, inputs, PAM_NAMES, floor, analysis)


def compare_cam(fn, inputs, mode, floor):
    """fn(x, gamma) (a CAM implementation): y, dx, dgamma vs the float64 oracle, as above."""
    oracle = lambda x, g: reference.channel_attention(x, g, mode=mode)   # noqa: E731
    x, gamma = inputs
    out_dtype = x.dtype if gamma is None else output_dtype(x.dtype, x.dtype, gamma.dtype)
    dy = upstream_grad(torch.empty(x.shape, dtype=out_dtype))
    analysis = cam_extra_error(x, gamma, mode, dy)
    with tf32(False):
        return compare_to_oracle(fn, oracle, inputs, CAM_NAMES, floor, analysis)


def assert_close_to_reference(op, fn, inputs, mode="original", scale=1.0, floor=None):
    """Public entry: assert that ``fn`` computes ``op`` ("pam": fn(q, k, v[, x, gamma]); "cam":
    fn(x[, gamma])) within the bound of the float64 reference, for the result and every input
    gradient. floor: default `FLOOR` of the inputs' dtype."""
    inputs = list(inputs)
    floor = FLOOR[inputs[0].dtype] if floor is None else floor
    if op == "pam":
        return compare_pam(fn, inputs, floor, scale)
    if op == "cam":
        if len(inputs) == 1:
            inputs.append(None)
        return compare_cam(fn, inputs, mode, floor)
    raise ValueError(f"op must be 'pam' or 'cam'; got {op!r}")
