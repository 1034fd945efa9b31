"""Which backend runs a call: availability, "auto", and the DANET_OPS_BACKEND override.

"auto" picks, for the tensor's device (SPEC §3), the first available backend of an order:
  CPU tensors  -> "cpu" (fused C++), else "reference"
      (measured: benchmarks/results/, README "Results": the fused C++ ops beat the reference)
  CUDA tensors -> "triton", else "cuda", else "reference"
      (PROVISIONAL, not measured: no GPU has run these kernels yet. Triton comes first because
      it autotunes per GPU; the order is to be set from the numbers of scripts/gpu_check.sh,
      docs/benchmarks.md. DANET_OPS_BACKEND or an explicit backend= overrides it.)
"""
import os

import torch

from . import _compiled

BACKENDS = ("reference", "cpu", "cuda", "triton")
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
_FIX = {
    "cpu": "build the C++ extension: `pip install --no-build-isolation .` in the source tree "
           "(needs a C++ compiler), or leave DANET_OPS_JIT unset so it is JIT-compiled on first use",
    "cuda": "install with a CUDA build of torch and nvcc present "
            "(`DANET_OPS_CUDA=1 pip install --no-build-isolation .`)",
    "triton": "install triton (`pip install triton`) and use CUDA tensors, "
              "or CPU tensors with TRITON_INTERPRET=1 (slow; for tests)",
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why and what to do."""


def _triton_available():
    try:
        from . import _triton
    except Exception as exc:  # triton missing or broken
        return False, f"Triton could not be imported ({type(exc).__name__}: {exc})"
    return _triton.available()


def check(backend, op, device, dtype):
    """(ok, reason) for running `op` ("pam" | "cam") with `backend` on `device` / `dtype`."""
    dev = device.type
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if dev != "cpu":
            return False, f"backend 'cpu' runs on CPU tensors; these are on {device}"
        if not _compiled.has_kernel(op, "cpu"):
            return False, f"the C++ ops are not available ({_compiled.error() or 'no CPU kernel'})"
        return True, ""
    if backend == "cuda":
        if dev != "cuda":
            return False, f"backend 'cuda' runs on CUDA tensors; these are on {device}"
        if dtype == torch.float64:
            return False, "backend 'cuda' supports float32, float16 and bfloat16, not float64"
        if not _compiled.has_kernel(op, "cuda"):
            why = _compiled.error() or "danet_ops._C was built without CUDA kernels"
            return False, f"the CUDA kernels are not available ({why})"
        return True, ""
    if backend == "triton":
        if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        if dev not in ("cpu", "cuda"):
            return False, f"backend 'triton' runs on CUDA tensors; these are on {device}"
        if dtype == torch.float64:
            return False, "backend 'triton' supports float32, float16 and bfloat16, not float64"
        return _triton_available()
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")


@torch.compiler.assume_constant_result
def resolve(backend, op, device, dtype):
    """The backend name that runs this call, or BackendUnavailableError.

    Under torch.compile this runs once at trace time and its answer is baked into the graph
    (it inspects the dispatcher and the environment, which Dynamo cannot trace).
    """
    if backend == "auto":
        backend = os.environ.get("DANET_OPS_BACKEND", "auto") or "auto"
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if check(name, op, device, dtype)[0]:
                return name
        return "reference"
    ok, why = check(backend, op, device, dtype)
    if not ok:
        fix = _FIX.get(backend, "check the device and dtype")
        raise BackendUnavailableError(
            f"danet_ops backend {backend!r} cannot run {op} here: {why}. "
            f"To fix: {fix}; or pass backend='auto'.")
    return backend


def available_backends(device="cpu", dtype=torch.float32, op="pam"):
    """Backends that can run `op` for tensors on `device` / `dtype`, with the reason for the others."""
    device = torch.device(device)
    return {name: check(name, op, device, dtype) for name in BACKENDS}
