"""Deployment paths (docs/deploy.md): ONNX with both PAM lowerings ("ort": ONNX Runtime's
com.microsoft.MultiHeadAttention, "standard": MatMul/Softmax/MatMul) from both exporters (dynamo
and legacy), run in ONNX Runtime; the O(N) memory of the "ort" lowering in ONNX Runtime;
torch.export keeps the fused ops, AOTInductor package in a fresh process, torch.jit.trace round
trip, and `python -m models.export`.

Every comparison is against the float64 oracle (backend "reference" in float64) and against eager
fp32. Tolerance 1e-4 relative (max |diff| / max |oracle|): the exported graphs compute the same
fp32 products in another order (ORT's sgemm, Softmax, its flash-attention kernel), whose rounding
is ~1e-7 relative per op and stays well below 1e-4 through a ResNet-50 (measured: below 1e-5).
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import danet_ops
import danet_ops.onnx as danet_onnx
from models.danet import DANet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-4  # see the module docstring
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20
LOWERINGS = pytest.mark.parametrize("lowering", danet_onnx.LOWERINGS)
EXPORTERS = pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])


def _set_backend(model, backend):
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def _oracle(model):
    return _set_backend(copy.deepcopy(model), "reference").double()


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check_onnx(path, lowering, pam=True):
    """onnx.checker passes; "standard": standard-domain ops only; "ort": PAM is the contrib op
    (one per PAM) and the only other domain is com.microsoft; nothing of danet_ops left."""
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    nodes = [(n.domain or "", n.op_type) for n in model.graph.node]
    mha = nodes.count(("com.microsoft", "MultiHeadAttention"))
    if lowering == "standard":
        assert {d for d, _ in nodes} <= {"", "ai.onnx"}, nodes
    else:
        assert {d for d, _ in nodes} <= {"", "ai.onnx", "com.microsoft"}, nodes
        assert mha >= 1 if pam else mha == 0, nodes
    assert not any("danet" in op or "pam" in op or "cam" in op for _, op in nodes), nodes
    return {op for _, op in nodes}


def _run_ort(path, *inputs):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: t.detach().numpy() for n, t in zip(names, inputs)})


def _export_onnx(model, args, path, dynamo, dynamic_dims, lowering):
    """One export with dynamic spatial dims {input index: [dims]}, PAM lowered as `lowering`."""
    with danet_onnx.attention_lowering(lowering):
        if dynamo:
            dyn = tuple({d: torch.export.Dim.DYNAMIC for d in dynamic_dims.get(i, [])} or None
                        for i in range(len(args)))
            torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dyn, verbose=False)
        else:
            names = [f"in{i}" for i in range(len(args))]
            axes = {names[i]: {d: f"d{i}_{d}" for d in dims} for i, dims in dynamic_dims.items()}
            torch.onnx.export(model, args, path, dynamo=False, input_names=names, dynamic_axes=axes)


def _agree(path, model, inputs_list, tol=TOL):
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
            assert _rel(g, r) <= tol, (inputs[0].shape, _rel(g, r))
            assert _rel(g, e) <= tol, (inputs[0].shape, _rel(g, e))


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


# ----------------------------------------------------------------------------- the switch
def test_attention_lowering_is_scoped():
    assert danet_onnx.current_lowering() == danet_onnx.DEFAULT_LOWERING == "ort"
    with danet_onnx.attention_lowering("standard"):
        assert danet_onnx.current_lowering() == "standard"
        with danet_onnx.attention_lowering("ort"):
            assert danet_onnx.current_lowering() == "ort"
        assert danet_onnx.current_lowering() == "standard"
    assert danet_onnx.current_lowering() == "ort"
    with pytest.raises(ValueError, match="one of"):
        with danet_onnx.attention_lowering("flash"):
            pass


def test_no_global_registration():
    """The lowering is chosen while tracing: no decomposition of the ops in torch's global table
    (Inductor would refuse its fallback for such an op under CI=1)."""
    table = danet_onnx.decompositions()  # building the table for raw-op graphs registers nothing
    names = {op.name() for op in table}
    assert names == {"danet_ops::pam_forward", "danet_ops::pam_forward_triton",
                     "danet_ops::cam_forward", "danet_ops::cam_forward_triton"}, names
    assert not set(table) & set(torch._decomp.decomposition_table), names


# ----------------------------------------------------------------------------- ONNX: modules
@LOWERINGS
@EXPORTERS
@pytest.mark.parametrize("mode", ["original", "paper"])
def test_modules_onnx(tmp_path, dynamo, lowering, mode):
    _onnx_available(dynamo)
    torch.manual_seed(0)
    model = Head(32, mode).eval()
    path = str(tmp_path / "head.onnx")
    _export_onnx(model, (torch.randn(2, 32, 8, 12),), path, dynamo, {0: [2, 3]}, lowering)
    ops = _check_onnx(path, lowering)
    assert {"MatMul", "Softmax"} <= ops   # CAM's, and PAM's for "standard"
    # one export, two sizes (dynamic H, W); scale 3: sharp softmax rows, as in trained models
    _agree(path, model, [(3 * torch.randn(2, 32, 8, 12),), (3 * torch.randn(2, 32, 5, 7),)])


@LOWERINGS
@EXPORTERS
def test_general_pam_onnx(tmp_path, dynamo, lowering):
    """The general op: scale != 1 and keys/values pooled to their own Nk (kv_pool=2: SAGAN's
    official code, Non-local sub-sampling)."""
    _onnx_available(dynamo)
    torch.manual_seed(0)
    model = danet_ops.PositionAttention(32, scale=4 ** -0.5, kv_pool=2).eval()
    with torch.no_grad():
        model.gamma.fill_(0.7)
    path = str(tmp_path / "pam.onnx")
    _export_onnx(model, (torch.randn(1, 32, 8, 12),), path, dynamo, {0: [2, 3]}, lowering)
    _check_onnx(path, lowering)
    # 7x9: odd sizes, Nk = 3*4 from the floor of the pooling
    _agree(path, model, [(3 * torch.randn(1, 32, 8, 12),), (3 * torch.randn(1, 32, 7, 9),)])


class Functional(torch.nn.Module):
    """The functional op with and without the residual, Nk != Nq, scale != 1 (and 0)."""

    def forward(self, q, k, v, x, g):
        pa = danet_ops.position_attention
        return pa(q, k, v, scale=0.35), pa(q, k, v, x, g, scale=1.7), pa(q, k, v, scale=0.0)


@LOWERINGS
@EXPORTERS
def test_functional_onnx(tmp_path, dynamo, lowering):
    _onnx_available(dynamo)
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 6, 5), torch.randn(2, 4, 3, 4), torch.randn(2, 24, 3, 4),
            torch.randn(2, 24, 6, 5), torch.tensor([0.6]))
    path = str(tmp_path / "functional.onnx")
    _export_onnx(Functional(), args, path, dynamo, {0: [2, 3], 1: [2, 3], 2: [2, 3], 3: [2, 3]}, lowering)
    _check_onnx(path, lowering)
    other = (torch.randn(2, 4, 5, 9), torch.randn(2, 4, 2, 7), torch.randn(2, 24, 2, 7),
             torch.randn(2, 24, 5, 9), torch.tensor([0.6]))
    _agree(path, Functional(), [tuple(3 * t for t in args), tuple(3 * t for t in other)])


@LOWERINGS
@EXPORTERS
def test_converted_blocks_onnx(tmp_path, dynamo, lowering):
    """convert_attention's blocks (released PAM/CAM, mmseg PAM/CAM, ANN's pyramid-pooled keys with
    scale channels^-0.5, OCR's class regions) export with the lowering and agree in ORT."""
    _onnx_available(dynamo)
    from test_convert import Head as MixedHead, _randomise

    model = _randomise(MixedHead()).eval()
    assert danet_ops.convert_attention(model) == ["pam", "cam", "sa", "sc", "ann", "ocr"]
    # ANN's adaptive pools (1, 3, 6, 8): a static size they all divide (the legacy exporter's rule)
    x = torch.randn(1, 16, 24, 24)
    path = str(tmp_path / "converted.onnx")
    _export_onnx(model, (x,), path, dynamo, {}, lowering)
    _check_onnx(path, lowering)
    if lowering == "ort":   # mmseg PAM, released PAM, ANN, OCR
        assert sum(n.op_type == "MultiHeadAttention" for n in onnx.load(path).graph.node) == 4
    _agree(path, model, [(x,), (2 * torch.randn(1, 16, 24, 24),)])


