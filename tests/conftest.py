"""Shared test helpers: input makers, the float64 oracle and the error bound.

Error bound (flash-attention's rule): a backend in dtype D may be off from the float64 oracle by
at most 2x what PyTorch's own reference computation in dtype D is off, plus a small floor.
"""
import os
from typing import NamedTuple

import pytest
import torch

from danet_ops import testing
# re-exported for the test files: the oracle comparison lives in danet_ops.testing
from danet_ops.testing import (FLOOR, PAM_NAMES, CAM_NAMES, compare_to_oracle, max_err,  # noqa: F401
                               run_with_grads, tf32, to64)

LAYOUTS = ("contiguous", "channels_last", "channel_slice")

# DANET_OPS_TEST_GPU_ON_CPU=1: the @pytest.mark.gpu tests run their logic on CPU tensors with
# shrunk shapes (test_triton.py: under TRITON_INTERPRET=1; test_cuda.py: through the CUDA kernel
# emulator of tests/cuda_emu). What that proves and what it cannot: docs/triton.md.
GPU_ON_CPU = os.environ.get("DANET_OPS_TEST_GPU_ON_CPU") == "1"


def make(shape, dtype, layout="contiguous", gen=None, scale=1.0, device=None):
    """A [B, C, H, W] tensor in the requested memory layout (values from `gen`) on `device`.

    The layout is made on the device itself: `.to(device)` of a channel slice would give a
    contiguous copy and silently drop the layout under test."""
    B, C, H, W = shape
    extra = 3 if layout == "channel_slice" else 0
    t = (torch.randn(B, C + extra, H, W, generator=gen, dtype=torch.float64) * scale).to(
        device=device, dtype=dtype)
    if layout == "channel_slice":  # a view into a wider conv output: non-contiguous along C
        t = t[:, 2:2 + C]
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def pam_inputs(B, Cq, Cv, H, W, dtype=torch.float32, layout="contiguous", residual=True,
               seed=0, qk_scale=0.5, device=None):
    gen = torch.Generator().manual_seed(seed)
    q = make((B, Cq, H, W), dtype, layout, gen, qk_scale, device)
    k = make((B, Cq, H, W), dtype, layout, gen, qk_scale, device)
    v = make((B, Cv, H, W), dtype, layout, gen, 1.0, device)
    if not residual:
        return q, k, v, None, None
    x = make((B, Cv, H, W), dtype, layout, gen, 1.0, device)
    gamma = torch.tensor([0.7], dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype,
                         device=device)
    return q, k, v, x, gamma


def general_inputs(B, Cq, Cv, q_hw, k_hw, dtype=torch.float64, layout="contiguous", seed=0,
                   residual=True, device=None):
    """q [B, Cq, *q_hw], k [B, Cq, *k_hw], v [B, Cv, *k_hw], x [B, Cv, *q_hw] (hw: (H, W) or (N,))."""
    gen = torch.Generator().manual_seed(seed)

    def t(C, hw, s=1.0):
        shape = (B, C, *hw) if len(hw) == 2 else (B, C, hw[0], 1)
        out = make(shape, dtype, layout, gen, s, device)
        return out if len(hw) == 2 else out.flatten(2)
    q, k, v = t(Cq, q_hw, 0.5), t(Cq, k_hw, 0.5), t(Cv, k_hw)
    if not residual:
        return [q, k, v, None, None]
    return [q, k, v, t(Cv, q_hw), torch.tensor([0.7], dtype=torch.float64 if dtype == torch.float64
                                                else torch.float32, device=device)]


# The general op (SAGAN / Non-local / ANN / OCR): keys of their own length, a scale.
GENERAL_CASES = [  # (B, Cq, Cv, q spatial, k spatial, scale)   Nq vs Nk: fewer, more, one, ragged
    (2, 8, 16, (12, 10), (6, 5), 1.0),          # SAGAN-official: keys pooled 2x2, Nk = Nq / 4
    (1, 4, 12, (9, 7), (110,), 4 ** -0.5),      # ANN: a pyramid of 110 pooled keys, 1/sqrt(d)
    (2, 6, 5, (5, 3), (19,), 6 ** -0.5),        # OCR: class-region keys [B, C, K]
    (1, 3, 4, (7, 7), (1,), 2.0),               # Nk = 1: A = 1 everywhere
    (1, 5, 9, (17, 1), (300,), 0.3),            # Nk > Nq, ragged past a 256 block
    (2, 8, 16, (6, 6), (6, 6), 1.0),            # DANet itself
    (2, 12, 20, (15, 20), (77,), 0.125),        # Nk < Nq, several ragged query blocks
    (1, 6, 10, (4, 4), (48,), -1.0),            # negative scale: the row max is taken after it
]


