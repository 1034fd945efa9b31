"""Deployment paths (issue 16, docs/deploy.md): ONNX (dynamo and legacy exporters) run in ONNX Runtime,
torch.export keeps the fused ops, AOTInductor package in a fresh process, torch.jit.trace round trip,
and `python -m models.export`.

Every comparison is against the float64 oracle (backend "reference" in float64) and against eager
fp32. Tolerance 1e-4 relative (max |diff| / max |oracle|): the exported graphs compute the same
fp32 products in another order (ORT's sgemm, Softmax), whose rounding is ~1e-7 relative per op and
stays well below 1e-4 through a ResNet-50 (measured: below 1e-5).
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import danet_ops
from danet_ops import _export
from models.danet import DANet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-4  # see the module docstring
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, (danet_ops.PositionAttention, danet_ops.ChannelAttention)):
            m.backend = backend
    return model


def _oracle(model):
    return _set_backend(copy.deepcopy(model), "reference").double()


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check_onnx(path):
    """onnx.checker passes; only standard-domain ops; nothing of danet_ops left."""
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    ops = {n.op_type for n in model.graph.node}
    assert not any("danet" in op or "pam" in op or "cam" in op for op in ops), ops
    return ops


def _run_ort(path, *inputs):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: t.detach().numpy() for n, t in zip(names, inputs)})


def _export_onnx(model, args, path, dynamo, dynamic_dims):
    """One export with dynamic spatial dims {input index: [dims]}."""
    if dynamo:
        dyn = tuple({d: torch.export.Dim.DYNAMIC for d in dynamic_dims.get(i, [])} or None
                    for i in range(len(args)))
        torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dyn, verbose=False)
    else:
        names = [f"in{i}" for i in range(len(args))]
        axes = {names[i]: {d: f"d{i}_{d}" for d in dims} for i, dims in dynamic_dims.items()}
        torch.onnx.export(model, args, path, dynamo=False, input_names=names, dynamic_axes=axes)


def _agree(path, model, inputs_list):
    """ONNX Runtime vs the float64 oracle and vs eager fp32, for each input tuple."""
    oracle = _oracle(model)
    for inputs in inputs_list:
        got = _run_ort(path, *inputs)
        with torch.no_grad():
            eager = _as_tuple(model(*inputs))
            ref = _as_tuple(oracle(*(t.double() for t in inputs)))
        assert len(got) == len(ref)
        for g, e, r in zip(got, eager, ref):
            assert g.shape == tuple(r.shape)
            assert _rel(g, r) <= TOL, (inputs[0].shape, _rel(g, r))
            assert _rel(g, e) <= TOL, (inputs[0].shape, _rel(g, e))


class Head(torch.nn.Module):
    """PAM + CAM with nonzero gammas, as in a DANet head."""

    def __init__(self, channels=32, mode="original", backend="auto"):
        super().__init__()
        self.pam = danet_ops.PositionAttention(channels, backend=backend)
        self.cam = danet_ops.ChannelAttention(mode, backend=backend)
        with torch.no_grad():
            self.pam.gamma.fill_(0.7)
            self.cam.gamma.fill_(0.4)

    def forward(self, x):
        return self.pam(x), self.cam(x)


def _danet(backbone):
    torch.manual_seed(0)
    model = DANet(4, backbone=backbone).eval()
    with torch.no_grad():  # gamma is 0 at init: make the attention count
        model.head.sa.gamma.fill_(0.8)
        model.head.sc.gamma.fill_(0.3)
    return model


def _onnx_available(dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")


# ----------------------------------------------------------------------------- ONNX: modules
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("mode", ["original", "paper"])
def test_modules_onnx(tmp_path, dynamo, mode):
    _onnx_available(dynamo)
    torch.manual_seed(0)
    model = Head(32, mode).eval()
    path = str(tmp_path / "head.onnx")
    _export_onnx(model, (torch.randn(2, 32, 8, 12),), path, dynamo, {0: [2, 3]})
    ops = _check_onnx(path)
    assert {"MatMul", "Softmax"} <= ops
    # one export, two sizes (dynamic H, W); scale 3: sharp softmax rows, as in trained models
    _agree(path, model, [(3 * torch.randn(2, 32, 8, 12),), (3 * torch.randn(2, 32, 5, 7),)])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_general_pam_onnx(tmp_path, dynamo):
    """The general op (issue 14): scale != 1 and keys/values pooled to their own Nk (kv_pool=2)."""
    _onnx_available(dynamo)
    torch.manual_seed(0)
    model = danet_ops.PositionAttention(32, scale=4 ** -0.5, kv_pool=2).eval()
    with torch.no_grad():
        model.gamma.fill_(0.7)
    path = str(tmp_path / "pam.onnx")
    _export_onnx(model, (torch.randn(1, 32, 8, 12),), path, dynamo, {0: [2, 3]})
    _check_onnx(path)
    # 7x9: odd sizes, Nk = 3*4 from the floor of the pooling
    _agree(path, model, [(3 * torch.randn(1, 32, 8, 12),), (3 * torch.randn(1, 32, 7, 9),)])


def test_ops_and_triton_ops_onnx(tmp_path):
    """The raw ops (both families: compiled and triton) with and without x/gamma, with scale and
    Nk != Nq, through dynamo.
    torch.export traces with fake tensors, so the triton ops need no Triton to be exported."""
    _onnx_available(True)

    class Ops(torch.nn.Module):
        def forward(self, q, k, v, x, g, k2, v2):
            o1, _, y1 = torch.ops.danet_ops.pam_forward(q, k, v, x, g)
            o2, _, _ = torch.ops.danet_ops.pam_forward_triton(q, k2, v2, None, None, 0.5)  # Nk != Nq, scale
            _, _, y3 = torch.ops.danet_ops.cam_forward_triton(x, g, "original")
            o4, _, _ = torch.ops.danet_ops.cam_forward(x, None, "paper")
            return o1, y1, o2, y3, o4

    class Oracle(torch.nn.Module):
        def forward(self, q, k, v, x, g, k2, v2):
            pa = danet_ops.position_attention
            ca = danet_ops.channel_attention
            r = "reference"
            return (pa(q, k, v, backend=r), pa(q, k, v, x, g, backend=r), pa(q, k2, v2, scale=0.5, backend=r),
                    ca(x, g, "original", backend=r), ca(x, None, "paper", backend=r))

    torch.manual_seed(0)
    args = (torch.randn(1, 4, 20), torch.randn(1, 4, 20), torch.randn(1, 16, 20), torch.randn(1, 16, 20),
            torch.tensor([0.5]), torch.randn(1, 4, 7), torch.randn(1, 16, 7))
    path = str(tmp_path / "ops.onnx")
    torch.onnx.export(Ops(), args, path, dynamo=True, verbose=False)
    _check_onnx(path)
    got = _run_ort(path, *args)
    with torch.no_grad():
        ref = Oracle()(*(t.double() for t in args))
    for g, r in zip(got, ref):
        assert _rel(g, r) <= TOL


def test_lowering_math_general():
    """The lowering is E = scale * q^T k with k/v having their own Nk (SPEC §1's generalisation):
    checked in float64 against the formula written out with einsum."""
    torch.manual_seed(0)
    B, Cq, Cv, Nq, Nk = 2, 5, 7, 11, 6
    q, k = torch.randn(B, Cq, Nq, dtype=torch.float64), torch.randn(B, Cq, Nk, dtype=torch.float64)
    v = torch.randn(B, Cv, Nk, dtype=torch.float64)
    x, g = torch.randn(B, Cv, Nq, dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    for scale in (1.0, Cq ** -0.5):
        o, lse, y = _export.pam_math(q, k, v, x, g, scale)
        e = scale * torch.einsum("bci,bcj->bij", q, k)
        ref = torch.einsum("bcj,bij->bci", v, torch.softmax(e, -1))
        assert o.shape == (B, Cv, Nq) and lse.shape == (B, Nq)
        torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)  # float64, same products
        torch.testing.assert_close(lse, torch.logsumexp(e, -1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, g * ref + x, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- ONNX: reference DANet
@pytest.mark.parametrize("backbone,sizes,dynamo", [
    ("mini", [(64, 64), (48, 80)], True),
    ("mini", [(64, 64), (48, 80)], False),
    pytest.param("resnet50", [(32, 32), (40, 48)], True, marks=pytest.mark.slow),
], ids=["mini-dynamo", "mini-legacy", "resnet50-dynamo"])
def test_danet_onnx(tmp_path, backbone, sizes, dynamo):
    _onnx_available(dynamo)
    model = _danet(backbone)
    path = str(tmp_path / f"danet_{backbone}.onnx")
    _export_onnx(model, (torch.randn(1, 3, *sizes[0]),), path, dynamo, {0: [2, 3]})
    _check_onnx(path)
    torch.manual_seed(1)
    _agree(path, model, [(torch.randn(1, 3, *s),) for s in sizes])


# ----------------------------------------------------------------------------- torch.export / AOTI / TorchScript
def test_torch_export_keeps_fused_ops():
    """The ONNX decomposition does not leak: torch.export (also after its default decompositions,
    what AOTInductor compiles) keeps calling the fused ops, so those paths stay O(N) in memory."""
    ep = torch.export.export(Head(16).eval(), (torch.randn(1, 16, 6, 6),))
    ep = ep.run_decompositions()
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"danet_ops.pam_forward.default", "danet_ops.cam_forward.default"} <= targets, targets
    assert not any("bmm" in t or "softmax" in t for t in targets), targets


def test_jit_trace_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = Head(16).eval()
    traced = torch.jit.trace(model, (torch.randn(1, 16, 6, 6),))
    path = str(tmp_path / "head.ts")
    torch.jit.save(traced, path)
    loaded = torch.jit.load(path)
    oracle = _oracle(model)
    for shape in [(1, 16, 6, 6), (2, 16, 5, 9)]:   # the trace keeps the sizes symbolic
        x = 3 * torch.randn(shape)
        with torch.no_grad():
            got, ref = loaded(x), oracle(x.double())
        for g, r in zip(got, ref):
            assert _rel(g, r) <= TOL


@pytest.mark.slow
def test_aoti_package_fresh_process(tmp_path):
    """aoti_compile_and_package, then a fresh interpreter: without `import danet_ops` the loader
    fails naming the op; with it, the package runs at two sizes (dynamic H, W)."""
    torch.manual_seed(0)
    model = Head(16).eval()
    dim = torch.export.Dim.DYNAMIC
    ep = torch.export.export(model, (torch.randn(1, 16, 6, 6),), dynamic_shapes=({2: dim, 3: dim},))
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "head.pt2"))
    xs = [3 * torch.randn(1, 16, 6, 6), 3 * torch.randn(1, 16, 5, 9)]
    torch.save(xs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        try:
            torch._inductor.aoti_load_package({pkg!r})
            sys.exit("loaded without danet_ops")
        except Exception as e:
            assert "danet_ops" in str(e), e
        import danet_ops
        m = torch._inductor.aoti_load_package({pkg!r})
        xs = torch.load({str(tmp_path / "inputs.pt")!r})
        torch.save([m(x) for x in xs], {str(tmp_path / "outputs.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    outs = torch.load(tmp_path / "outputs.pt")
    oracle = _oracle(model)
    for x, got in zip(xs, outs):
        with torch.no_grad():
            ref = oracle(x.double())
        for g, r in zip(got, ref):
            assert _rel(g, r) <= TOL


# ----------------------------------------------------------------------------- python -m models.export
@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A models.train checkpoint of a tiny mini-DANet on 48 px synthetic scenes (untrained, gammas set)."""
    from models.checkpoints import build_model
    from models.train import parse_config

    cfg = vars(parse_config(["--backbone", "mini", "--deep-stem", "--stem-width", "8", "--synthetic-size", "48",
                             "--synthetic-val-size", "2", "--synthetic-train-size", "2"]))
    torch.manual_seed(0)
    model = build_model(cfg, 6)
    with torch.no_grad():
        model.head.sa.gamma.fill_(0.8)
        model.head.sc.gamma.fill_(0.3)
    path = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "cfg": cfg, "nclass": 6}, path)
    return str(path)