def test_raw_ops_onnx(tmp_path):
    """Graphs that hold the raw ops (both families: compiled and Triton; with and without x/gamma,
    scale, Nk != Nq): lowered by run_decompositions(danet_onnx.decompositions(...)) before the
    ONNX export. torch.export traces with fake tensors: no Triton needed for the *_triton ops."""
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
    with torch.no_grad():
        ref = Oracle()(*(t.double() for t in args))
    for lowering in danet_onnx.LOWERINGS:
        program = torch.export.export(Ops(), args)
        program = program.run_decompositions(danet_onnx.decompositions(lowering))
        path = str(tmp_path / f"ops_{lowering}.onnx")
        torch.onnx.export(program, args, path, verbose=False)
        _check_onnx(path, lowering)
        got = _run_ort(path, *args)
        for g, r in zip(got, ref):
            assert _rel(g, r) <= TOL, lowering


def test_lowering_math_general():
    """The standard lowering is E = scale * q^T k with k/v having their own Nk (the general
    op): checked in float64 against the formula written out with einsum."""
    torch.manual_seed(0)
    B, Cq, Cv, Nq, Nk = 2, 5, 7, 11, 6
    q, k = torch.randn(B, Cq, Nq, dtype=torch.float64), torch.randn(B, Cq, Nk, dtype=torch.float64)
    v = torch.randn(B, Cv, Nk, dtype=torch.float64)
    x, g = torch.randn(B, Cv, Nq, dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    for scale in (1.0, Cq ** -0.5):
        o, lse, y = danet_onnx.pam_math(q, k, v, x, g, scale)
        e = scale * torch.einsum("bci,bcj->bij", q, k)
        ref = torch.einsum("bcj,bij->bci", v, torch.softmax(e, -1))
        assert o.shape == (B, Cv, Nq) and lse.shape == (B, Nq)
        torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)  # float64, same products
        torch.testing.assert_close(lse, torch.logsumexp(e, -1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, g * ref + x, rtol=1e-12, atol=1e-12)


def test_standard_runs_in_onnx_reference_evaluator_and_ort_is_refused(tmp_path):
    """"standard" is plain ONNX: onnx's reference evaluator runs it (a runtime other than ORT);
    that evaluator has no com.microsoft ops and refuses "ort" at load, naming the operator."""
    from onnx.reference import ReferenceEvaluator

    _onnx_available(True)
    torch.manual_seed(0)
    model = Head(8).eval()
    x = torch.randn(1, 8, 5, 6)
    paths = {}
    for lowering in danet_onnx.LOWERINGS:
        paths[lowering] = str(tmp_path / f"{lowering}.onnx")
        _export_onnx(model, (x,), paths[lowering], True, {0: [2, 3]}, lowering)
    got = ReferenceEvaluator(paths["standard"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = _oracle(model)(x.double())
    for g, r in zip(got, ref):
        assert _rel(g, r) <= TOL
    with pytest.raises(Exception, match="MultiHeadAttention"):
        ReferenceEvaluator(paths["ort"])


def test_strict_capture(tmp_path, monkeypatch):
    """The dynamo exporter captures with torch.export(strict=False), then strict=True when that
    fails. Under strict capture (dynamo) the lowering is taken too: "standard" exports; "ort"
    fails saying why (dynamo cannot trace torch.onnx.ops.symbolic) and what to do."""
    _onnx_available(True)
    from torch.onnx._internal.exporter import _capture_strategies as strategies

    monkeypatch.setattr(strategies, "CAPTURE_STRATEGIES", (strategies.TorchExportStrictStrategy,))
    torch.manual_seed(0)
    model = Head(8).eval()
    x = torch.randn(1, 8, 5, 6)
    path = str(tmp_path / "strict.onnx")
    _export_onnx(model, (x,), path, True, {}, "standard")
    _check_onnx(path, "standard")
    _agree(path, model, [(x,)])
    with pytest.raises(Exception, match=r"strict=True\) cannot trace"):
        _export_onnx(model, (x,), path, True, {}, "ort")


# ----------------------------------------------------------------------------- ONNX Runtime memory
def test_ort_lowering_keeps_onnx_runtime_memory_linear(tmp_path):
    """The exported PAM at 64x128 (N = 8192, the N x N matrix 256 MiB in fp32) in ONNX Runtime,
    each lowering in a child process, one run: the peak resident memory above the session and
    its input stays below an eighth of N x N with "ort" (measured: 5 MiB with C = 32), and is at
    least N x N with "standard", whose MatMul writes all of E (measured: 267 MiB)."""
    from models.export import run_onnxruntime

    torch.manual_seed(0)
    model = danet_ops.PositionAttention(32).eval()
    with torch.no_grad():
        model.gamma.fill_(0.5)
    h, w = 64, 128
    nn_bytes = 4 * (h * w) ** 2
    x = torch.randn(1, 32, h, w)
    with torch.no_grad():
        eager = model(x)
    peaks = {}
    for lowering in danet_onnx.LOWERINGS:
        path = str(tmp_path / f"pam_{lowering}.onnx")
        _export_onnx(model, (torch.randn(1, 32, 8, 8),), path, True, {0: [2, 3]}, lowering)
        (out,), (rep,) = run_onnxruntime(path, [(x,)], threads=2)
        assert rep["exact"], "the high-water mark of the child's memory could not be reset"
        assert _rel(out[0], eager) <= TOL, lowering
        peaks[lowering] = rep["peak"]
    assert peaks["ort"] < nn_bytes / 8, {k: v / MIB for k, v in peaks.items()}
    assert peaks["standard"] >= nn_bytes, {k: v / MIB for k, v in peaks.items()}


# ----------------------------------------------------------------------------- ONNX: reference DANet
@pytest.mark.parametrize("backbone,sizes,dynamo,lowering", [
    ("mini", [(64, 64), (48, 80)], True, "ort"),
    ("mini", [(64, 64), (48, 80)], True, "standard"),
    ("mini", [(64, 64), (48, 80)], False, "ort"),
    ("mini", [(64, 64), (48, 80)], False, "standard"),
    pytest.param("resnet50", [(32, 32), (40, 48)], True, "ort", marks=pytest.mark.slow),
], ids=["mini-dynamo-ort", "mini-dynamo-standard", "mini-legacy-ort", "mini-legacy-standard",
        "resnet50-dynamo-ort"])
def test_danet_onnx(tmp_path, backbone, sizes, dynamo, lowering):
    _onnx_available(dynamo)
    model = _danet(backbone)
    path = str(tmp_path / f"danet_{backbone}.onnx")
    _export_onnx(model, (torch.randn(1, 3, *sizes[0]),), path, dynamo, {0: [2, 3]}, lowering)
    _check_onnx(path, lowering)
    torch.manual_seed(1)
    _agree(path, model, [(torch.randn(1, 3, *s),) for s in sizes])


# ----------------------------------------------------------------------------- ONNX: fp16 / bf16 / fp64
@LOWERINGS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_model_exports_with_fp32_attention_math(tmp_path, dtype, lowering):
    """fp16/bf16 PAM: the fused forward ops return O in fp32 for fp16/bf16 inputs (the backward's
    Delta), their fakes say so, and the raw-op decomposition agrees (torch.export checks the
    dtypes). In ONNX, "standard" computes in fp32 (Casts); "ort" gives fp16 to MultiHeadAttention
    (ORT's CPU kernel computes in fp32 and rounds O to fp16) and bf16 as fp32 (ORT has no bf16
    kernel). Both are fp32 math on the half inputs: within a rounding or two of the float64
    oracle on the same inputs, 2 ulp of the largest output."""
    _onnx_available(True)
    m = danet_ops.PositionAttention(16, backend="cpu").eval()
    with torch.no_grad():
        m.gamma.fill_(0.5)
    m = m.to(dtype)
    x = torch.randn(1, 16, 5, 6).to(dtype)
    with torch.no_grad():
        eager = m(x)
        oracle = _oracle(m)(x.double())
    bound = 2 * torch.finfo(dtype).eps
    out = torch.export.export(m, (x,)).run_decompositions().module()(x)   # the fused op, its fake
    assert out.dtype == eager.dtype == dtype
    assert torch.equal(out, eager)
    lowered = torch.export.export(m, (x,)).run_decompositions(danet_onnx.decompositions(lowering))
    if lowering == "standard":      # ("ort" holds the contrib node, which only ONNX Runtime runs)
        out = lowered.module()(x)
        assert out.dtype == dtype and _rel(out, oracle) <= bound
    path = str(tmp_path / "half.onnx")
    with danet_onnx.attention_lowering(lowering):
        torch.onnx.export(m, (x,), path, dynamo=True, verbose=False)
    if dtype == torch.float16:   # ONNX's Conv has no bf16 type before opset 22, nor ORT's CPU kernel
        _check_onnx(path, lowering)
        mha = [n for n in onnx.load(path).graph.node if n.op_type == "MultiHeadAttention"]
        assert len(mha) == (lowering == "ort")
        got = torch.as_tensor(_run_ort(path, x)[0])
        assert got.dtype == dtype and _rel(got, oracle) <= bound


def test_float64_has_no_ort_lowering(tmp_path):
    _onnx_available(True)
    m = danet_ops.PositionAttention(8).double().eval()
    with pytest.raises(Exception, match="attention_lowering\\('standard'\\)"):
        with danet_onnx.attention_lowering("ort"):
            torch.onnx.export(m, (torch.randn(1, 8, 4, 4, dtype=torch.float64),), str(tmp_path / "a.onnx"),
                              dynamo=True, verbose=False)


# ----------------------------------------------------------------------------- torch.export / AOTI / TorchScript
def test_torch_export_keeps_fused_ops():
    """The ONNX lowering does not leak: torch.export (also after its default decompositions,
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
    assert "danet_ops::pam_forward" in str(traced.inlined_graph)   # the fused op, not the lowering
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
    fails naming the op; with it, the package runs at two sizes (dynamic H, W). CI=1 is set for
    the compile: Inductor must keep the fused op there too (it refuses to fall back to an op that
    has a decomposition in torch's global table when CI is set; the lowering registers none)."""
    torch.manual_seed(0)
    model = Head(16).eval()
    dim = torch.export.Dim.DYNAMIC
    ep = torch.export.export(model, (torch.randn(1, 16, 6, 6),), dynamic_shapes=({2: dim, 3: dim},))
    torch.export.save(ep, str(tmp_path / "head.pt2ep"))
    pkg = str(tmp_path / "head.pt2")
    compile_script = textwrap.dedent(f"""
        import torch, danet_ops
        ep = torch.export.load({str(tmp_path / "head.pt2ep")!r})
        torch._inductor.aoti_compile_and_package(ep, package_path={pkg!r})
    """)
    subprocess.run([sys.executable, "-c", compile_script], check=True, cwd=ROOT, env={**os.environ, "CI": "1"})
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


@pytest.mark.parametrize("extra,lowering", [
    ([], "ort"), ([], "standard"), (["--legacy"], "ort"), (["--legacy"], "standard"), ([], None),
], ids=["dynamo-ort", "dynamo-standard", "legacy-ort", "legacy-standard", "dynamo-default"])
def test_models_export_onnx(tiny_checkpoint, tmp_path, capsys, extra, lowering):
    from models import export

    _onnx_available(not extra)
    out = str(tmp_path / "tiny.onnx")
    choice = [] if lowering is None else ["--onnx-attention", lowering]
    rc = export.main(["--checkpoint", tiny_checkpoint, "--format", "onnx", "--output", out] + extra + choice)
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "max |exported - eager|" in text and "at 48x48" in text and "at 36x36" in text, text
    assert f"PAM lowering: {lowering or 'ort'} = " in text, text
    assert "ONNX Runtime (CPU) check: peak memory above the session and its input" in text, text
    _check_onnx(out, lowering or "ort")