def pam_minus_inf_inputs(dtype=torch.float32, whole_row=False):
    """q, k, v [1, C, 300] where every query's first 256 keys (a whole first key block of every
    backend, and more) have logit -inf: s = 1*(-inf) + 1*finite. The online softmax must give
    them weight 0 (not -inf - -inf = NaN). whole_row: all 300 keys -inf (0/0 = NaN, as the
    reference)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.ones(1, 2, 300, dtype=dtype)
    k = torch.randn(1, 2, 300, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(1, 3, 300, generator=gen, dtype=torch.float64).to(dtype)
    k[:, 0, :300 if whole_row else 256] = float("-inf")
    return q, k, v


def cam_inputs(B, C, H, W, dtype=torch.float32, layout="contiguous", residual=True, seed=0,
               scale=0.2, gamma=0.7, device=None):
    gen = torch.Generator().manual_seed(seed)
    x = make((B, C, H, W), dtype, layout, gen, scale, device)
    if not residual:
        return [x, None]
    return [x, torch.tensor([gamma], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                            device=device)]


def lowp_bound(got_fn, ref_fn, inputs, oracle):
    """max error of got_fn(*inputs) vs oracle, and the policy's bound: 2x the reference's own
    error on the same (low-precision or mixed) inputs."""
    got, ref = got_fn(*inputs), ref_fn(*inputs)
    return max_err(got, oracle), 2.0 * max_err(ref, oracle)


def compiled_matches_eager(module, x, backend, tol=1e-4, param_tol=1e-3):
    """torch.compile(module, fullgraph=True) gives eager's output and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = module(xe)
    ye.sum().backward()
    ge = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    yc = compiled(xc)
    yc.sum().backward()
    assert max_err(yc, ye) < tol
    assert max_err(xc.grad, xe.grad) < tol
    for p, g in zip(module.parameters(), ge):
        assert max_err(p.grad, g) < param_tol


def compare_pam(backend, inputs, floor, **kw):
    """position_attention(*inputs, backend=backend, **kw): y and every gradient vs the float64
    oracle (danet_ops.testing.compare_pam: 2x the reference's own error + the analysis terms of
    the rebuilt softmax, or the floor). fp32 at IEEE precision (no TF32 on a GPU)."""
    from danet_ops import position_attention
    fn = lambda *t: position_attention(*t, backend=backend, **kw)  # noqa: E731
    return testing.compare_pam(fn, inputs, floor, scale=kw.get("scale", 1.0))


def compare_cam(backend, inputs, mode, floor):
    """channel_attention(x, gamma, mode, backend): y, dx, dgamma vs the float64 oracle, as above."""
    from danet_ops import channel_attention
    fn = lambda x, g: channel_attention(x, g, mode=mode, backend=backend)  # noqa: E731
    return testing.compare_cam(fn, inputs, mode, floor)


@pytest.fixture
def no_tf32():
    """fp32 comparisons at IEEE precision for the whole test."""
    with tf32(False):
        yield


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # Tests pick backends explicitly; a DANET_OPS_BACKEND in the caller's shell must not leak in.
    monkeypatch.delenv("DANET_OPS_BACKEND", raising=False)


# ----------------------------------------------------------------------------- backends under test
# The op tests (test_pam.py, test_cam.py) run each case on every backend x device x CPU path,
# each a test id (the `backend` parameter):
#   "reference"          the released code's bmm (the oracle's own computation, in the dtype)
#   "cpu"                the C++ kernels, fp32/fp64
#   "cpu-lowp"           the C++ kernels, fp16/bf16 with low-precision tile products
#                        (DANET_OPS_CPU_LOWP=1: brgemm, or CBLAS where brgemm refuses)
#   "cpu-fp32tiles"      the C++ kernels, fp16/bf16 computed on fp32 tiles (DANET_OPS_CPU_LOWP=0)
#   "triton-interp"      CPU tensors through the Triton interpreter. Triton decides once per
#                        process, when it is imported, whether kernels are interpreted, so these
#                        carry the `interpreter` marker and run in their own invocation:
#                        `TRITON_INTERPRET=1 pytest -m interpreter` (scripts/test.sh runs both);
#                        a process without the interpreter skips them, saying so.
#   "triton-cuda", "cuda" CUDA tensors, marked `gpu` (skip cleanly without a GPU)
HALF = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64, torch.float32) + HALF


