"""convert_attention(model): swap known naive attention modules for the fused op, in place.

Recognised by class name and structure (no mmseg / released-code import needed):

| class (name)                                | computes                                          | becomes                      |
|---------------------------------------------|---------------------------------------------------|------------------------------|
| released DANet `PAM_Module`                 | gamma * PAM(x) + x, convs query/key/value_conv    | `PositionAttention`          |
| released DANet `CAM_Module`                 | gamma * CAM_original(x) + x                       | `ChannelAttention("original")` |
| mmseg `PAM` (da_head.py)                    | gamma.scale * SelfAttentionBlock(x, x) + x        | `FusedSelfAttention` (+ gamma) |
| mmseg `CAM` (da_head.py)                    | gamma.scale * CAM_original(x) + x                 | `FusedMMSegCAM`              |
| mmseg `SelfAttentionBlock` (forward not     | out_project(softmax(s * q^T k) v), optional       | `FusedSelfAttention`         |
| overridden: ANN's blocks, ...)              | key/value downsampling, s = channels^-0.5 or 1    |                              |
| mmseg `ObjectAttentionBlock` (OCR)          | bottleneck(cat(SelfAttentionBlock(q, k), q))      | `FusedSelfAttention` (OCR)   |

Each replacement keeps the original submodules and parameters under the same names, so the
state-dict keys (and saving / loading) are unchanged and the outputs and gradients are the
same. A module whose class name matches but whose structure does not is left alone and named
in a warning.
"""
import warnings

import torch
from torch import nn

from . import _contract
from .functional import channel_attention, position_attention
from .modules import ChannelAttention, PositionAttention

_SAB_ATTRS = ("key_project", "query_project", "value_project", "out_project",
              "query_downsample", "key_downsample", "matmul_norm", "channels")


def _class_names(m):
    return [c.__name__ for c in type(m).__mro__]


def _forward_owner(m):
    """Name of the class in m's MRO that defines the forward that runs."""
    for c in type(m).__mro__:
        if "forward" in c.__dict__:
            return c.__name__
    return None


def _adopt(new, old):
    """Give `new` the children, parameters and buffers of `old` under the same names."""
    for name, child in old.named_children():
        setattr(new, name, child)
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        new.register_buffer(name, b, persistent=name not in old._non_persistent_buffers_set)
    new.train(old.training)
    return new


class FusedSelfAttention(nn.Module):
    """mmseg's SelfAttentionBlock computed by the fused op (same children, same keys).

    residual: "pam" for da_head's PAM (gamma.scale * out + x); "ocr" for ObjectAttentionBlock
    (bottleneck(cat([out, query_feats]))); None for the plain block.
    """

    def __init__(self, old, residual=None, backend="auto"):
        super().__init__()
        self.scale = float(old.channels) ** -0.5 if old.matmul_norm else 1.0
        self.residual = residual
        self.backend = backend
        self.source = type(old).__name__
        _adopt(self, old)
        for a in ("query_downsample", "key_downsample", "out_project"):  # may be plain None
            if a not in self._modules:
                setattr(self, a, getattr(old, a))

    def _attend(self, query_feats, key_feats, x=None, gamma=None):
        q = self.query_project(query_feats)
        k = self.key_project(key_feats)
        v = self.value_project(key_feats)
        if self.key_downsample is not None:     # pooled keys and values: their own Nk
            k, v = self.key_downsample(k), self.key_downsample(v)
        out = position_attention(q, k, v, x, gamma, scale=self.scale, backend=self.backend)
        out = out.reshape(out.shape[0], -1, *query_feats.shape[2:])
        if self.out_project is not None:
            out = self.out_project(out)
        return out

    def forward(self, query_feats, key_feats=None):
        if self.residual == "pam":              # da_head.PAM.forward(x): gamma * out + x, fused
            return self._attend(query_feats, query_feats, query_feats, self.gamma.scale)
        out = self._attend(query_feats, key_feats)
        if self.residual == "ocr":              # ObjectAttentionBlock.forward
            out = self.bottleneck(torch.cat([out, query_feats], dim=1))
        return out

    def extra_repr(self):
        return f"from={self.source}, scale={self.scale:g}, backend={self.backend!r}"


class FusedMMSegCAM(nn.Module):
    """mmseg's da_head.CAM (gamma is an mmcv Scale: key gamma.scale, 0-dim) by the fused op."""

    def __init__(self, old, backend="auto"):
        super().__init__()
        self.backend = backend
        _adopt(self, old)

    def forward(self, x):
        return channel_attention(x, self.gamma.scale, mode="original", backend=self.backend)


