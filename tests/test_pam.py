"""Position attention (and the general op: scale, keys of their own length) against the float64
oracle: every case on every backend x device x CPU path this process can run, in every dtype it
supports (conftest.BACKENDS: reference; cpu; cpu-lowp and cpu-fp32tiles for fp16/bf16;
triton-interp under the interpreter in its own invocation; triton-cuda and cuda on a GPU),
through one comparison (danet_ops.testing.compare_pam) and one error bound (2x the reference's own
error in that dtype plus the analysis terms of the fused kernels' own error sources, or the
dtype's floor). docs/ARCHITECTURE.md tabulates the cases per backend and dtype."""
import pytest
import torch

import danet_ops
from danet_ops import PositionAttention, position_attention, reference
from danet_ops import backends
from danet_ops._contract import stats_dtype
from danet_ops.testing import UNIT_ROUNDOFF, check_bound
from conftest import (BACKENDS, FLOOR, LAYOUTS, backend_grid, backend_params, compare_pam, device_for,
                      floor, GENERAL_CASES, general_inputs, lowp_bound, max_err, pam_inputs, pam_minus_inf_inputs,
                      run_with_grads, tf32, to64)

SHAPES = [  # B, Cq, Cv, H, W  (ragged: N never a multiple of the 256 tile except where noted)
    (2, 8, 16, 13, 1),
    (1, 4, 12, 97, 97),     # N = 9409: 37 ragged key/query blocks
    (2, 3, 5, 20, 30),
    (3, 1, 1, 300, 1),      # Cq = Cv = 1
    (1, 16, 24, 16, 16),    # N = 256: exactly one tile
    # the interpreter's blocks: 16 positions, 16 value channels
    (2, 5, 24, 7, 5),       # N = 35: ragged query/key blocks; Cv = 24: two value chunks
    (1, 3, 12, 4, 4),       # N = 16: exactly one block; one value chunk (dK written directly)
    (1, 1, 1, 17, 1),       # Cq = Cv = 1, N = 17
    (1, 20, 40, 3, 3),      # Cq = 20 padded to 32; three value chunks, the last one ragged
    # the limits of danet_ops/_contract.py: 1 <= Cq <= 256, 1 <= Cv <= 4096, N >= 1
    (2, 4, 8, 1, 1),        # N = 1: one key, every weight exactly 1
    (1, 256, 8, 3, 4),      # Cq = 256
    (1, 4, 4096, 2, 3),     # Cv = 4096
]


def _small(shape):
    """Shapes the Triton interpreter runs in about a second: B * N <= 128 positions and Cv <= 64
    (it walks Cv in 16-channel chunks: Cv = 4096 takes ~15 s; triton-cuda runs that case)."""
    return shape[0] * shape[3] * shape[4] <= 128 and shape[2] <= 64


def _interp_small(backend, shape, dtype=None):
    """backend_grid's keep: the interpreter only on _small shapes."""
    return backend != "triton-interp" or _small(shape)


def _keep(backend, shape, dtype=None):
    if backend == "triton-interp":
        return _small(shape)
    # the reference beside its own float64 run: only where that costs little (N x N in fp64)
    return backend != "reference" or shape[3] * shape[4] <= 1024


def _compare(backend, inputs, fl, **kw):
    return compare_pam(backend, inputs, fl, **kw)


def _run(backend_id, shape, dtype, **inputs_kw):
    """pam_inputs on the backend's device, compared with the oracle under floor(dtype, backend)."""
    name, dev = device_for(backend_id, "pam", dtype)
    inputs = pam_inputs(*shape, dtype=dtype, device=dev, **inputs_kw)
    return _compare(name, inputs, floor(dtype, backend_id))


@pytest.mark.parametrize("backend,shape,dtype", backend_grid(SHAPES, [torch.float64, torch.float32],
                                                             keep=_keep))
def test_matches_oracle(backend, shape, dtype):
    _run(backend, shape, dtype)


