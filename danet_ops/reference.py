"""Backend "reference": the released DANet code's naive computation (oracle and baseline).

It materialises the N x N (PAM) and C x C (CAM) attention matrices with torch.bmm exactly as
the released PAM_Module / CAM_Module do, so its autograd graph is PyTorch's own.
"""
import torch


def position_attention(q, k, v, x=None, gamma=None, scale=1.0):
    """q: [B, Cq, *Sq]; k: [B, Cq, *Sk]; v: [B, Cv, *Sk] (S = (H, W) or (N,)).

    E = scale * q^T k [B, Nq, Nk], softmax over the Nk keys, O = v A^T [B, Cv, *Sq];
    returns gamma*O + x or O. scale = 1 and Sk = Sq is the released PAM_Module exactly.
    """
    B, Cv = q.shape[0], v.shape[1]
    proj_query = q.flatten(2).permute(0, 2, 1)            # [B, Nq, Cq]
    proj_key = k.flatten(2)                                # [B, Cq, Nk]
    energy = torch.bmm(proj_query, proj_key)                       # [B, Nq, Nk]
    if scale != 1.0:
        energy = energy * scale
    attention = torch.softmax(energy, dim=-1)
    proj_value = v.flatten(2)                              # [B, Cv, Nk]
    out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(B, Cv, *q.shape[2:])
    if gamma is None:
        return out
    return gamma * out + x


def channel_attention(x, gamma=None, mode="original"):
    """x: [B, C, *S]; mode "original": softmax(rowmax(E) - E), "paper": softmax(E)."""
    proj_query = x.flatten(2)                               # [B, C, N]
    proj_key = proj_query.permute(0, 2, 1)                         # [B, N, C]
    energy = torch.bmm(proj_query, proj_key)                       # [B, C, C]
    if mode == "original":
        energy = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy, dim=-1)
    out = torch.bmm(attention, proj_query).view(x.shape)
    if gamma is None:
        return out
    return gamma * out + x
