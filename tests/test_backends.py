"""The backend registry (danet_ops.backends): its objects, "auto", available_backends(), and
that asking what is available compiles nothing and `import danet_ops` stays cheap."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import danet_ops
from danet_ops import backends

ROOT = Path(__file__).resolve().parent.parent
HALF_AND_FULL = (torch.float32, torch.bfloat16)


def test_registry_holds_the_four_backends_with_their_ops():
    assert tuple(backends.REGISTRY) == ("reference", "cpu", "cuda", "triton")
    for name, b in backends.REGISTRY.items():
        assert b.name == name and b.fix
        assert set(b.dtypes) <= set(danet_ops._contract.FLOAT_DTYPES)
        if name == "reference":
            assert not b.ops and b.pam_forward is None and b.devices == ()
            continue
        assert {"pam_forward", "pam_backward", "cam_forward", "cam_backward"} <= set(b.ops)
        assert callable(b.pam_forward) and callable(b.cam_forward)
    assert set(backends.REGISTRY["cpu"].ops) - set(backends.REGISTRY["cuda"].ops) == {
        "pam_forward_inference", "cam_forward_inference"}
    assert backends.op_names("pam_forward") == ("danet_ops::pam_forward", "danet_ops::pam_forward_triton")
    # Every op the "cpu" backend names is registered in this process (the library is loaded).
    cpu = backends.get("cpu")
    assert all(cpu.op(entry) is not None for entry in cpu.ops)
    assert cpu.op("no_such_entry") is None


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'cuda', 'triton'\)"):
        backends.get("fast")


def test_available_backends_shape_and_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    av = danet_ops.available_backends("cpu", torch.float32, "pam")
    assert list(av) == list(backends.REGISTRY)
    ok, detail = av["cpu"]                                   # still a 2-tuple
    assert ok and av["cpu"].ok and detail.startswith(danet_ops._extension.how())   # "prebuilt _C..."
    assert av["reference"] == (True, "")
    assert av["cuda"] == (False, "backend 'cuda' runs on CUDA tensors; these are on cpu")
    assert not av["triton"].ok and "TRITON_INTERPRET=1" in av["triton"].detail
    fp64 = danet_ops.available_backends("cuda", torch.float64, "cam")
    assert fp64["cuda"].detail == "backend 'cuda' supports float32, float16 and bfloat16, not float64"
    assert fp64["cpu"].detail == "backend 'cpu' runs on CPU tensors; these are on cuda"


def test_available_backends_reports_the_cpu_path_and_isa(monkeypatch):
    # With the library's cpu_path / cpu_isa ops (a library without them reports no path: a stub
    # namespace stands in, to check the wiring).
    real = torch.ops.danet_ops
    if not hasattr(real, "cpu_path"):
        class Stub:
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def cpu_path(op, dtype):
                return f"{op}-{dtype}"

            @staticmethod
            def cpu_isa():
                return "some-isa"
        monkeypatch.setattr(torch.ops, "danet_ops", Stub())
    ops = torch.ops.danet_ops
    for op in ("pam", "cam"):
        for dtype in HALF_AND_FULL:
            ok, detail = danet_ops.available_backends("cpu", dtype, op)["cpu"]
            assert ok and f"path: {ops.cpu_path(op, dtype)}" in detail, detail
            assert f"ISA: {ops.cpu_isa()}" in detail, detail


def test_auto_order_and_an_unavailable_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert backends.resolve("auto", "cam", cpu, torch.float64) == "cpu"
    assert backends.resolve("auto", "pam", torch.device("meta"), torch.float32) == "reference"
    monkeypatch.setattr(backends.get("cpu"), "check", lambda device, dtype, op: "broken here")
    assert backends.resolve("auto", "pam", cpu, torch.float32) == "reference"
    with pytest.raises(danet_ops.BackendUnavailableError,
                       match=r"backend 'cpu' cannot run pam here: broken here\. To fix: build"):
        backends.resolve("cpu", "pam", cpu, torch.float32)


def test_resolve_is_a_constant_for_torch_compile():
    # backends.resolve carries the mark torch.compiler.assume_constant_result sets (set by hand:
    # the decorator would import torch._dynamo at `import danet_ops`); the mark must still be
    # the one torch uses.
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert marked._dynamo_marked_constant is True
    assert backends.resolve._dynamo_marked_constant is True


# ----------------------------------------------------------------------------- no compile, cheap import
_FRESH = textwrap.dedent("""
    import os, sys, warnings
    import torch
    from torch.utils import cpp_extension
    builds = []

    def mock_build(**kw):                  # stands in for the one-minute JIT build
        builds.append(kw["name"])
        raise RuntimeError("mock build failed")

    cpp_extension.load = mock_build
    import danet_ops
    from danet_ops import _extension
    assert danet_ops.__file__.startswith(os.getcwd()), danet_ops.__file__
    assert _extension.prebuilt() is None and not _extension.loaded()
    assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules
    assert not torch.cuda.is_initialized()

    os.environ["DANET_OPS_JIT"] = "0"
    cpu = danet_ops.available_backends("cpu")["cpu"]
    assert cpu == (False, "the C++ ops are not available (danet_ops._C was not built and "
                          "DANET_OPS_JIT=0 forbids the JIT build)"), cpu
    del os.environ["DANET_OPS_JIT"]
    for dtype in (torch.float32, torch.bfloat16):
        for op in ("pam", "cam"):
            cpu = danet_ops.available_backends("cpu", dtype, op)["cpu"]
            assert cpu == (True, "not built; JIT-compiles on first use (about a minute, once)"), cpu
    assert not builds and "triton" not in sys.modules and not torch.cuda.is_initialized()
    cuda = danet_ops.available_backends("cuda")     # (imports triton: it could take CUDA tensors)
    assert cuda["cpu"].ok is False and cuda["cuda"].ok is _extension.jit_builds_cuda(), cuda
    assert not builds and not torch.cuda.is_initialized()

    # A real call builds: here the mocked build fails, so "auto" falls back to the reference
    # and an explicit backend="cpu" says why.
    q = torch.randn(1, 2, 5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = danet_ops.position_attention(q, q, q)
    assert builds == ["danet_ops_C"], builds
    assert any(issubclass(w.category, _extension.JitBuildWarning) for w in seen)
    assert torch.equal(y, danet_ops.reference.position_attention(q, q, q))
    try:
        danet_ops.position_attention(q, q, q, backend="cpu")
        raise AssertionError("no error")
    except danet_ops.BackendUnavailableError as exc:
        assert "RuntimeError: mock build failed" in str(exc), exc
    assert builds == ["danet_ops_C"], builds          # a failed build is not retried
    print("ok")
""")


def test_asking_compiles_nothing_and_import_is_cheap(tmp_path):
    # A fresh process on a copy of the package without the prebuilt library (the sources are
    # there, so the JIT build is possible): importing and asking build nothing, import no triton,
    # touch no GPU; the first call builds.
    shutil.copytree(ROOT / "danet_ops", tmp_path / "danet_ops",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    os.symlink(ROOT / "csrc", tmp_path / "csrc")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "DANET_OPS_JIT", "DANET_OPS_BACKEND", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", _FRESH], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