@pytest.mark.parametrize("extra", [[], ["--legacy"]], ids=["dynamo", "legacy"])
def test_models_export_onnx(tiny_checkpoint, tmp_path, capsys, extra):
    from models import export

    _onnx_available(not extra)
    out = str(tmp_path / "tiny.onnx")
    rc = export.main(["--checkpoint", tiny_checkpoint, "--format", "onnx", "--output", out] + extra)
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "max |exported - eager|" in text and "at 48x48" in text and "at 36x36" in text, text
    _check_onnx(out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_model_exports_with_fp32_attention_math(tmp_path, dtype):
    # The fused forward ops return O in fp32 for fp16/bf16 inputs (the backward's Delta), and the
    # fakes say so; the export decomposition must agree or torch.export's metadata assert fails
    # (it did: "Tensor dtype mismatch! Expected: torch.float32, Got: torch.bfloat16").
    m = danet_ops.PositionAttention(16, backend="cpu").eval()
    with torch.no_grad():
        m.gamma.fill_(0.5)
    m = m.to(dtype)
    x = torch.randn(1, 16, 5, 6).to(dtype)
    with torch.no_grad():
        eager = m(x)
    _export.register()
    out = torch.export.export(m, (x,)).run_decompositions().module()(x)
    assert out.dtype == eager.dtype == dtype
    # Same fp32 math on the same half inputs; only the final rounding to dtype may differ: 1 ulp.
    ulp = torch.finfo(dtype).eps
    assert ((out.float() - eager.float()).abs() <= ulp * eager.float().abs() + 1e-6).all()
    path = str(tmp_path / "half.onnx")
    torch.onnx.export(m, (x,), path, dynamo=True, verbose=False)
    if dtype == torch.float16:   # ONNX's Conv has no bf16 type before opset 22: checker only for fp16
        _check_onnx(path)