HALF_SHAPES = [(2, 8, 16, 17, 9), (2, 5, 24, 7, 5), (1, 3, 12, 4, 4), (1, 1, 1, 17, 1),
               (1, 20, 40, 3, 3),
               (2, 16, 40, 17, 19),   # N = 323: ragged 256-blocks, odd N
               (1, 64, 96, 24, 24),   # N = 576 > 2 blocks of 256, DANet's Cq
               (1, 5, 11, 13, 3)]     # odd Cq and Cv (zero-padded VNNI pairs on the lowp path)


@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    HALF_SHAPES, [torch.float16, torch.bfloat16], keep=_interp_small))
def test_half_inputs_match_oracle(backend, shape, dtype):
    # CPU: fp32 tiles or low-precision tile products (both forced); GPU: tensor-core tiles. The
    # output's dtype is the reference's (promote(v, x, gamma) with an fp32 gamma: fp32).
    _run(backend, shape, dtype)


LAYOUT_CASES = [(layout, shape) for shape in [(2, 8, 24, 11, 9), (2, 4, 20, 5, 7)]
                for layout in LAYOUTS + ("mixed",)]


@pytest.mark.parametrize("backend,case,dtype", backend_grid(
    LAYOUT_CASES, [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    keep=lambda b, c, dt: b != "triton-interp" or _small(c[1])))
def test_layouts(backend, case, dtype):
    # "mixed": channels_last q, k, v (what a channels_last model's 1x1 convolutions give) beside a
    # contiguous x; "channel_slice": views into wider tensors, read in place (run_with_grads keeps
    # the view: its leaves are detached views, not contiguous clones). fp16/bf16: the lowp path
    # packs unit-stride-C inputs into its own tiles.
    layout, shape = case
    name, dev = device_for(backend, "pam", dtype)
    inputs = list(pam_inputs(*shape, dtype=dtype, device=dev,
                             layout="channels_last" if layout == "mixed" else layout))
    if layout == "mixed":
        inputs[3] = inputs[3].contiguous()
        assert inputs[0].is_contiguous(memory_format=torch.channels_last) and inputs[3].is_contiguous()
    elif layout == "channels_last":
        assert inputs[0].is_contiguous(memory_format=torch.channels_last)
    else:
        assert layout == "contiguous" or not inputs[0].is_contiguous()
    _compare(name, inputs, floor(dtype, backend))


def _strided_cases(kind, shape, dtype, dev):
    """q, k, v, x, gamma whose batch dimension is a view: every second image of a batch of 2B
    (`step`), or one image expanded over B (`expand`: batch stride 0)."""
    B = shape[0]
    if kind == "step":
        wide = pam_inputs(2 * B, *shape[1:], dtype=dtype, device=dev)
        inputs = [t[::2] for t in wide[:4]] + [wide[4]]
    else:
        one = pam_inputs(1, *shape[1:], dtype=dtype, device=dev)
        inputs = [t.expand(B, *t.shape[1:]) for t in one[:4]] + [one[4]]
        assert inputs[0].stride(0) == 0
    assert inputs[0].shape[0] == B and not inputs[0].is_contiguous()
    return inputs


@pytest.mark.parametrize("kind", ["step", "expand"])
@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    [(3, 4, 20, 5, 7)], [torch.float64, torch.float32]))
def test_batch_strided_and_expanded_inputs(backend, shape, dtype, kind):
    name, dev = device_for(backend, "pam", dtype)
    _compare(name, _strided_cases(kind, shape, dtype, dev), floor(dtype, backend))


@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    [(1, 4, 6, 7, 5)], [torch.float64, torch.float32]))
def test_transposed_spatial_view(backend, shape, dtype):
    # [B, C, W, H] transposed into [B, C, H, W]: H, W do not merge, flatten(2) gathers a copy.
    name, dev = device_for(backend, "pam", dtype)
    q, k, v, x, g = pam_inputs(*shape, dtype=dtype, device=dev)
    _compare(name, [a.transpose(2, 3) for a in (q, k, v, x)] + [g], floor(dtype, backend))


