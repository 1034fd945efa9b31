"""Attention maps without N x N memory: chosen rows of PAM's A, and CAM's C x C matrix.

The fused kernels never hold A; these functions rebuild exactly what they would use, for the
rows asked for, in fp32 (fp64 for fp64 inputs), with the reference's formulas:

    attention_map:          A[b, index, :] = softmax_j(scale * q[b, :, index]ᵀ k[b, :, j])
    channel_attention_map:  E = a aᵀ (fp32 accumulation), A = softmax(rowmax(E) - E) ("original")
                            or softmax(E) ("paper")
"""
import torch

from . import _validate
from ._contract import stats_dtype


def attention_map(q, k, index, scale=1.0):
    """Rows of PAM's attention for the flat query positions `index`.

    q: [B, Cq, Hq, Wq] or [B, Cq, Nq]; k: [B, Cq, Hk, Wk] or [B, Cq, Nk]; index: ints in
    [0, Nq) (a list, a range or a 1-D integer tensor; position (h, w) is h * Wq + w).
    Returns [B, len(index), Nk] in fp32 (fp64 for fp64 inputs), each row summing to 1; reshape
    a row to k's (Hk, Wk) for a heat map. Memory O(len(index) * Nk), never Nq x Nk.
    """
    scale = _validate.check_scale(scale)
    _validate.check_pam(q, k, k, None, None)
    Nq = q.flatten(2).shape[2]
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.dtype in (torch.bool,) or index.is_floating_point():
        raise ValueError(f"index must be a 1-D sequence of integer positions; got "
                         f"{tuple(index.shape)} {index.dtype}")
    index = index.long()
    if index.numel() and (index.min() < 0 or index.max() >= Nq):  # checked where index lives
        raise ValueError(f"index must lie in [0, Nq = {Nq}); got min {index.min().item()}, "
                         f"max {index.max().item()}")
    index = index.to(q.device)
    ct = stats_dtype(q.dtype)
    qs = q.flatten(2).index_select(2, index).to(ct)            # [B, Cq, L]
    energy = torch.bmm(qs.transpose(1, 2), k.flatten(2).to(ct))  # [B, L, Nk]
    if scale != 1.0:
        energy = energy * scale
    return torch.softmax(energy, dim=-1)


def channel_attention_map(x, mode="original"):
    """CAM's attention matrix A: [B, C, C] in fp32 (fp64 for fp64 inputs) for x [B, C, H, W]
    or [B, C, N]. Rows sum to 1; the Gram product is accumulated in fp32, so fp16 inputs whose
    E exceeds 65504 stay finite."""
    _validate.check_cam(x, None, mode)
    a = x.flatten(2).to(stats_dtype(x.dtype))
    energy = torch.bmm(a, a.transpose(1, 2))
    if mode == "original":
        energy = energy.amax(-1, keepdim=True) - energy
    return torch.softmax(energy, dim=-1)
