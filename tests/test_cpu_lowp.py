"""CPU kernels: the low-precision (brgemm bf16/fp16) tile path forced on and off, and the tile
sizes read and validated per call (issues 15 and 12).

Policy (SPEC §4): error against the float64 oracle at most 2x the reference's own error in that
dtype (tests/conftest.py compare_to_oracle; FLOOR only where the reference is nearly exact).
"""
import pytest
import torch

from danet_ops import channel_attention, position_attention, reference, testing

from conftest import FLOOR, cam_inputs, compare_to_oracle, pam_inputs

PAM_NAMES = ["y", "dq", "dk", "dv", "dx", "dgamma"]
CAM_NAMES = ["y", "dx", "dgamma"]
HALF = [torch.bfloat16, torch.float16]


def _pam(inputs, floor, **kw):
    fn = lambda *t: position_attention(*t, backend="cpu", **kw)      # noqa: E731
    return testing.compare_pam(fn, inputs, floor, scale=kw.get("scale", 1.0))


@pytest.mark.parametrize("lowp", ["0", "1"], ids=["fp32-tiles", "lowp-tiles"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,layout", [
    ((2, 16, 40, 17, 19), "contiguous"),     # N = 323: ragged key/query blocks, odd N
    ((1, 64, 96, 24, 24), "contiguous"),     # N = 576 > 2 blocks of 256, DANet's Cq
    ((2, 8, 24, 9, 7), "channels_last"),     # unit stride along C: packed copies on lowp
    ((1, 5, 11, 13, 3), "channel_slice"),    # odd Cq and Cv (zero-padded VNNI pairs)
])
def test_pam_lowp_forced(monkeypatch, lowp, dtype, shape, layout):
    # Both paths, both half dtypes, against the fp64 oracle under the 2x-reference policy.
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", lowp)
    _pam(pam_inputs(*shape, dtype=dtype, layout=layout), FLOOR[dtype])


@pytest.mark.parametrize("lowp", ["0", "1"], ids=["fp32-tiles", "lowp-tiles"])
@pytest.mark.parametrize("qk_scale", [1.5, 3.0], ids=["std~18", "std~72"])
def test_pam_lowp_sharp_logits(monkeypatch, lowp, qk_scale):
    # Logit std ~ qk_scale^2 * sqrt(Cq) (Cq = 32): DANet's sharp rows. The forward's lazy
    # rescaling (running max kept unless exceeded by > 8) and the clamped exp must keep the
    # result within the policy; no NaN where the oracle is finite.
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", lowp)
    _pam(pam_inputs(1, 32, 48, 20, 20, dtype=torch.bfloat16, qk_scale=qk_scale), FLOOR[torch.bfloat16])


@pytest.mark.parametrize("scale", [0.125, -1.0])
def test_pam_lowp_scale_and_nk(monkeypatch, scale):
    # The general op: scale != 1 (negative too: the column max is taken after scaling) and
    # Nk != Nq (keys pooled), on the lowp path.
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", "1")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 12, 300, generator=gen).bfloat16()
    k = torch.randn(2, 12, 77, generator=gen).bfloat16()
    v = torch.randn(2, 20, 77, generator=gen).bfloat16()
    fn = lambda *t: position_attention(*t, scale=scale, backend="cpu")      # noqa: E731
    testing.compare_pam(fn, [q, k, v], FLOOR[torch.bfloat16], scale=scale)


def test_pam_lowp_minus_inf_block(monkeypatch):
    # A whole first key block of -inf logits gets weight 0 on the lowp path too (no -inf - -inf).
    from conftest import pam_minus_inf_inputs
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", "1")
    q, k, v = pam_minus_inf_inputs(torch.bfloat16)
    with torch.no_grad():
        got = position_attention(q, k, v, backend="cpu").double()
        want = reference.position_attention(q.double(), k.double(), v.double())
        own = reference.position_attention(q, k, v).double()
    assert torch.isfinite(got).all()
    # 2x the bf16 reference's own error (policy), floor: one bf16 rounding of |O| <= max|v|
    bound = max(2 * (own - want).abs().max().item(), FLOOR[torch.bfloat16] * want.abs().max().item())
    testing.check_bound("o", (got - want).abs().max().item(), bound, "2x-reference")


def test_pam_lowp_inference_form_matches_training_form(monkeypatch):
    # Under no_grad the lowp op keeps no O beside y: the same tiles, so the same bits.
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", "1")
    q, k, v, x, g = pam_inputs(1, 16, 24, 21, 23, dtype=torch.bfloat16)
    with torch.no_grad():
        y_inf = position_attention(q, k, v, x, g, backend="cpu")
    y_train = position_attention(q, k, v, x, g.clone().requires_grad_(), backend="cpu")
    assert torch.equal(y_inf, y_train.detach())


@pytest.mark.parametrize("lowp", ["0", "1"], ids=["fp32-tiles", "lowp-tiles"])
@pytest.mark.parametrize("mode", ["original", "paper"])
def test_cam_lowp_forced(monkeypatch, lowp, mode):
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", lowp)
    for dtype in HALF:
        inputs = cam_inputs(2, 40, 19, 23, dtype=dtype)
        fn = lambda *t: channel_attention(*t, mode=mode, backend="cpu")      # noqa: E731
        oracle = lambda *t: reference.channel_attention(*t, mode=mode)       # noqa: E731
        compare_to_oracle(fn, oracle, inputs, CAM_NAMES, FLOOR[dtype])