@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    [(2, 4, 8, 9, 7), (2, 4, 20, 6, 5)], [torch.float64, torch.float32],
    keep=_interp_small))
def test_without_residual_returns_o(backend, shape, dtype):
    _run(backend, shape, dtype, residual=False)


@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    [(2, 4, 8, 1, 50)], [torch.float64, torch.float32]))
def test_3d_inputs(backend, shape, dtype):
    name, dev = device_for(backend, "pam", dtype)
    q, k, v, x, g = pam_inputs(*shape, dtype=dtype, device=dev)
    _compare(name, [a.flatten(2) for a in (q, k, v, x)] + [g], floor(dtype, backend))


def _general_small(backend, case, dtype=None):
    """The interpreter's share: B * Nq <= 128 and B * Nk <= 300 positions."""
    nq, nk = (case[3][0] * (case[3][1] if len(case[3]) == 2 else 1),
              case[4][0] * (case[4][1] if len(case[4]) == 2 else 1))
    return backend != "triton-interp" or (case[0] * nq <= 128 and case[0] * nk <= 300)


@pytest.mark.parametrize("backend,case,dtype", backend_grid(
    GENERAL_CASES, [torch.float64, torch.float32, torch.float16, torch.bfloat16], keep=_general_small))
def test_general_op_matches_oracle(backend, case, dtype):
    # SAGAN / Non-local / ANN / OCR: E = scale * qᵀk, keys and values with their own Nk; the
    # output has the queries' positions (q's spatial shape).
    name, dev = device_for(backend, "pam", dtype)
    inputs = general_inputs(*case[:5], dtype=dtype, device=dev)
    got, _ = compare_pam(name, inputs, floor(dtype, backend), scale=case[5])
    assert got.shape == (case[0], case[2], *case[3])


@pytest.mark.parametrize("backend,case,dtype", backend_grid(
    [("channels_last", True), ("channels_last", False), ("channel_slice", True)],
    [torch.float64, torch.float32, torch.bfloat16]))
def test_general_op_layouts(backend, case, dtype):
    # channels_last (or sliced) q and x with contiguous pooled k, v; with and without residual.
    layout, residual = case
    name, dev = device_for(backend, "pam", dtype)
    q, k, v, x, g = general_inputs(1, 4, 8, (8, 6), (4, 3), dtype=dtype, layout=layout, device=dev,
                                   residual=residual)
    compare_pam(name, [q, k.contiguous(), v.contiguous(), x, g], floor(dtype, backend), scale=0.5)


# The GPU backends at the sizes their tiles are tuned for (DANet's Cq = 64, Cv = 512; Cq = 256;
# Cv = 4096), where the CPU backends' cases above are small.
GPU_SHAPES = [(2, 64, 512, 32, 32), (1, 8, 24, 37, 29), (1, 256, 64, 16, 16), (1, 16, 4096, 8, 8)]


@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    GPU_SHAPES, [torch.float32, torch.float16, torch.bfloat16], backends=("triton-cuda", "cuda")))
def test_gpu_sizes_match_oracle(backend, shape, dtype):
    _run(backend, shape, dtype)


FUSED = tuple(b for b, t in BACKENDS.items() if t.backend != "reference")


@pytest.mark.parametrize("backend,case,dtype", backend_grid(
    [(2, 5, 20, 13, 9)], [torch.float64, torch.float32, torch.float16, torch.bfloat16], backends=FUSED))