class Target(NamedTuple):
    backend: str                 # the backend= name
    device: str                  # "cpu" | "cuda"
    marks: tuple                 # pytest marks of its cases
    env: dict                    # environment the call runs under (a CPU path forced)
    dtypes: tuple                # the input dtypes it runs


# The CPU backend's paths for fp16/bf16 inputs, forced by DANET_OPS_CPU_LOWP (its default picks one
# of them by the CPU's matrix units); fp32/fp64 have one path each.
CPU_PATHS = {"cpu-lowp": {"DANET_OPS_CPU_LOWP": "1"}, "cpu-fp32tiles": {"DANET_OPS_CPU_LOWP": "0"}}


def _targets():
    """Every backend of danet_ops.backends.REGISTRY on every device it takes, the CPU backend once
    per path: the test matrix's backend axis."""
    from danet_ops.backends import REGISTRY
    targets = {}
    for b in REGISTRY.values():
        dtypes = tuple(dt for dt in ALL_DTYPES if dt in b.dtypes)
        for dev in b.devices or ("cpu",):
            if dev in b.interpreted:
                tid, marks = f"{b.name}-interp", (pytest.mark.interpreter,)
            elif dev == "cuda":
                tid, marks = (b.name if b.devices == ("cuda",) else f"{b.name}-cuda"), (pytest.mark.gpu,)
            else:
                tid, marks = b.name, ()
            if b.name == "cpu":
                targets[tid] = Target(b.name, dev, marks, {}, tuple(d for d in dtypes if d not in HALF))
                for path, env in CPU_PATHS.items():
                    targets[path] = Target(b.name, dev, marks, env, tuple(d for d in dtypes if d in HALF))
            else:
                targets[tid] = Target(b.name, dev, marks, {}, dtypes)
    return targets


BACKENDS = _targets()   # reference, cpu, cpu-lowp, cpu-fp32tiles, cuda, triton-cuda, triton-interp

# One floor per dtype for every backend: what the Triton, CUDA and CPU low-precision kernels do
# beyond the reference (P, dO, dE rounded to the input dtype) is in the bound's analysis term
# (danet_ops.testing.pam_extra_error / cam_extra_error), not in a per-backend floor.
def floor(dtype, backend_id=None):
    """The floor of the error bound for this dtype (the same for every backend)."""
    return FLOOR[dtype]


def backend_grid(cases, dtypes, backends=tuple(BACKENDS), keep=lambda backend, case, dtype: True):
    """pytest.params (backend id, case, dtype) for every combination a target runs (its dtypes:
    no fp64 on the GPU backends, the CPU paths by dtype), and only those `keep` accepts (e.g.
    the interpreter runs one 16-block at a time in numpy: only cases it runs in seconds)."""
    params = []
    for b in backends:
        for case in cases:
            for dt in dtypes:
                if dt not in BACKENDS[b].dtypes or not keep(b, case, dt):
                    continue
                params.append(pytest.param(b, case, dt, marks=BACKENDS[b].marks,
                                           id=f"{b}-{_case_id(case)}-{str(dt).replace('torch.', '')}"))
    return params


def _case_id(case):
    if not isinstance(case, tuple):
        return f"{case:g}" if isinstance(case, float) else str(case)
    sep = "x" if all(isinstance(c, int) for c in case) else "-"
    return sep.join(_case_id(c) for c in case)


def backend_params(*ids):
    """pytest.params of backend ids (default: every target that runs fp32), with their markers."""
    ids = ids or tuple(b for b, t in BACKENDS.items() if torch.float32 in t.dtypes)
    return [pytest.param(b, marks=BACKENDS[b].marks, id=b) for b in ids]


@pytest.fixture(autouse=True)
def _target_env(request, monkeypatch):
    """A test parametrized by a backend id runs under that target's environment (its CPU path)."""
    callspec = getattr(request.node, "callspec", None)
    target = BACKENDS.get(callspec.params.get("backend")) if callspec else None
    for var in {var for env in CPU_PATHS.values() for var in env}:
        monkeypatch.delenv(var, raising=False)
    for var, value in (target.env if target else {}).items():
        monkeypatch.setenv(var, value)


