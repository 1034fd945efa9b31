"""Backend "triton", what is Triton's own: op registration and schemas, lazy import (and import
without triton), the autotune pruner, the offline sm_90 / sm_80 compile (shared memory, the
matrix instruction in the SASS, no spills on sm_90), the host code's copies and checks, the
interpreter's bf16 upcast, the CAM split reduction, torch.compile, and the GPU checks
(autotuning, TF32, determinism). The op-vs-oracle cases of PAM and CAM (the general op, the
GPU sizes, layouts, the op's own outputs) run on every backend, triton included, in
test_pam.py and test_cam.py.

Triton decides once per process, when it is first imported, whether kernels are interpreted
(TRITON_INTERPRET=1 at that moment) or compiled. Tests marked `interpreter` run on CPU tensors
under the interpreter, in their own pytest invocation (scripts/test.sh: `TRITON_INTERPRET=1
pytest -m interpreter`); the rest of the suite, CUDA tests with compiled kernels included, in the
normal one (conftest.pytest_collection_modifyitems).
"""
import functools
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from danet_ops import ChannelAttention, PositionAttention, position_attention, reference
from danet_ops import _triton
from danet_ops._triton import _runtime
import conftest
from conftest import make, max_err, pam_inputs, tf32, to64

ops = torch.ops.danet_ops
IN_INTERPRETER = _triton.interpreting()


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if IN_INTERPRETER:
        pytest.skip("this process runs Triton in the interpreter; the CUDA tests need compiled kernels")
    ok, why = _triton.available()
    if not ok:
        pytest.skip(f"triton unavailable: {why}")
    return torch.device("cuda")


# This file's CAM data: a little larger activations and another gamma than conftest's default.
cam_inputs = functools.partial(conftest.cam_inputs, scale=0.3, gamma=0.6)


# ============================================================================ this process
def test_dot_precision_policy():
    prev = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _runtime.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _runtime.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _runtime.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(prev[0])
        torch.backends.cuda.matmul.allow_tf32 = prev[1]
    assert _runtime.dot_precision(torch.float16) == _runtime.dot_precision(torch.bfloat16) == "tf32"


def test_ops_registered_with_the_architecture_schemas():
    want = {
        "pam_forward_triton": "(Tensor q, Tensor k, Tensor v, Tensor? x, Tensor? gamma, float scale=1.) -> (Tensor, Tensor, Tensor)",
        "pam_backward_triton": "(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? gamma, float scale=1.) -> (Tensor, Tensor, Tensor, Tensor)",
        "cam_forward_triton": "(Tensor x, Tensor? gamma, str mode) -> (Tensor, Tensor, Tensor)",
        "cam_backward_triton": "(Tensor dy, Tensor x, Tensor attn, Tensor o, Tensor? gamma, str mode) -> (Tensor, Tensor)",
    }
    for name, sig in want.items():
        assert str(getattr(ops, name).default._schema) == f"danet_ops::{name}{sig}"