def test_fused_forward_outputs(backend, case, dtype):
    # The op's own outputs: O in the compute dtype (fp32 for fp16/bf16: the backward's Delta reads
    # it unrounded), callers get v's dtype; lse = log sum_j exp(E_ij) in fp32, a few ulps of |lse|
    # (fp32 statistics over Nk <= 13 terms; the oracle sees the same half-rounded inputs).
    name, dev = device_for(backend, "pam", dtype)
    B, Cq, Cv, Nq, Nk = case
    q, k, v, _, _ = general_inputs(B, Cq, Cv, (Nq,), (Nk,), dtype=dtype, device=dev, residual=False)
    o, lse, y = backends.get(name).op("pam_forward")(q, k, v, None, None, 0.5)
    assert o.dtype == stats_dtype(dtype) and lse.dtype == stats_dtype(dtype) and y.shape == (0,)
    assert torch.equal(position_attention(q, k, v, scale=0.5, backend=name), o.to(dtype))
    lse64 = torch.logsumexp(0.5 * torch.bmm(q.double().transpose(1, 2), k.double()), dim=-1)
    check_bound("lse", max_err(lse, lse64), 8 * UNIT_ROUNDOFF[stats_dtype(dtype)] * max(
        lse64.abs().max().item(), 1.0) * Nk, "ulps")


@pytest.mark.parametrize("backend,case,dtype", backend_grid(["Nk=1"], [torch.float32], backends=FUSED))
def test_one_key_is_exact_and_scale_one_is_the_default(backend, case, dtype):
    # One key: softmax is exactly 1 whatever the scale, so o == v (broadcast over the queries),
    # dq = dk = 0 exactly and dv = the sum of dO over the queries; scale = 1 given explicitly is
    # the schema's default: the same kernels, bit for bit.
    name, dev = device_for(backend, "pam", dtype)
    b = backends.get(name)
    q, k, v, _, _ = general_inputs(1, 3, 5, (10,), (1,), dtype=dtype, device=dev, residual=False)
    o, lse, _ = b.op("pam_forward")(q, k, v, None, None, 0.5)
    assert torch.equal(o, v.expand(1, 5, 10))
    dq, dk, dv, _ = b.op("pam_backward")(torch.ones_like(o), q, k, v, o, lse, None, 0.5)
    assert dq.abs().max() == 0 and dk.abs().max() == 0
    assert torch.equal(dv, torch.full_like(v, 10.0))               # 10 queries, dO = 1 each
    inputs = general_inputs(1, 4, 20, (19,), (7,), dtype=dtype, device=dev)
    a, c = b.op("pam_forward")(*inputs), b.op("pam_forward")(*inputs, 1.0)
    assert all(torch.equal(s, t) for s, t in zip(a, c))


@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    [(1, 8, 16, 9, 9), (1, 4, 20, 5, 5)], [torch.bfloat16, torch.float16],
    keep=_interp_small))
def test_mixed_dtypes_under_autocast_style_inputs(backend, shape, dtype):
    # autocast gives fp16/bf16 q, k, v from the convolutions and an fp32 x / gamma: y is fp32.
    name, dev = device_for(backend, "pam", dtype)
    q, k, v, _, _ = pam_inputs(*shape, dtype=dtype, device=dev)
    _, _, _, x, g = pam_inputs(*shape, dtype=torch.float32, device=dev, seed=1)
    assert position_attention(q, k, v, x, g, backend=name).dtype == torch.float32
    # y and every gradient: 2x the reference's own error on the same mixed-dtype inputs, floor
    # floor(dtype) (dq, dk, dv are in the low dtype)
    _compare(name, [q, k, v, x, g], floor(dtype, backend))
    # y alone under the fp32 floor (fp32 result): the reference's own error bounds it
    err, bound = lowp_bound(lambda *t: position_attention(*t, backend=name),
                            reference.position_attention, [q, k, v, x, g],
                            reference.position_attention(*to64([q, k, v, x, g])))
    check_bound("y", err, max(bound, FLOOR[torch.float32]), "2x-reference")


def test_gradcheck_float64():
    q, k, v, x, g = [t.requires_grad_() for t in pam_inputs(2, 3, 4, 5, 3, dtype=torch.float64)]
    fn = lambda *t: position_attention(*t, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, x, g))
    q2, k2, v2, _, _ = [None if t is None else t.requires_grad_()
                        for t in pam_inputs(1, 2, 3, 7, 1, dtype=torch.float64, residual=False)]
    assert torch.autograd.gradcheck(fn, (q2, k2, v2))


