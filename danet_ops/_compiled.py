"""Backends "cpu" and "cuda": the C++/CUDA ops of csrc/, loaded from danet_ops._C.

The ahead-of-time build (setup.py) leaves danet_ops/_C*.so next to this file. When it is
missing (plain `pip install .` under build isolation cannot see torch) the same sources are
JIT-compiled with torch.utils.cpp_extension on first use, unless DANET_OPS_JIT=0.
"""
import glob
import json
import os
import threading
import warnings

import torch

from . import _meta

_PKG = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_state = {"loaded": False, "error": None, "how": None}

FORWARD = {"pam": "danet_ops::pam_forward", "cam": "danet_ops::cam_forward"}


class JitBuildWarning(UserWarning):
    """The C++ ops are being JIT-compiled (no prebuilt library): filter it with `warnings`."""


def _prebuilt():
    libs = sorted(glob.glob(os.path.join(_PKG, "_C*.so")) + glob.glob(os.path.join(_PKG, "_C*.pyd")))
    return libs[0] if libs else None


def _source_dir():
    for root in (os.path.join(_PKG, os.pardir, "csrc"), os.path.join(_PKG, "csrc")):
        if os.path.isfile(os.path.join(root, "register.cpp")):
            return os.path.normpath(root)
    return None


def _jit_build():
    from torch.utils import cpp_extension

    root = _source_dir()
    if root is None:
        raise RuntimeError("no prebuilt danet_ops._C and no C++ sources to JIT-compile")
    sources = sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "cpu", "*.cpp")))
    warnings.warn("danet_ops: no prebuilt danet_ops._C: compiling the C++ ops from "
                  f"{root} (once, about a minute; cached by torch.utils.cpp_extension). "
                  "`pip install --no-build-isolation .` builds them ahead of time.",
                  JitBuildWarning, stacklevel=3)
    flags = json.load(open(os.path.join(root, "build_flags.json")))  # setup.py's recipe
    cflags = list(flags["cxx"])
    define = "-D" + flags["cuda_define"]
    cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
            and os.environ.get("DANET_OPS_CUDA", "1") != "0")
    if cuda:
        sources += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")) + glob.glob(os.path.join(root, "cuda", "*.cpp")))
        cflags.append(define)
    cpp_extension.load(name="danet_ops_C", sources=sources, extra_cflags=cflags,
                       extra_cuda_cflags=flags["nvcc"] + [define],
                       extra_ldflags=flags["ldflags"], is_python_module=False, verbose=False)
    return f"JIT-compiled from {root}"


def load():
    """Load the compiled ops once; returns True when they are registered."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        try:
            lib = _prebuilt()
            if lib is not None:
                torch.ops.load_library(lib)
                how = f"prebuilt {os.path.basename(lib)}"
            elif os.environ.get("DANET_OPS_JIT", "1") != "0":
                how = _jit_build()
            else:
                raise RuntimeError("danet_ops._C was not built and DANET_OPS_JIT=0 forbids the JIT build")
            _meta.register_pam("danet_ops::pam_forward", "danet_ops::pam_backward")
            _meta.register_cam("danet_ops::cam_forward", "danet_ops::cam_backward")
            if _has_inference_ops():
                _meta.register_inference("danet_ops::pam_forward_inference",
                                         "danet_ops::cam_forward_inference")
                _state["inference"] = True
            _register_export()
            _state.update(loaded=True, how=how)
        except Exception as exc:  # kept and reported by the backend chooser
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["loaded"]


def _register_export():
    # ONNX lowering of the ops just registered (danet_ops/_export.py); optional, never fatal here.
    try:
        from . import _export
        _export.register()
    except Exception:
        pass


def has_kernel(op, device_type):
    """Whether the compiled `op` ("pam" | "cam") has a kernel for "cpu" / "cuda" tensors."""
    if not load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD[op], key)


def error():
    return _state["error"]


def prebuilt_present():
    return _prebuilt() is not None


def _has_inference_ops():
    # A library built before the inference forms existed (csrc/cpu) simply lacks them.
    return all(hasattr(torch.ops.danet_ops, f"{op}_forward_inference") for op in ("pam", "cam"))


def _inference(device, *tensors):
    """No gradient will be taken of this call (no_grad / inference_mode, or nothing requires
    grad) and the tensors are on CPU, whose kernels have an inference form of the op. Exports
    (torch.export, ONNX, jit.trace) keep the standard op, which has their lowerings."""
    if device.type != "cpu" or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    if not _state.get("inference"):
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def pam_forward(q, k, v, x, gamma, scale=1.0):
    """(o, lse, y) as the pam_forward op; under inference on CPU (no gradient will be taken) the
    inference form: nothing saved, no lse (None), O not kept beside y."""
    if _inference(q.device, q, k, v, x, gamma):
        out = torch.ops.danet_ops.pam_forward_inference(q, k, v, x, gamma, float(scale))
        return out, None, out
    return torch.ops.danet_ops.pam_forward(q, k, v, x, gamma, float(scale))


def cam_forward(x, gamma, mode):
    """(o, attn, y) as the cam_forward op; under inference on CPU the inference form (attn None)."""
    if _inference(x.device, x, gamma):
        out = torch.ops.danet_ops.cam_forward_inference(x, gamma, mode)
        return out, None, out
    return torch.ops.danet_ops.cam_forward(x, gamma, mode)