# ------------------------------------------------------------------ tile sizes (issue 12 item 3)
@pytest.mark.parametrize("lowp", ["0", "1"], ids=["fp32-tiles", "lowp-tiles"])
@pytest.mark.parametrize("bm,bn", [(16, 16), (17, 48), (1024, 16), (64, 1024)])
def test_pam_tile_sizes_in_range(monkeypatch, lowp, bm, bn):
    # Any block in [16, 1024], odd ones too, gives the oracle's result (fp32 and bf16 lowp).
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", lowp)
    monkeypatch.setenv("DANET_OPS_CPU_BLOCK_M", str(bm))
    monkeypatch.setenv("DANET_OPS_CPU_BLOCK_N", str(bn))
    for dtype in (torch.float32, torch.bfloat16):
        _pam(pam_inputs(1, 8, 12, 11, 13, dtype=dtype), FLOOR[dtype])


@pytest.mark.parametrize("var", ["DANET_OPS_CPU_BLOCK_M", "DANET_OPS_CPU_BLOCK_N"])
@pytest.mark.parametrize("value", ["15", "0", "-256", "1025", "1000000", "abc", "64x", "1e3"])
def test_pam_tile_size_out_of_range_raises(monkeypatch, var, value):
    # Out of [16, 1024] or not an integer: a RuntimeError naming the variable, before any kernel
    # (not a silent default; no block of N, which would be an N x N tile).
    q, k, v, x, g = pam_inputs(1, 4, 8, 6, 6)
    monkeypatch.setenv(var, value)
    with pytest.raises(RuntimeError, match=var):
        position_attention(q, k, v, x, g, backend="cpu")
    qq, kk, vv = [t.detach().requires_grad_() for t in (q, k, v)]
    monkeypatch.delenv(var)
    y = position_attention(qq, kk, vv, x, g, backend="cpu")
    monkeypatch.setenv(var, value)                     # the backward reads it too
    with pytest.raises(RuntimeError, match=var):
        y.sum().backward()


def test_tile_sizes_read_per_call(monkeypatch):
    # A change between calls takes effect (no static initialiser): valid, then invalid, then
    # unset again, in one process.
    q, k, v, x, g = pam_inputs(1, 4, 8, 6, 6)
    monkeypatch.setenv("DANET_OPS_CPU_BLOCK_M", "256")   # the default, set explicitly
    a = position_attention(q, k, v, x, g, backend="cpu")
    monkeypatch.setenv("DANET_OPS_CPU_BLOCK_M", "8")
    with pytest.raises(RuntimeError, match="DANET_OPS_CPU_BLOCK_M"):
        position_attention(q, k, v, x, g, backend="cpu")
    monkeypatch.delenv("DANET_OPS_CPU_BLOCK_M")
    b = position_attention(q, k, v, x, g, backend="cpu")
    assert torch.equal(a, b)   # explicit default vs unset: the same tiles, so the same bits


@pytest.mark.parametrize("var,value", [("DANET_OPS_CPU_CAM_BLOCK_C", "7"),
                                       ("DANET_OPS_CPU_CAM_BLOCK_C", "4097"),
                                       ("DANET_OPS_CPU_CAM_BLOCK_N", "15"),
                                       ("DANET_OPS_CPU_CAM_BLOCK_N", "x")])
def test_cam_tile_size_out_of_range_raises(monkeypatch, var, value):
    x, g = cam_inputs(1, 8, 5, 5)
    monkeypatch.setenv(var, value)
    with pytest.raises(RuntimeError, match=var):
        channel_attention(x, g, backend="cpu")


@pytest.mark.parametrize("bc,bn", [(8, 16), (24, 100)])
def test_cam_tile_sizes_in_range(monkeypatch, bc, bn):
    monkeypatch.setenv("DANET_OPS_CPU_CAM_BLOCK_C", str(bc))
    monkeypatch.setenv("DANET_OPS_CPU_CAM_BLOCK_N", str(bn))
    inputs = cam_inputs(2, 40, 19, 23)
    fn = lambda *t: channel_attention(*t, backend="cpu")      # noqa: E731
    compare_to_oracle(fn, reference.channel_attention, inputs, CAM_NAMES, FLOOR[torch.float32])


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() notice
def test_pam_lowp_with_onednn_disabled(monkeypatch):
    # torch.backends.mkldnn disabled: brgemm refuses, the kernels take MKL's CBLAS engine
    # instead (same policy, no error).
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", "1")
    with torch.backends.mkldnn.flags(enabled=False):
        _pam(pam_inputs(1, 8, 16, 9, 11, dtype=torch.bfloat16), FLOOR[torch.bfloat16])


def test_pam_lowp_bitwise_deterministic(monkeypatch):
    # Tasks are handed out dynamically, but every output element (and each dq partial, summed
    # in a fixed order) is computed by the same products whichever worker ran it: same bits.
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", "1")
    monkeypatch.setenv("DANET_OPS_CPU_BLOCK_M", "32")
    monkeypatch.setenv("DANET_OPS_CPU_BLOCK_N", "32")   # many tasks and key-block groups
    q, k, v, x, g = pam_inputs(1, 8, 16, 15, 17, dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        y = position_attention(*leaves, x, g, backend="cpu")
        y.backward(torch.ones_like(y))
        runs.append([y.detach()] + [t.grad for t in leaves])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