@pytest.mark.parametrize("backend,shape,dtype", backend_grid(
    [(1, 4, 8, 10, 10), (1, 4, 20, 6, 5)], [torch.float64, torch.float32],
    keep=_interp_small))
def test_gamma_zero_output_and_gradients_exact(backend, shape, dtype):
    # gamma = 0: y = x exactly, dx = dy exactly, dq = dk = dv = 0 (dO = gamma * dy), yet dgamma =
    # sum(dy * O) is not zero and must match the oracle.
    name, dev = device_for(backend, "pam", dtype)
    q, k, v, x, g = pam_inputs(*shape, dtype=dtype, device=dev)
    g = torch.zeros_like(g)
    y, grads = run_with_grads(lambda *t: position_attention(*t, backend=name), [q, k, v, x, g])
    _, grads64 = run_with_grads(reference.position_attention, to64([q, k, v, x, g]))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1),   # run_with_grads' dy
                    dtype=torch.float64).to(device=dev, dtype=y.dtype)
    assert torch.equal(y, x) and torch.equal(grads[3], w)
    assert grads64[4].abs().item() > 0.1          # the oracle's dgamma is not trivially zero
    for got in grads[:3]:
        assert torch.count_nonzero(got) == 0
    # dgamma = sum over B*Cv*N <= 2e3 products: fp64 to a few ulps; fp32 accumulation ~N*u
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    check_bound("dgamma", max_err(grads[4], grads64[4]), tol, "sum-length")


@pytest.mark.parametrize("backend", backend_params("reference", "cpu", "triton-interp", "triton-cuda",
                                                   "cuda"))
def test_nan_propagates_like_reference(backend):
    name, dev = device_for(backend, "pam", torch.float32)
    q, k, v, x, g = pam_inputs(1, 4, 6, 9, 9, dtype=torch.float32, device=dev)
    q[0, 1, 2, 3] = float("nan")     # poisons one query row
    v[0, 0, 4, 4] = float("nan")     # poisons channel 0 of every output position
    with tf32(False):
        out = position_attention(q, k, v, x, g, backend=name)
    ref = reference.position_attention(q, k, v, x, g)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any() and not out.isnan().all()
    # fp32, 81 keys: the finite entries within a few hundred fp32 ulps of |y| ~ 4
    check_bound("y", max_err(torch.nan_to_num(out), torch.nan_to_num(ref)), 1e-4, "sum-length")


@pytest.mark.parametrize("backend,case,dtype", backend_grid(["-inf"], [torch.float32, torch.bfloat16]))
def test_minus_inf_first_key_block_gets_weight_zero(backend, case, dtype):
    name, dev = device_for(backend, "pam", dtype)
    q, k, v = [t.to(dev) for t in pam_minus_inf_inputs(dtype)]
    oracle = reference.position_attention(*to64([q, k, v]))
    with tf32(False), torch.no_grad():
        out = position_attention(q, k, v, backend=name)
        own = reference.position_attention(q, k, v)
    assert oracle.isfinite().all() and out.isfinite().all()
    # 300-key sums: 2x the reference's own error in the dtype, or the dtype's floor
    check_bound("o", max_err(out, oracle), max(2 * max_err(own, oracle),
                                               FLOOR[dtype] * oracle.abs().max().item()), "2x-reference")
    # Every logit -inf: 0/0 in the reference, NaN here too.
    q, k, v = [t.to(dev) for t in pam_minus_inf_inputs(dtype, whole_row=True)]
    assert position_attention(q, k, v, backend=name).isnan().all()


@pytest.mark.parametrize("backend,qk,dtype", backend_grid(
    [40.0, 8.0], [torch.float64, torch.float32, torch.float16],
    keep=lambda b, qk, dt: not (qk == 40.0 and dt == torch.float16)))
