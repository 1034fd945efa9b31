"""The four ops of backend "triton", danet_ops::*_triton (schemas: docs/ARCHITECTURE.md).

Registration: torch.library.custom_op whose implementation launches the Triton kernels, with
the shared fake kernels and autograd formula of danet_ops._fake_and_autograd. torch.compile
treats the op as opaque (it traces the fake kernel and calls the op at run time), which works
the same in compiled mode on a GPU and under TRITON_INTERPRET=1 on CPU. triton_op +
wrap_triton would let Inductor see the kernels, but under the interpreter torch.compile then
traces the kernel with fake tensors and fails, and it would buy nothing here: each op is
already one fused launch sequence with no neighbouring elementwise work to fuse.

Importing this module registers the ops but does not import triton: the implementations import
the op files pam.py / cam.py (and triton) on their first call.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _fake_and_autograd
from ._runtime import require_triton

PAM_FORWARD = "danet_ops::pam_forward_triton"
PAM_BACKWARD = "danet_ops::pam_backward_triton"
CAM_FORWARD = "danet_ops::cam_forward_triton"
CAM_BACKWARD = "danet_ops::cam_backward_triton"


def _pam():
    """The op file pam.py (imported on the first call: it imports triton)."""
    require_triton()
    from . import pam
    return pam


def _cam():
    require_triton()
    from . import cam
    return cam


@torch.library.custom_op(PAM_FORWARD, mutates_args=())
def pam_forward_triton(q: Tensor, k: Tensor, v: Tensor, x: Optional[Tensor],
                       gamma: Optional[Tensor], scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, Cq, Nq], k [B, Cq, Nk], v [B, Cv, Nk]; E = scale * q^T k.
    -> (o [B, Cv, Nq] (fp32 for fp16/bf16 v), lse [B, Nq] fp32, y = gamma*o + x or shape [0])."""
    return _pam().forward(q, k, v, x, gamma, scale)


@torch.library.custom_op(PAM_BACKWARD, mutates_args=())
def pam_backward_triton(dy: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        gamma: Optional[Tensor], scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq [B, Cq, Nq], dk [B, Cq, Nk], dv [B, Cv, Nk], dgamma [1] fp32 or [0])."""
    return _pam().backward(dy, q, k, v, o, lse, gamma, scale)


@torch.library.custom_op(CAM_FORWARD, mutates_args=())
def cam_forward_triton(x: Tensor, gamma: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (o [B, C, N], attn [B, C, C] fp32, y = gamma*o + x or shape [0])."""
    return _cam().forward(x, gamma, mode)


@torch.library.custom_op(CAM_BACKWARD, mutates_args=())
def cam_backward_triton(dy: Tensor, x: Tensor, attn: Tensor, o: Tensor, gamma: Optional[Tensor],
                        mode: str) -> tuple[Tensor, Tensor]:
    """-> (dx, the full gradient of x, dgamma [1] fp32 or [0])."""
    return _cam().backward(dy, x, attn, o, gamma, mode)


_fake_and_autograd.register_pam(PAM_FORWARD, PAM_BACKWARD)
_fake_and_autograd.register_cam(CAM_FORWARD, CAM_BACKWARD)
