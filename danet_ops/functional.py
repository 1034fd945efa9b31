"""position_attention / channel_attention: validate, choose a backend (danet_ops.backends),
call its op entry point."""
from . import _validate, backends, onnx, reference


def position_attention(q, k, v, x=None, gamma=None, scale=1.0, backend="auto"):
    """Position attention (DANet's PAM), and the general single-head spatial attention.

    q: [B, Cq, Hq, Wq] or [B, Cq, Nq]; k: [B, Cq, Hk, Wk] or [B, Cq, Nk]; v: [B, Cv, Hk, Wk] or
    [B, Cv, Nk] (keys and values may have their own positions: pooled, sub-sampled, regions).
    E = scale * qᵀk [B, Nq, Nk] (DANet: scale = 1, no 1/sqrt(d)); A = softmax over the keys;
    O = v Aᵀ -> [B, Cv, *q's spatial shape]. Returns gamma * O + x when x (the output's shape)
    and gamma are given, else O. Memory O((Nq + Nk) * C) on the fused backends.
    """
    scale = _validate.check_scale(scale)
    B, _, Cv, Nq, Nk = _validate.check_pam(q, k, v, x, gamma)
    gamma = _validate.as_gamma(gamma, v)
    if onnx.exporting():  # torch.onnx.export is tracing: ONNX ops, whatever the backend
        return onnx.position_attention(q, k, v, x, gamma, scale)
    name = backends.resolve(backend, "pam", q.device, q.dtype)
    if name == "reference" or B == 0 or Nq == 0 or Nk == 0:
        return reference.position_attention(q, k, v, x, gamma, scale)
    # [B, C, H, W] -> [B, C, N]: a view for contiguous and channels_last layouts.
    o, _, y = backends.get(name).pam_forward(
        q.flatten(2), k.flatten(2), v.flatten(2), None if x is None else x.flatten(2), gamma, scale)
    # The fused ops keep O in the compute dtype (fp32 for fp16/bf16: the backward's Delta reads
    # it unrounded); the caller gets v's dtype, as from the reference.
    return (o.to(v.dtype) if x is None else y).view(B, Cv, *q.shape[2:])


def channel_attention(x, gamma=None, mode="original", backend="auto"):
    """DANet channel attention. x: [B, C, H, W] (or [B, C, N]); E = a aᵀ over N.

    mode "original" (released code, mmseg, PaddleSeg): A = softmax(rowmax(E) - E);
    mode "paper" (the paper's Eq. 3): A = softmax(E). O = A a.
    Returns gamma * O + x when gamma is given, else O.
    """
    B, _, N = _validate.check_cam(x, gamma, mode)
    gamma = _validate.as_gamma(gamma, x)
    if onnx.exporting():
        return onnx.channel_attention(x, gamma, mode)
    name = backends.resolve(backend, "cam", x.device, x.dtype)
    _validate.check_backend_limits(name, "cam", x.shape)
    if name == "reference" or B == 0 or N == 0:
        return reference.channel_attention(x, gamma, mode)
    o, _, y = backends.get(name).cam_forward(x.flatten(2), gamma, mode)
    return (o if gamma is None else y).view(x.shape)
