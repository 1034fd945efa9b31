"""Fake kernels and autograd formulas shared by every backend's ops (no kernels, no Meta-key
implementations: torch.library fakes, which torch.compile, torch.export and opcheck trace).

Each fused backend defines the same four ops (pam_forward, pam_backward, cam_forward,
cam_backward; schemas in docs/ARCHITECTURE.md) under its own names. `register_pam` /
`register_cam` register, for one family of names, the fake kernels and the autograd formula
(forward op -> the explicit backward op, which itself refuses double backward);
`register_inference` the fakes of the CPU inference forms. The output shapes and dtypes follow
danet_ops._contract.
"""
import torch

from ._contract import output_dtype, stats_dtype


def _residual_dtype(o_dtype, x, gamma):
    return output_dtype(o_dtype, x.dtype, gamma.dtype)   # the contract's promote(v, x, gamma)


# ----------------------------------------------------------------------------- PAM
def pam_forward_fake(q, k, v, x, gamma, scale=1.0):
    # q [B, Cq, Nq], k [B, Cq, Nk], v [B, Cv, Nk]: outputs have the queries' Nq.
    B, _, N = q.shape
    Cv = v.shape[1]
    # Every fused kernel keeps O in the compute dtype (fp32 for bf16/fp16: the backward's Delta).
    o = v.new_empty((B, Cv, N), dtype=stats_dtype(v.dtype))
    lse = q.new_empty((B, N), dtype=stats_dtype(v.dtype))
    if x is None:
        y = v.new_empty((0,))
    else:
        y = v.new_empty((B, Cv, N), dtype=_residual_dtype(v.dtype, x, gamma))
    return o, lse, y


def pam_backward_fake(dy, q, k, v, o, lse, gamma, scale=1.0):
    ct = stats_dtype(v.dtype)
    dgamma = q.new_empty((1,) if gamma is not None else (0,), dtype=ct)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgamma)


def _pam_setup_context(ctx, inputs, output):
    q, k, v, x, gamma = inputs[:5]
    # (scale,) for the ops whose schema has it (the backward gets the same scale), else ().
    ctx.extra = tuple(inputs[5:])
    o, lse, y = output
    ctx.residual = x is not None
    ctx.x_dtype = x.dtype if x is not None else None
    ctx.save_for_backward(q, k, v, o, lse, gamma)


def _grad_of_gamma(dgamma, gamma):
    return dgamma.to(gamma.dtype).reshape(gamma.shape)


def _pam_autograd(backward_op):
    def backward(ctx, d_o, d_lse, d_y):
        q, k, v, o, lse, gamma = ctx.saved_tensors
        g = d_y if ctx.residual else d_o        # gradient of the result the caller used
        dq, dk, dv, dgamma = backward_op(g, q, k, v, o, lse, gamma if ctx.residual else None,
                                         *ctx.extra)
        dx = g.to(ctx.x_dtype) if ctx.residual else None
        dgam = _grad_of_gamma(dgamma, gamma) if ctx.residual else None
        return (dq, dk, dv, dx, dgam) + (None,) * len(ctx.extra)   # scale: no gradient
    return backward


# ----------------------------------------------------------------------------- CAM
def cam_forward_fake(x, gamma, mode):
    B, C, N = x.shape
    o = x.new_empty((B, C, N))
    attn = x.new_empty((B, C, C), dtype=stats_dtype(x.dtype))
    if gamma is None:
        y = x.new_empty((0,))
    else:
        y = x.new_empty((B, C, N), dtype=_residual_dtype(x.dtype, x, gamma))
    return o, attn, y


def cam_backward_fake(dy, x, attn, o, gamma, mode):
    dgamma = x.new_empty((1,) if gamma is not None else (0,), dtype=stats_dtype(x.dtype))
    return x.new_empty(x.shape), dgamma


def _cam_setup_context(ctx, inputs, output):
    x, gamma, mode = inputs
    o, attn, y = output
    ctx.mode = mode
    ctx.residual = gamma is not None
    ctx.save_for_backward(x, attn, o, gamma)


def _cam_autograd(backward_op):
    def backward(ctx, d_o, d_attn, d_y):
        x, attn, o, gamma = ctx.saved_tensors
        g = d_y if ctx.residual else d_o
        dx, dgamma = backward_op(g, x, attn, o, gamma if ctx.residual else None, ctx.mode)
        dgam = _grad_of_gamma(dgamma, gamma) if ctx.residual else None
        return dx, dgam, None
    return backward


# ----------------------------------------------------------------------------- registration
def _no_double_backward(ctx, *grads):
    raise RuntimeError("danet_ops: double backward (create_graph=True through the attention "
                       "backward) is not supported; use backend='reference' for it")


def _register_backward_op(backward_name):
    # The explicit backward ops are not differentiable: say so instead of silently giving zeros.
    torch.library.register_autograd(backward_name, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def _register(forward_name, backward_name, forward_fake, backward_fake, autograd, setup_context):
    torch.library.register_fake(forward_name)(forward_fake)
    torch.library.register_fake(backward_name)(backward_fake)
    torch.library.register_autograd(forward_name, autograd(_op(backward_name)),
                                    setup_context=setup_context)
    _register_backward_op(backward_name)


def register_pam(forward_name, backward_name):
    """Fake kernels + autograd for a (forward, backward) pair of PAM ops, e.g.
    ("danet_ops::pam_forward", "danet_ops::pam_backward")."""
    _register(forward_name, backward_name, pam_forward_fake, pam_backward_fake, _pam_autograd,
              _pam_setup_context)


def register_cam(forward_name, backward_name):
    _register(forward_name, backward_name, cam_forward_fake, cam_backward_fake, _cam_autograd,
              _cam_setup_context)


def pam_forward_inference_fake(q, k, v, x, gamma, scale=1.0):
    B, _, N = q.shape
    if x is None:
        return v.new_empty((B, v.shape[1], N))
    return v.new_empty((B, v.shape[1], N), dtype=_residual_dtype(v.dtype, x, gamma))


def cam_forward_inference_fake(x, gamma, mode):
    if gamma is None:
        return x.new_empty(x.shape)
    return x.new_empty(x.shape, dtype=_residual_dtype(x.dtype, x, gamma))


def register_inference(pam_name, cam_name):
    """Fake kernels of the inference forms of the compiled CPU ops (the result only, nothing
    saved; the callers use them only when no gradient will be taken)."""
    torch.library.register_fake(pam_name)(pam_forward_inference_fake)
    torch.library.register_fake(cam_name)(cam_forward_inference_fake)


def _op(qualname):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default