def test_large_logits(backend, qk, dtype):
    # Sharp softmax: q, k entries ~ qk, so E ~ sqrt(Cq) qk^2 with max|E| ~ 2e4 (qk = 40: a naive
    # exp overflows; the online softmax must not) or ~860 (qk = 8, also fp16: rows nearly
    # one-hot; qk = 40 in fp16 would overflow the fp16 reference's own logits). y and every
    # gradient within the policy bound.
    name, dev = device_for(backend, "pam", dtype)
    shape = (1, 8, 8, 12, 12) if backend != "triton-interp" else (1, 8, 20, 7, 9)
    inputs = pam_inputs(*shape, dtype=dtype, device=dev, qk_scale=qk)
    # The fused backward rebuilds P = exp(E - lse) from fp32 E and lse (the reference keeps its
    # P): relative errors ~ u32 |lse| ~ u32 max|E| that the reference has not, in the bound as
    # danet_ops.testing.pam_extra_error's analysis term.
    _compare(name, inputs, floor(dtype, backend))


@pytest.mark.parametrize("shape", [(0, 4, 8, 5, 5), (2, 4, 8, 0, 5), (2, 4, 8, 5, 0)])
@pytest.mark.parametrize("backend", [pytest.param("auto", id="auto")] + backend_params())
def test_empty(shape, backend):
    name, dev = ("auto", torch.device("cpu")) if backend == "auto" else device_for(backend, "pam")
    q, k, v, x, g = [t.requires_grad_() for t in pam_inputs(*shape, device=dev)]
    out = position_attention(q, k, v, x, g, backend=name)
    assert out.shape == v.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


def test_memory_contract_no_nxn_allocation():
    """No allocation of N x N (nor N^2/block) size in forward or backward (profiler record)."""
    B, Cq, Cv, H, W = 1, 8, 16, 64, 64
    N = H * W
    q, k, v, x, g = [t.requires_grad_() for t in pam_inputs(B, Cq, Cv, H, W)]
    acts = [torch.profiler.ProfilerActivity.CPU]

    def biggest(backend):
        with torch.profiler.profile(activities=acts, profile_memory=True) as prof:
            out = position_attention(q, k, v, x, g, backend=backend)
            out.backward(torch.ones_like(out))
        return max(e.self_cpu_memory_usage for e in prof.events())

    nxn = B * N * N * 4
    assert biggest("reference") >= nxn        # the check can see an N x N buffer
    fused = biggest("cpu")
    linear = 4 * B * N * (Cv + Cq) * 4        # a few [B, C, N] fp32 tensors
    tile = 256 * 256 * 4
    assert fused <= max(linear, tile), f"largest allocation {fused} B (N x N = {nxn} B)"
    assert fused * 64 < nxn


def test_profiled_ops_record_no_nxn_shape():
    # Second witness: with shapes recorded, no op of the fused path sees an N x N operand.
    H = W = 24
    N = H * W
    q, k, v, x, g = [t.requires_grad_() for t in pam_inputs(1, 4, 8, H, W)]
    with torch.profiler.profile(record_shapes=True) as prof:
        out = position_attention(q, k, v, x, g, backend="cpu")
        out.sum().backward()
    for e in prof.events():
        for shp in e.input_shapes or []:
            if isinstance(shp, list) and len(shp) >= 2:
                assert not (shp[-1] == N and shp[-2] == N), f"{e.name} saw {shp}"