def device_for(backend_id, op="pam", dtype=torch.float32):
    """(backend name, device) for a backend id, or skip with the reason this process cannot run it."""
    from danet_ops import backends
    target = BACKENDS[backend_id]
    name, dev = target.backend, target.device
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "triton":
        from danet_ops import _triton
        if _triton.interpreting() != (dev == "cpu"):
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 at import (pytest -m interpreter)"
                        if dev == "cpu" else "this process interprets Triton; CUDA needs compiled kernels")
    why = backends.get(name).available(torch.device(dev), dtype, op)
    if why:
        pytest.skip(f"backend {name!r} unavailable here: {why}")
    return name, torch.device(dev)


def pytest_collection_modifyitems(config, items):
    """Tests marked `interpreter` run only in a process whose Triton interprets (see BACKENDS).
    Elsewhere a plain run (no -m, no TRITON_INTERPRET=1) deselects them: they are the other
    invocation's (scripts/test.sh runs both); a run that selects by marker (-m interpreter,
    -m gpu) or asked for the interpreter skips them, saying why (no triton, or imported too early)."""
    marked = [item for item in items if item.get_closest_marker("interpreter")]
    if not marked:
        return
    from danet_ops import _triton
    ok, why = _triton.available()
    if ok and _triton.interpreting():
        return
    if not config.option.markexpr and os.environ.get("TRITON_INTERPRET") != "1":
        config.hook.pytest_deselected(items=marked)
        items[:] = [item for item in items if not item.get_closest_marker("interpreter")]
        return
    reason = (f"Triton unavailable: {why}" if not ok else
              "needs the Triton interpreter: TRITON_INTERPRET=1 set before triton's import "
              "(bash scripts/test.sh runs it: TRITON_INTERPRET=1 pytest -m interpreter)")
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))


# ----------------------------------------------------------------------------- margin report
# Every oracle comparison (danet_ops.testing.check / check_bound) reports err / bound. With
# --margins the run lists the tightest at its end; with --margins-max R it fails when any
# comparison sits above R of its bound (CI: 0.8), i.e. where the next CPU or library could tip
# it over. --margins-json FILE appends every record (JSON lines) for a combined report.
def pytest_addoption(parser):
    group = parser.getgroup("danet_ops margins")
    group.addoption("--margins", action="store_true",
                    help="print the 20 oracle comparisons closest to their error bound")
    group.addoption("--margins-max", type=float, default=None, metavar="R",
                    help="fail the run if any oracle comparison exceeds R of its bound (implies --margins)")
    group.addoption("--margins-json", default=None, metavar="FILE",
                    help="append every oracle comparison (test, name, err, bound, term) as JSON lines")


_MARGINS = {"node": None, "records": []}


def _margins_on(config):
    o = config.option
    return o.margins or o.margins_max is not None or o.margins_json


def pytest_configure(config):
    if _margins_on(config):
        testing.observers.append(lambda c: _MARGINS["records"].append((_MARGINS["node"], c)))


@pytest.fixture(autouse=True)
def _margin_node(request):
    _MARGINS["node"] = request.node.nodeid
    yield
    _MARGINS["node"] = None


def _tightest(n=20):
    rows = [(c.err / c.bound if c.bound > 0 else (0.0 if c.err == 0 else float("inf")), node, c)
            for node, c in _MARGINS["records"]]
    return sorted(rows, key=lambda r: -r[0])[:n]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _margins_on(config):
        return
    tr = terminalreporter
    rec = _MARGINS["records"]
    tr.section(f"oracle margins: err / bound, the 20 tightest of {len(rec)} comparisons")
    for ratio, node, c in _tightest():
        tr.write_line(f"{ratio:6.3f}  {c.err:9.3e} / {c.bound:9.3e}  {c.term:12s} {c.name:7s} {node}")
    if config.option.margins_json:
        import json
        with open(config.option.margins_json, "a") as f:
            for node, c in rec:
                f.write(json.dumps({"test": node, **c._asdict()}) + "\n")
    limit = config.option.margins_max
    if limit is not None:
        over = [r for r in _tightest(len(rec)) if r[0] > limit]
        tr.write_line(f"margin check: {len(over)} comparison(s) above {limit} of their bound"
                      + ("" if over else " (pass)"))


def pytest_sessionfinish(session, exitstatus):
    limit = session.config.option.margins_max
    if limit is not None and exitstatus == 0:
        if any(r[0] > limit for r in _tightest(len(_MARGINS["records"]))):
            session.exitstatus = 1
