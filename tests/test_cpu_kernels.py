"""The CPU backend's internals (the op itself, on every CPU path, is in test_pam.py / test_cam.py):
the tile sizes read and validated per call, the low-precision engine's fallback when oneDNN is
off, the inference forms (no_grad: same bits as the differentiable form), bitwise determinism at a
fixed thread count and agreement across thread counts, and the caller's denormal mode restored.
Oracle comparisons use danet_ops.testing's bound (2x the reference's own error + analysis)."""
import pytest
import torch

from danet_ops import PositionAttention, channel_attention, position_attention, reference, testing
from conftest import FLOOR, cam_inputs, compare_to_oracle, max_err, pam_inputs, run_with_grads

CAM_NAMES = ["y", "dx", "dgamma"]


def _pam(inputs, floor, **kw):
    fn = lambda *t: position_attention(*t, backend="cpu", **kw)      # noqa: E731
    return testing.compare_pam(fn, inputs, floor, scale=kw.get("scale", 1.0))


def test_pam_lowp_inference_form_matches_training_form(monkeypatch):
    # Under no_grad the lowp op keeps no O beside y: the same tiles, so the same bits.
    monkeypatch.setenv("DANET_OPS_CPU_LOWP", "1")
    q, k, v, x, g = pam_inputs(1, 16, 24, 21, 23, dtype=torch.bfloat16)
    with torch.no_grad():
        y_inf = position_attention(q, k, v, x, g, backend="cpu")
    y_train = position_attention(q, k, v, x, g.clone().requires_grad_(), backend="cpu")
    assert torch.equal(y_inf, y_train.detach())


# ----------------------------------------------------------------------------- tile sizes
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


# ----------------------------------------------------------------------------- PAM: threads, determinism, denormals, inference
def test_pam_one_and_two_threads_agree():
    # The backward splits one image's key blocks into per-thread groups whose dq partials are
    # summed: exercise both the split and the unsplit path.
    inputs = pam_inputs(1, 8, 16, 40, 40, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, g1 = run_with_grads(lambda *t: position_attention(*t, backend="cpu"), inputs)
        torch.set_num_threads(2)
        _, g2 = run_with_grads(lambda *t: position_attention(*t, backend="cpu"), inputs)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(g1, g2):
        assert max_err(a, b) < 1e-12



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_pam_bitwise_deterministic_at_fixed_threads(dtype):
    # No atomics, a fixed split of the work per thread count: the same call twice gives the same
    # bits, forward and backward (N = 1600: several key blocks per thread in the backward).
    inputs = pam_inputs(2, 8, 16, 40, 40, dtype=dtype)
    fn = lambda *t: position_attention(*t, backend="cpu")  # noqa: E731
    y1, g1 = run_with_grads(fn, inputs)
    y2, g2 = run_with_grads(fn, inputs)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)



def test_restores_the_callers_denormal_mode():
    # The kernels set FTZ/DAZ inside their own tasks only and restore it: a caller that computes
    # with denormals still gets them afterwards.
    torch.set_flush_denormal(False)
    q, k, v, x, g = pam_inputs(1, 8, 8, 16, 16, dtype=torch.float32, qk_scale=3.0)
    position_attention(q, k, v, x, g, backend="cpu")
    tiny = torch.tensor([1e-38]) / 16          # 6.25e-40: a denormal unless flushed
    assert tiny.item() != 0.0


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pam_inference_form_matches_training_form(dtype, residual):
    # Under no_grad / inference_mode the op runs its inference form (nothing saved, no lse, no O
    # kept beside y): the same arithmetic, so the same bits as the differentiable form.
    inputs = pam_inputs(1, 8, 16, 17, 19, dtype=dtype, residual=residual)
    train = position_attention(*[None if t is None else t.clone().requires_grad_() for t in inputs],
                               backend="cpu")
    with torch.no_grad():
        nograd = position_attention(*inputs, backend="cpu")
    with torch.inference_mode():
        infer = position_attention(*inputs, backend="cpu")
    assert nograd.dtype == train.dtype and infer.dtype == train.dtype
    assert torch.equal(nograd, train.detach()) and torch.equal(infer, train.detach())


def test_pam_inference_form_under_compile():
    # The inference op has a fake kernel: torch.compile(fullgraph=True) traces it without breaks.
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = PositionAttention(16, backend="cpu").eval()
    with torch.no_grad():
        m.gamma.fill_(0.5)
        x = torch.randn(1, 16, 7, 9)
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert max_err(got, want) < 1e-6   # same kernel; only the graph around it differs


# ----------------------------------------------------------------------------- CAM: threads, determinism, inference form
MODES = ("original", "paper")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cam_one_and_two_threads(dtype, mode):
    # What is true of the CPU kernels (measured): the forward splits independent channel / N
    # blocks over the threads, so y is bitwise the same at 1 and 2 threads; the backward's
    # N-reductions are split by the thread count, so dx may differ in the last bits (fp32: 1 ulp
    # seen at C = 130); within 1e-6 relative in fp32 (a few ulps), 1e-13 in fp64.
    inputs = cam_inputs(1, 130, 33, 31, dtype=dtype, scale=0.3)
    fn = lambda x, g: channel_attention(x, g, mode=mode, backend="cpu")  # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, g1 = run_with_grads(fn, inputs)
        torch.set_num_threads(2)
        y2, g2 = run_with_grads(fn, inputs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)
    tol = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-6}[dtype]
    for a, b in zip(g1, g2):
        assert max_err(a, b) <= tol * max(b.abs().max().item(), 1.0)



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cam_bitwise_deterministic_at_fixed_threads(dtype, mode):
    # No atomics, a fixed split per thread count: the same call twice gives the same bits,
    # forward and backward.
    inputs = cam_inputs(2, 130, 33, 31, dtype=dtype, scale=0.3)
    fn = lambda x, g: channel_attention(x, g, mode=mode, backend="cpu")  # noqa: E731
    y1, g1 = run_with_grads(fn, inputs)
    y2, g2 = run_with_grads(fn, inputs)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)



@pytest.mark.parametrize("mode", MODES)
def test_cam_inference_form_matches_training_form(mode):
    # Under no_grad the op runs its inference form (no attn, no O kept beside y): same bits.
    x, g = cam_inputs(1, 24, 13, 17)
    train = channel_attention(x.clone().requires_grad_(), g, mode=mode, backend="cpu")
    with torch.inference_mode():
        infer = channel_attention(x, g, mode=mode, backend="cpu")
    assert infer.dtype == train.dtype and torch.equal(infer, train.detach())