def _run_python(code):
    """Run `code` in a fresh Python (without TRITON_INTERPRET); fail with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_import_is_lazy_and_never_touches_the_gpu():
    # Importing the backend imports no triton; asking available() imports triton but must not
    # load the files that launch kernels, nor initialise CUDA.
    _run_python("""
        import sys, torch, danet_ops, danet_ops._triton as t
        assert "triton" not in sys.modules
        ok, _ = t.available()
        assert "triton" in sys.modules or not ok
        loaded = {"pam", "cam", "rowdot", "_jit", "_autotune"} & {
            m.rpartition(".")[2] for m in sys.modules if m.startswith("danet_ops._triton.")}
        assert not loaded, loaded
        assert not torch.cuda.is_initialized()
        """)


def test_cpu_tensors_without_interpreter_are_refused():
    if IN_INTERPRETER:
        pytest.skip("this process interprets Triton")
    ok, why = _triton.available()
    if not ok:
        pytest.skip(f"triton unavailable: {why}")
    q = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.pam_forward_triton(q, q, q, None, None)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.cam_forward_triton(q, None, "paper")


def test_danet_ops_imports_and_says_why_without_triton():
    # The package and the op registration are triton-free: with triton unimportable, import
    # danet_ops works, available() says why, and a call of a *_triton op raises that reason.
    _run_python("""
        import sys
        sys.modules["triton"] = None          # import triton raises ImportError
        import torch, danet_ops
        from danet_ops import _triton as t
        ok, why = t.available()
        assert not ok and "Triton could not be imported" in why, why
        q = torch.randn(1, 2, 4)
        try:
            torch.ops.danet_ops.pam_forward_triton(q, q, q, None, None)
        except RuntimeError as e:
            assert "need Triton" in str(e), e
        else:
            raise AssertionError("no error without triton")
        """)


# ----------------------------------------------------------------------------- autotune tables
def _tuned_specs():
    from danet_ops._triton import cam, pam
    return (pam.FWD, pam.BWD_DKDV, pam.BWD_DQ, cam.MM_NT_PARTIAL, cam.APPLY, cam.BWD_DX)


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm{a}")
def test_autotune_pruner_keeps_one_group_and_the_tiles_that_fit(arch):
    # Per call the pruner keeps the IEEE group (fp32 operands, exact dots) or the arch group,
    # never both, and only candidates whose shared-memory estimate fits the device; on a problem
    # smaller than every tile it keeps the one candidate of least shared memory.
    from danet_ops._triton._autotune import IEEE
    limit = SMEM_LIMIT[arch]
    for spec in _tuned_specs():
        has_ieee = any(t.group == IEEE for t in spec.tiles)
        candidates = spec.candidates((arch // 10, arch % 10))
        prune = spec.pruner(limit)

        def listed_in(group):
            """The candidates that the table lists in `group` (by their launch parameters)."""
            rows = {(t.meta, t.num_warps, t.num_stages) for t in spec.tiles if t.group == group}
            return [c for c in candidates
                    if (tuple(c.kwargs[n] for n in spec.names), c.num_warps, c.num_stages) in rows]

        def smem(cfg, args):
            return spec.smem(cfg.kwargs, cfg.num_stages, {**args, "elt": args[spec.operand].element_size()})

        for dtype, prec in [(torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")]:
            args = {spec.operand: torch.empty(0, dtype=dtype), "CQ_P": 64, "BLOCK_CV": 128,
                    **{dim: 4096 for dim in spec.dims}}
            kept = prune(candidates, args, PREC=prec)
            want = IEEE if (prec == "ieee" and has_ieee) else f"sm{arch}"
            assert kept and all(c in listed_in(want) for c in kept), (spec.kernel.__name__, dtype, prec)
            assert all(smem(c, args) <= limit for c in kept), (spec.kernel.__name__, dtype, prec)
        tiny = {spec.operand: torch.empty(0, dtype=torch.bfloat16), "CQ_P": 16, "BLOCK_CV": 16,
                **{dim: 8 for dim in spec.dims}}
        kept = prune(candidates, tiny, PREC="tf32")
        assert len(kept) == 1 and kept[0] in listed_in(f"sm{arch}")
        assert smem(kept[0], tiny) == min(smem(c, tiny) for c in listed_in(f"sm{arch}"))


# ----------------------------------------------------------------------------- offline compile
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Shared memory per block (opt-in) of the arch each offline compile targets: H100/H200, A100.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _capture_launches(run, capability):
    """Run host code with every launch recorded instead: [(kernel, args, constexprs, num_warps,
    num_stages)] exactly as a GPU of `capability` would get them: a Fixed kernel with its GPU
    config, a Tuned one with the first candidate that the real pruner keeps for those arguments."""
    from danet_ops._triton import _autotune, cam, pam

    launches = []

    def tuned(spec, device, grid, *args, **kwargs):
        named = dict(zip(spec.kernel.arg_names, args))
        limit = SMEM_LIMIT[capability[0] * 10 + capability[1]]
        cfg = spec.pruner(limit)(spec.candidates(capability), named, **kwargs)[0]
        launches.append((spec.kernel, args, {**kwargs, **cfg.kwargs}, cfg.num_warps, cfg.num_stages))

    def fixed(spec, device, grid, *args, **kwargs):
        launches.append((spec.kernel, args, {**kwargs, **spec.gpu}, spec.num_warps, 3))

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(_autotune.Tuned, "launch", tuned)
        mp.setattr(_autotune.Fixed, "launch", fixed)
        for op in (pam, cam):   # CPU tensors stand in for CUDA ones (only shapes, dtypes, strides)
            mp.setattr(op, "check_device", lambda t: None)
        run()
    finally:
        mp.undo()
    return launches


def _compile_offline(fn, args, constexprs, warps, stages, capability):
    """triton.compile for a GPU target without a GPU, specialised like the JIT: integers equal
    to 1 become constants, multiples of 16 and 16-byte aligned pointers get divisibility 16.
    Returns (compiled kernel, SASS text or None when cuobjdump is not bundled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, consts, attrs = {}, dict(constexprs), {}
    names = fn.arg_names
    positional = [n for n in names if n not in constexprs]
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[positional.index(name)]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32" if abs(value) < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32),
                            options=dict(num_warps=warps, num_stages=stages,
                                         enable_fp_fusion=True))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return kernel, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    return kernel, sass


