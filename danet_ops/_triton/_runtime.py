"""What backend "triton" needs from the host without importing triton: the Triton import and its
mode, the input checks, the numerics policy (dot precision, bf16 upcast under the interpreter),
launch helpers (strides, device context, autotune buckets) and device facts.

Nothing here imports triton at module import; `load_triton()` does it once and caches. The
package's __init__ and ops.py (imported by `import danet_ops`) use only this module; the op
files (pam.py, cam.py, rowdot.py) and the launch configs (_autotune.py) import triton.

Interpreter or compiled is a property of the process, not of a call: triton's own `tl.*`
helpers (tl.zeros, tl.sum, ...) are built as interpreted or compiled functions when triton is
first imported, according to TRITON_INTERPRET at that moment. `interpreting()` reports it.
"""
import functools
import os
import sys

import torch

MIN_TRITON = (3, 0)          # tl.dot(input_precision=...), used by every kernel
_state = {}


def load_triton():
    """(triton module or None, reason). Imports triton once (cached, also when it fails)."""
    if "result" not in _state:
        try:
            import triton
            import triton.language  # noqa: F401

            version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
            if version < MIN_TRITON:
                _state["result"] = (None, f"triton {triton.__version__} is too old; "
                                          f"need >= {'.'.join(map(str, MIN_TRITON))}")
            else:
                _state["result"] = (triton, "")
        except Exception as exc:  # not installed, or broken
            _state["result"] = (None, f"Triton could not be imported ({type(exc).__name__}: {exc})")
    return _state["result"]


def require_triton():
    """Raise (before any kernel module is imported) when triton cannot be imported here."""
    triton, why = load_triton()
    if triton is None:
        raise RuntimeError(f"danet_ops triton ops need Triton: {why}")


def interpreting():
    """Whether Triton kernels run in the interpreter in this process.

    Before triton is imported this is what TRITON_INTERPRET says now; afterwards it is what it
    said at import time (read from the type of one of triton's own jit helpers).
    """
    triton = sys.modules.get("triton")
    lang = getattr(triton, "language", None) if triton is not None else None
    if lang is None:
        return os.environ.get("TRITON_INTERPRET") == "1"
    helper = getattr(getattr(lang, "standard", None), "cdiv", None)
    return type(helper).__name__ == "InterpretedFunction"


def check_device(t):
    """Raise (before any kernel) when this process's Triton cannot run kernels on t's device."""
    if t.device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                "danet_ops triton ops on CPU tensors need the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported in this process (it was "
                "imported without it), or use CUDA tensors")
    elif t.device.type != "cuda":
        raise RuntimeError(f"danet_ops triton ops run on CUDA tensors (or CPU tensors under "
                           f"TRITON_INTERPRET=1); got a tensor on {t.device}")


def check_dtypes(names_tensors):
    for name, t in names_tensors:
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"danet_ops triton ops support float32, float16 and bfloat16; "
                             f"{name} is {t.dtype} (use backend 'cpu' or 'reference' for float64)")


# ----------------------------------------------------------------------------- numerics
def dot_precision(dtype):
    """tl.dot input_precision for operands of `dtype`: fp32 uses TF32 only where PyTorch's own
    matmul would (torch.backends.cuda.matmul.allow_tf32, or a float32 matmul precision other
    than "highest"), else exact IEEE fp32. Ignored for fp16/bf16 operands."""
    if dtype != torch.float32:
        return "tf32"
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def f32_dot(dtype):
    """Upcast dot operands to fp32: the interpreter's tl.dot is wrong on bf16 (triton 3.9)."""
    return dtype == torch.bfloat16 and interpreting()


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def n_key(n):
    """Autotune bucket for a length: its next power of two (avoids re-tuning for every N)."""
    return next_pow2(max(int(n), 1))


# ----------------------------------------------------------------------------- host helpers
def strides(t):
    return tuple(t.stride())


def on_device(t):
    """Context for launches on t's CUDA device (Triton launches on the current device and
    stream); a no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device_of(t)


# ----------------------------------------------------------------------------- device facts
@functools.lru_cache(maxsize=None)
def _props(index):
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or 99 * 1024
    return (p.major, p.minor), p.multi_processor_count, smem


def device_props(device):
    """(capability, SM count, max shared memory per block) of a CUDA device, queried on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _props(index)


def sm_count(device):
    return device_props(device)[1]
