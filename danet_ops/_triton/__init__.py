"""Backend "triton": Triton kernels for PAM and CAM, registered as danet_ops::*_triton ops.

Interface used by danet_ops.backends: `available() -> (bool, reason)`,
`interpreting()`, and the forward entry points `pam_forward(q, k, v, x, gamma, scale=1.0)` and
`cam_forward(x, gamma, mode)` with the schemas of docs/ARCHITECTURE.md (the backward ops run
through the ops' registered autograd).
Importing this package registers the ops (ops.py) without importing triton; triton is imported
by `available()` (once, cached) or by the first kernel launch (the op files pam.py, cam.py).
Layout and design notes: docs/triton.md.
"""
import os

import torch

from . import ops  # noqa: F401  (registers the custom ops, fake kernels and autograd)
from ._runtime import interpreting, load_triton

__all__ = ["available", "interpreting", "pam_forward", "cam_forward"]


def available():
    """(True, "") when Triton can run the ops in this process, else (False, why).

    The caller (danet_ops.backends) checks the device and dtype; this checks that triton
    imports, and that TRITON_INTERPRET=1 (needed for CPU tensors) was already set when triton
    was imported: the interpreter is chosen once per process at that moment.
    """
    triton, why = load_triton()
    if triton is None:
        return False, why
    if os.environ.get("TRITON_INTERPRET") == "1" and not interpreting():
        return False, ("TRITON_INTERPRET=1 was set after triton had been imported in this "
                       "process; set it before anything imports triton")
    return True, ""


def pam_forward(q, k, v, x, gamma, scale=1.0):
    return torch.ops.danet_ops.pam_forward_triton(q, k, v, x, gamma, float(scale))


def cam_forward(x, gamma, mode):
    return torch.ops.danet_ops.cam_forward_triton(x, gamma, mode)