def _stack_bytes(sass):
    """ptxas stack frame of the kernel (cuobjdump -res-usage): > 0 means register spills."""
    return int(re.search(r"STACK:(\d+)", sass).group(1))


def _matrix_instructions(sass):
    """The tensor-core instructions of a kernel's SASS: HGMMA (sm90 wgmma, warpgroup MMA) and
    HMMA (mma.sync, sm80 and later; fp16/bf16 and TF32 operands alike)."""
    return set(re.findall(r"\b(HGMMA|HMMA)\.", sass))


# The SASS matrix instruction of the products, per target (the README's table): tensor cores
# for fp16/bf16 operands and TF32 (cam_bwd_dx's fp32 (dE + dE^T) tile for fp16 inputs); none
# for fp32 operands with exact IEEE products (TF32 not allowed: FMA units), and none in the
# kernels without tl.dot (rowdot, cam_softmax, cam_bwd_ds).
MATRIX_KERNELS = {"pam_fwd_kernel", "pam_bwd_dkdv_kernel", "pam_bwd_dq_kernel",
                  "cam_mm_nt_partial_kernel", "cam_apply_kernel", "cam_bwd_dx_kernel"}
MATRIX_INSTRUCTION = {90: "HGMMA", 80: "HMMA"}


def _offline_launches(capability):
    """Every launch the host code makes (PAM and CAM, forward and backward) for a GPU of
    `capability`: PAM in bf16 and fp32 with IEEE dots (the fp32 tile group), CAM in bf16 and
    fp16 (the fp32 (dE + dE^T) tile path), with the configs the real tables and pruner pick."""
    from danet_ops._triton import cam, pam

    def run_all():
        for dtype in (torch.bfloat16, torch.float32):   # fp32: the IEEE (FMA) candidates
            q, k, v, x, g = [t if t.dim() == 1 else t.flatten(2)
                             for t in pam_inputs(2, 64, 512, 64, 64, dtype=dtype)]
            o, lse, y = pam.forward(q, k, v, x, g)
            pam.backward(y.to(dtype), q, k, v, o, lse, g)
        for dtype in (torch.bfloat16, torch.float16):   # fp16 CAM: the fp32 (dE + dE^T) path
            a = make((2, 512, 64, 64), dtype).flatten(2)
            o, attn, y = cam.forward(a, g, "original")
            cam.backward(y.to(dtype), a, attn, o, g, "original")

    launches = _capture_launches(run_all, capability)
    assert len(launches) == 2 * 4 + 2 * 7   # per dtype: PAM fwd 1 + bwd 3; CAM fwd 3 + bwd 4
    unique = {}
    for fn, args, constexprs, warps, stages in launches:
        key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in constexprs.items())),
               tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args))
        unique.setdefault(key, (fn, args, constexprs, warps, stages))
    return list(unique.values())


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm{a}")
def test_compiled_mode_kernels_build_offline(arch, no_tf32):
    # The interpreter does not run triton's compiler. Here every launch the host code makes is
    # compiled for sm_90 (H100) and sm_80 (A100) exactly as on a GPU: compiled-mode frontend,
    # layouts, wgmma / mma.sync / FMA lowering and ptxas. No GPU needed. Checked: shared memory
    # within the arch's limit, the matrix instruction of every product (SASS, read with the
    # cuobjdump that triton bundles), and on sm_90 no register spills (the sm_80 candidate
    # table is untuned: one cam_bwd_dx candidate spills a few bytes there, see docs/triton.md).
    # no_tf32: fp32 launches compile their IEEE dots.
    if IN_INTERPRETER:
        pytest.skip("this process runs Triton in the interpreter")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no offline-compile API ({exc})")
    for fn, args, constexprs, warps, stages in _offline_launches((arch // 10, arch % 10)):
        what = f"sm_{arch} {fn.__name__} {constexprs}, {warps} warps, {stages} stages"
        kernel, sass = _compile_offline(fn, args, constexprs, warps, stages, arch)
        assert kernel.metadata.shared <= SMEM_LIMIT[arch], (what, kernel.metadata.shared)
        if sass is None:
            continue   # a triton without cuobjdump: compiled through ptxas, nothing more to read
        if arch == 90:
            assert _stack_bytes(sass) == 0, f"{what}: {_stack_bytes(sass)} bytes of stack (spills)"
        tensor_cores = fn.__name__ in MATRIX_KERNELS and constexprs["PREC"] != "ieee"
        want = {MATRIX_INSTRUCTION[arch]} if tensor_cores else set()
        assert _matrix_instructions(sass) == want, (what, _matrix_instructions(sass))


# ============================================================================ interpreter: PAM
@pytest.mark.interpreter
def test_interp_pam_host_code_makes_no_copies():
    # Strided (channels_last) inputs are read in place: the host code only allocates outputs
    # (and small fp32 row buffers); no aten copy, clone or contiguous of an input happens.
    from torch.utils._python_dispatch import TorchDispatchMode
    from danet_ops._triton import pam

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    q, k, v, x, g = [t if t.dim() == 1 else t.flatten(2)
                     for t in pam_inputs(2, 4, 20, 5, 7, layout="channels_last")]
    with Log() as log:
        o, lse, y = pam.forward(q, k, v, x, g)
        pam.backward(torch.randn_like(y), q, k, v, o, lse, g)
    # (aten.copy_ is not counted: the interpreter copies every kernel argument back after a
    # launch, and dk.copy_(partials.sum(0)) writes into a fresh output.)
    copies = [op for op in log.ops if op in ("aten.clone", "aten._to_copy", "aten.contiguous")]
    assert not copies, log.ops
    assert "aten.empty" in log.ops        # the log does see the host code's aten calls


@pytest.mark.interpreter
def test_interp_bf16_upcast_path():
    # The interpreter's bf16 tl.dot is wrong (triton 3.9); the kernels upcast bf16 tiles there.
    if not IN_INTERPRETER:
        pytest.skip("needs the Triton interpreter")
    assert _runtime.f32_dot(torch.bfloat16) and not _runtime.f32_dot(torch.float16)


@pytest.mark.interpreter
def test_interp_pam_empty_and_direct_op():
    q = torch.randn(2, 3, 0)
    o, lse, y = ops.pam_forward_triton(q, q, torch.randn(2, 5, 0), None, None)
    assert o.shape == (2, 5, 0) and lse.shape == (2, 0) and y.shape == (0,)
    with pytest.raises(ValueError, match="float64"):
        ops.pam_forward_triton(*[torch.randn(1, 2, 4, dtype=torch.float64)] * 3, None, None)
    with pytest.raises(ValueError, match="Cq = 300"):
        ops.pam_forward_triton(torch.randn(1, 300, 4), torch.randn(1, 300, 4),
                               torch.randn(1, 2, 4), None, None)


# ============================================================================ interpreter: general PAM op
# (its values on every backend: test_pam.py's general-op grid)
@pytest.mark.interpreter
def test_interp_general_pam_rejects_mismatched_positions():
    q, k, v, x = torch.randn(1, 3, 10), torch.randn(1, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 10)
    g = torch.tensor([0.7])
    with pytest.raises(ValueError, match="Nk"):
        ops.pam_forward_triton(q, k, v[..., :3], x, g)          # k and v disagree on Nk
    with pytest.raises(ValueError, match="Nq"):
        ops.pam_forward_triton(q, k, v, x[..., :4], g)          # x must have the output's shape


# ============================================================================ interpreter: CAM
@pytest.mark.interpreter
def test_interp_cam_split_reduction_covers_all_of_n():
    # The partial products are split over N; every split must be summed exactly once.
    from danet_ops._triton import cam

    S, chunk = cam._splits(1, 20, 49, torch.device("cpu"), True)
    assert S == 2 and chunk * (S - 1) < 49 <= chunk * S
    x = torch.randn(1, 20, 49)
    _, attn, _ = ops.cam_forward_triton(x, None, "paper")
    assert max_err(attn, torch.softmax(x @ x.transpose(1, 2), -1)) < 1e-6


# ============================================================================ interpreter: torch.compile
def _compiled_matches_eager(module, x, backend):
    conftest.compiled_matches_eager(module, x, backend, tol=1e-5, param_tol=1e-4)


@pytest.mark.interpreter
def test_interp_compile_fullgraph_aot_eager():
    # fullgraph=True raises on any graph break; aot_eager runs AOTAutograd through the fake
    # kernels and the registered autograd, and calls the Triton ops (interpreted) at run time.
    torch.manual_seed(0)
    pam = PositionAttention(16, backend="triton")
    with torch.no_grad():
        pam.gamma.fill_(0.5)
    _compiled_matches_eager(pam, torch.randn(2, 16, 5, 4), "aot_eager")
    cam = ChannelAttention(backend="triton")
    with torch.no_grad():
        cam.gamma.fill_(0.5)
    _compiled_matches_eager(cam, torch.randn(2, 16, 5, 4) * 0.3, "aot_eager")


@pytest.mark.slow
@pytest.mark.interpreter
def test_interp_compile_fullgraph_inductor():
    torch.manual_seed(0)
    pam = PositionAttention(16, backend="triton")
    with torch.no_grad():
        pam.gamma.fill_(0.5)
    _compiled_matches_eager(pam, torch.randn(2, 16, 5, 4), "inductor")


# ============================================================================ CUDA (compiled kernels)
# With DANET_OPS_TEST_GPU_ON_CPU=1 (conftest.GPU_ON_CPU) these tests are marked `interpreter`
# instead: CPU tensors under TRITON_INTERPRET=1, each shape shrunk by _gpu_shape. That runs every
# line of their logic (argument building, op contracts, comparisons) here; what only a GPU can
# show (compiled kernels, autotuning, TF32 rounding, speed) still waits for one.
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
gpu_test = pytest.mark.interpreter if conftest.GPU_ON_CPU else (lambda fn: fn)


def _gpu_device():
    if conftest.GPU_ON_CPU:
        if not IN_INTERPRETER:
            pytest.skip("DANET_OPS_TEST_GPU_ON_CPU=1 runs this test under TRITON_INTERPRET=1")
        return torch.device("cpu")
    return needs_cuda()


def _gpu_shape(*shape):
    """The test's GPU shape, or in GPU-on-CPU mode one the interpreter runs in seconds: B and Cq
    kept, at most 40 value (PAM) or attention (CAM) channels (three interpreter blocks of 16,
    the last ragged), H x W at most 5 x 7 (N = 35: ragged query and key blocks)."""
    if not conftest.GPU_ON_CPU:
        return shape
    *lead, c, H, W = shape
    return (*lead, min(c, 40), min(H, 5), min(W, 7))


@pytest.mark.gpu
@gpu_test
def test_cuda_deterministic():
    # No atomics: the same call gives bitwise the same results (autotuning done on the first).
    # The ops take [B, C, N] (flatten(2) is what position_attention hands them).
    dev = _gpu_device()
    q, k, v, x, g = [t if t.dim() == 1 else t.flatten(2) for t in
                     pam_inputs(*_gpu_shape(2, 64, 256, 48, 48), dtype=torch.bfloat16, device=dev)]
    dy = torch.randn_like(v)
    xc = make(_gpu_shape(2, 256, 48, 48), torch.bfloat16, device=dev).flatten(2)
    dyc = torch.randn_like(xc)
    runs = []
    for _ in range(3):
        o, lse, y = ops.pam_forward_triton(q, k, v, x, g)
        run = (o, lse, y) + tuple(ops.pam_backward_triton(dy, q, k, v, o, lse, g))
        o, attn, y = ops.cam_forward_triton(xc, g, "original")
        runs.append(run + (o, attn, y) + tuple(ops.cam_backward_triton(dyc, xc, attn, o, g, "original")))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.gpu
@gpu_test
def test_cuda_tf32_policy_is_honoured():
    dev = _gpu_device()
    inputs = pam_inputs(*_gpu_shape(1, 64, 128, 32, 32), dtype=torch.float32, residual=False,
                        device=dev)
    oracle = reference.position_attention(*to64(inputs[:3]))
    with tf32(False):
        err_ieee = max_err(position_attention(*inputs[:3], backend="triton"), oracle)
    with tf32(True):
        err_tf32 = max_err(position_attention(*inputs[:3], backend="triton"), oracle)
    if conftest.GPU_ON_CPU:  # the interpreter's dots are numpy fp32 whatever the precision flag
        assert err_ieee < 1e-5 and err_tf32 < 1e-5
        return
    assert err_ieee < 1e-5 < err_tf32


@pytest.mark.gpu
@gpu_test
def test_cuda_compile_inductor():
    dev = _gpu_device()
    torch.manual_seed(0)
    # GPU-on-CPU: aot_eager (the same graph capture, without Inductor's minute of C++ builds);
    # the inductor path on CPU is test_interp_compile_fullgraph_inductor.
    backend = "aot_eager" if conftest.GPU_ON_CPU else "inductor"
    C = 16 if conftest.GPU_ON_CPU else 64
    pam = PositionAttention(C, backend="triton").to(dev)
    with torch.no_grad():
        pam.gamma.fill_(0.5)
    # cuDNN's TF32 convolutions could differ between eager and compiled at 1e-3: both in fp32
    with tf32(False), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        _compiled_matches_eager(pam, torch.randn(*_gpu_shape(2, C, 16, 16), device=dev), backend)