def _is_1x1_conv(m):
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) \
        and m.groups == 1 and m.dilation == (1, 1) and m.padding in ((0, 0), "valid")


def _gamma_param(m):
    g = getattr(m, "gamma", None)
    return isinstance(g, nn.Parameter) and g.numel() == 1


def _scale_module(m):
    g = getattr(m, "gamma", None)
    s = getattr(g, "scale", None)
    return isinstance(g, nn.Module) and isinstance(s, nn.Parameter) and s.numel() == 1 \
        and len(list(g.parameters())) == 1


def _is_sab(m):
    return all(hasattr(m, a) for a in _SAB_ATTRS) and "SelfAttentionBlock" in _class_names(m)


def _convert_one(m, backend):
    """The fused replacement of m, None when m is not a candidate, or a string saying why a
    look-alike is left alone."""
    names = _class_names(m)
    cls = names[0]
    if cls == "PAM_Module":
        convs = [getattr(m, a, None) for a in ("query_conv", "key_conv", "value_conv")]
        if not (all(_is_1x1_conv(c) for c in convs) and _gamma_param(m)
                and convs[0].out_channels == convs[1].out_channels
                and convs[0].in_channels == convs[2].in_channels == convs[2].out_channels
                and _contract.CQ_MIN <= convs[0].out_channels <= _contract.CQ_MAX
                and convs[2].out_channels <= _contract.CV_MAX and _forward_owner(m) == cls):
            return ("PAM_Module without the released structure (1x1 query/key/value_conv, gamma [1]) "
                    "or outside the Cq/Cv limits")
        new = PositionAttention(convs[0].in_channels, reduction=convs[0].in_channels,
                                backend=backend)
        new.query_conv, new.key_conv, new.value_conv, new.gamma = (*convs, m.gamma)
        new.train(m.training)
        return new
    if cls == "CAM_Module":
        if not (_gamma_param(m) and _forward_owner(m) == cls
                and not any(True for _ in m.parameters() if _ is not m.gamma)):
            return "CAM_Module without the released structure (only a gamma [1] parameter)"
        new = ChannelAttention(mode="original", backend=backend,
                               in_channels=getattr(m, "chanel_in", None))
        new.gamma = m.gamma
        new.train(m.training)
        return new
    if cls == "CAM" and _scale_module(m) and not any(True for _ in m.children() if _ is not m.gamma):
        return FusedMMSegCAM(m, backend)
    if _is_sab(m):
        if m.query_downsample is not None:
            return f"{cls}: query downsampling changes the output's positions (not converted)"
        owner = _forward_owner(m)
        if cls == "PAM" and owner == "PAM" and _scale_module(m) and m.out_project is None:
            return FusedSelfAttention(m, residual="pam", backend=backend)
        if cls == "ObjectAttentionBlock" and owner == cls and hasattr(m, "bottleneck"):
            return FusedSelfAttention(m, residual="ocr", backend=backend)
        if owner == "SelfAttentionBlock":
            return FusedSelfAttention(m, backend=backend)
        return f"{cls}: a SelfAttentionBlock with its own forward ({owner}) is not known"
    if cls in ("PAM", "CAM"):
        return f"{cls} without mmseg's da_head structure"
    return None


def convert_attention(model, backend="auto"):
    """Replace, in place, every recognised naive attention module in `model` by one that computes
    the same through the fused ops (table in this module's docstring). Returns the names of the
    replaced submodules ("" for the model itself is not replaceable: wrap it instead).

    State-dict keys stay the same, so checkpoints saved before or after load into either.
    Look-alikes (a known class name with another structure) are left alone and named in one
    warning.
    """
    replaced, skipped = [], []
    todo = [(name, m) for name, m in model.named_modules() if name]
    done = set()
    for name, m in todo:
        if any(name.startswith(d + ".") for d in done):
            continue                          # inside a module already replaced
        new = _convert_one(m, backend)
        if new is None:
            continue
        if isinstance(new, str):
            skipped.append(f"{name} ({new})")
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        replaced.append(name)
        done.add(name)
    if skipped:
        warnings.warn("danet_ops.convert_attention left these look-alikes alone: "
                      + "; ".join(skipped), stacklevel=2)
    return replaced
