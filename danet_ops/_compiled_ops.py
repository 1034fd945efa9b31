"""Backends "cpu" and "cuda": the C++/CUDA ops of danet_ops._C (csrc/), on the Python side.

Both backends call the same torch.ops.danet_ops ops; the dispatcher picks the CPU or the CUDA
kernel by the tensors' device. This module registers the ops' fake kernels and autograd once the
library is loaded (danet_ops._extension loads or builds it), answers which kernels exist, and
holds each backend's entry points:

    pam_forward(q, k, v, x, gamma, scale) -> (o, lse, y)      q, k, v, x: [B, C, N]
    cam_forward(x, gamma, mode) -> (o, attn, y)

The CPU entry points run the ops' inference forms (pam_forward_inference /
cam_forward_inference: the result only, nothing saved for a backward; lse / attn come back as
None and o is y) when no gradient will be taken of the call.
"""
import threading

import torch

from . import _extension, _fake_and_autograd

# Entry point -> op (schemas: csrc/register.cpp, docs/ARCHITECTURE.md).
OPS = {"pam_forward": "danet_ops::pam_forward", "pam_backward": "danet_ops::pam_backward",
       "cam_forward": "danet_ops::cam_forward", "cam_backward": "danet_ops::cam_backward"}
INFERENCE_OPS = {"pam_forward_inference": "danet_ops::pam_forward_inference",
                 "cam_forward_inference": "danet_ops::cam_forward_inference"}
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_lock = threading.Lock()
_registered = {}
_has_kernel = {}    # (op, device type) -> bool, asked of the dispatcher once the library is loaded


def load(build=True):
    """Load the library (build=True: JIT-compile it when there is no prebuilt one) and register
    the fakes and autograd of its ops, once. True when the ops are ready."""
    if not _extension.load(build):
        return False
    with _lock:
        if not _registered:
            _fake_and_autograd.register_pam(OPS["pam_forward"], OPS["pam_backward"])
            _fake_and_autograd.register_cam(OPS["cam_forward"], OPS["cam_backward"])
            inference = _has_inference_ops()
            if inference:
                _fake_and_autograd.register_inference(INFERENCE_OPS["pam_forward_inference"],
                                                      INFERENCE_OPS["cam_forward_inference"])
            _registered["inference"] = inference
    return True


def ready():
    """Whether the library is loaded and its ops registered."""
    return bool(_registered)


def _has_inference_ops():
    # A library built before the inference forms existed simply lacks them.
    return all(hasattr(torch.ops.danet_ops, name.split("::")[1]) for name in INFERENCE_OPS.values())


def unavailable(op, device_type):
    """"" when the compiled `op` ("pam" | "cam") can run on "cpu" / "cuda" tensors, else why
    not. A prebuilt library is loaded (a dlopen); a missing one is not built: the answer is ""
    when the JIT build will give this kernel on first use."""
    what = "the CUDA kernels" if device_type == "cuda" else "the C++ ops"
    if not _registered:
        load(build=False)
    if not _extension.loaded():
        why = _extension.unavailable()
        if why:
            return f"{what} are not available ({why})"
        if device_type == "cuda" and not _extension.jit_builds_cuda():
            return (f"{what} are not available (no prebuilt danet_ops._C, and a JIT build here "
                    "would have no CUDA kernels: it needs a CUDA build of torch and nvcc)")
        return ""
    key = (op, device_type)
    if key not in _has_kernel:
        _has_kernel[key] = torch._C._dispatch_has_kernel_for_dispatch_key(
            OPS[f"{op}_forward"], _DISPATCH_KEY[device_type])
    if _has_kernel[key]:
        return ""
    if device_type == "cuda":
        return f"{what} are not available (danet_ops._C was built without CUDA kernels)"
    return f"{what} are not available (no CPU kernel)"


def describe(op, device_type, dtype):
    """What runs (how the library came; on CPU the kernel path and the ISA), without building."""
    if not _extension.loaded():
        return _extension.status()
    parts = [_extension.how()]
    if device_type == "cpu":
        ops = torch.ops.danet_ops
        if hasattr(ops, "cpu_path"):
            parts.append(f"path: {ops.cpu_path(op, dtype)}")
        if hasattr(ops, "cpu_isa"):
            parts.append(f"ISA: {ops.cpu_isa()}")
    return "; ".join(parts)


def _no_grad_will_be_taken(*tensors):
    """No gradient will be taken of this call (no_grad / inference_mode, or nothing requires
    grad) and it is not being exported: exports (torch.export, ONNX, jit.trace) keep the
    standard op, which has their lowerings."""
    if not _registered.get("inference") or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def cpu_pam_forward(q, k, v, x, gamma, scale=1.0):
    """(o, lse, y) of the pam_forward op; when no gradient will be taken, its inference form:
    nothing saved, lse None, o is y."""
    if _no_grad_will_be_taken(q, k, v, x, gamma):
        out = torch.ops.danet_ops.pam_forward_inference(q, k, v, x, gamma, float(scale))
        return out, None, out
    return torch.ops.danet_ops.pam_forward(q, k, v, x, gamma, float(scale))


def cpu_cam_forward(x, gamma, mode):
    """(o, attn, y) of the cam_forward op; when no gradient will be taken, its inference form
    (attn None, o is y)."""
    if _no_grad_will_be_taken(x, gamma):
        out = torch.ops.danet_ops.cam_forward_inference(x, gamma, mode)
        return out, None, out
    return torch.ops.danet_ops.cam_forward(x, gamma, mode)


def cuda_pam_forward(q, k, v, x, gamma, scale=1.0):
    return torch.ops.danet_ops.pam_forward(q, k, v, x, gamma, float(scale))


def cuda_cam_forward(x, gamma, mode):
    return torch.ops.danet_ops.cam_forward(x, gamma, mode)