# ----------------------------------------------------------------------------- module
class PAM_Module(torch.nn.Module):
    """The released DANet PAM_Module's structure, written out for the compatibility test."""

    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.query_conv = torch.nn.Conv2d(in_dim, in_dim // 8, 1)
        self.key_conv = torch.nn.Conv2d(in_dim, in_dim // 8, 1)
        self.value_conv = torch.nn.Conv2d(in_dim, in_dim, 1)
        self.gamma = torch.nn.Parameter(torch.zeros(1))
        self.softmax = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.size()
        proj_query = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(b, -1, w * h)
        attention = self.softmax(torch.bmm(proj_query, proj_key))
        proj_value = self.value_conv(x).view(b, -1, w * h)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(b, c, h, w)
        return self.gamma * out + x


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
def test_released_state_dict_loads_and_matches(backend):
    torch.manual_seed(0)
    released = PAM_Module(32).double()
    with torch.no_grad():
        released.gamma.fill_(0.8)
    ours = PositionAttention(32, backend=backend).double()
    ours.load_state_dict(released.state_dict(), strict=True)
    x = torch.randn(2, 32, 9, 11, dtype=torch.float64, requires_grad=True)
    y_ref = released(x)
    y_ref.sum().backward()
    g_ref = x.grad.clone()
    x.grad = None
    y = ours(x)
    y.sum().backward()
    check_bound("y", max_err(y, y_ref), 1e-10, "floor")
    check_bound("dx", max_err(x.grad, g_ref), 1e-10, "floor")
    for (n1, p1), (n2, p2) in zip(released.named_parameters(), ours.named_parameters()):
        assert n1 == n2
        check_bound(f"d{n1}", max_err(p1.grad, p2.grad), 1e-10, "floor")


def test_module_rejects_zero_query_channels():
    with pytest.raises(ValueError, match="in_channels // reduction"):
        PositionAttention(4, reduction=8)


def test_auto_picks_fused_cpu_and_env_override(monkeypatch):
    from danet_ops import backends
    cpu = torch.device("cpu")
    assert backends.resolve("auto", "pam", cpu, torch.float32) == "cpu"
    monkeypatch.setenv("DANET_OPS_BACKEND", "reference")
    assert backends.resolve("auto", "pam", cpu, torch.float32) == "reference"
    monkeypatch.setenv("DANET_OPS_BACKEND", "cuda")
    with pytest.raises(danet_ops.BackendUnavailableError, match="CUDA tensors"):
        backends.resolve("auto", "pam", cpu, torch.float32)


# ----------------------------------------------------------------------------- general op memory
@pytest.mark.parametrize("nq,nk", [(4096, 1024), (1024, 4096)], ids=["nk=nq/4", "nk=4nq"])
def test_memory_contract_nq_ne_nk(nq, nk):
    """With keys of their own length the fused CPU op (forward + backward through its registered
    autograd) allocates nothing of size Nq x Nk, only O((Nq + Nk) * C) and tiles."""
    B, Cq, Cv, scale = 1, 8, 16, 0.35
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(B, Cq, nq, generator=gen) * 0.5).requires_grad_()
    k = (torch.randn(B, Cq, nk, generator=gen) * 0.5).requires_grad_()
    v = torch.randn(B, Cv, nk, generator=gen).requires_grad_()
    x = torch.randn(B, Cv, nq, generator=gen).requires_grad_()
    g = torch.tensor([0.7], requires_grad=True)
    ops = torch.ops.danet_ops
    acts = [torch.profiler.ProfilerActivity.CPU]

    def naive(q, k, v, x, g):
        e = torch.bmm(q.transpose(1, 2), k) * scale
        return g * torch.bmm(v, torch.softmax(e, -1).transpose(1, 2)) + x

    def biggest(fn):
        with torch.profiler.profile(activities=acts, profile_memory=True, record_shapes=True) as prof:
            out = fn(q, k, v, x, g)
            out.backward(torch.ones_like(out))
        shapes = [s for e in prof.events() for s in (e.input_shapes or [])
                  if isinstance(s, list) and len(s) >= 2]
        return max(e.self_cpu_memory_usage for e in prof.events()), shapes

    nqk = B * nq * nk * 4
    ref_big, ref_shapes = biggest(naive)
    assert ref_big >= nqk and [nq, nk] in [s[-2:] for s in ref_shapes]   # the check can see it
    fused, shapes = biggest(lambda *t: ops.pam_forward(*t, scale)[2])
    linear = 4 * B * (nq + nk) * (Cv + Cq) * 4        # a few [B, C, N] fp32 tensors
    tile = 256 * 256 * 4
    assert fused <= max(linear, tile), f"largest allocation {fused} B (Nq x Nk = {nqk} B)"
    assert fused * 16 < nqk
    assert not [s for s in shapes if s[-2:] in ([nq, nk], [nk, nq])], "an op saw Nq x Nk"
