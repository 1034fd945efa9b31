"""nn.Modules with the released DANet parameter names (PAM_Module / CAM_Module checkpoints load
with strict=True)."""
import torch
import torch.nn.functional as F
from torch import nn

from . import _contract, _validate
from .functional import channel_attention, position_attention


class PositionAttention(nn.Module):
    """Position attention module (PAM). Parameters: query_conv, key_conv, value_conv, gamma.

    scale: E = scale * qᵀk (DANet: 1.0; Non-local / ANN / OCR style: (C // reduction) ** -0.5).
    kv_pool: keys and values are max-pooled by kv_pool x kv_pool after their convolutions, as
    SAGAN's official code (2) and Non-local sub-sampling do: Nk = floor(H/p) * floor(W/p). The
    parameters (and so released checkpoints) are the same for every scale and kv_pool.
    """

    def __init__(self, in_channels, reduction=8, backend="auto", scale=1.0, kv_pool=1):
        super().__init__()
        if in_channels // reduction < 1:
            raise ValueError(f"in_channels // reduction must be >= 1; got in_channels="
                             f"{in_channels}, reduction={reduction}")
        if isinstance(kv_pool, bool) or not isinstance(kv_pool, int) or kv_pool < 1:
            raise ValueError(f"kv_pool must be an int >= 1; got {kv_pool!r}")
        self.chanel_in = in_channels  # the released attribute name (not a parameter)
        self.backend = backend
        self.scale = _validate.check_scale(scale)
        self.kv_pool = kv_pool
        self.query_conv = nn.Conv2d(in_channels, in_channels // reduction, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // reduction, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        """x: [B, C, H, W] -> gamma * PAM(x) + x."""
        k, v = self.key_conv(x), self.value_conv(x)
        if self.kv_pool > 1:
            if min(x.shape[-2:]) < self.kv_pool:
                raise ValueError(f"kv_pool={self.kv_pool} needs H, W >= {self.kv_pool}; got x "
                                 f"{tuple(x.shape)}")
            k, v = F.max_pool2d(k, self.kv_pool), F.max_pool2d(v, self.kv_pool)
        return position_attention(self.query_conv(x), k, v, x, self.gamma, scale=self.scale,
                                  backend=self.backend)

    def extra_repr(self):
        extra = "" if self.scale == 1.0 else f", scale={self.scale:g}"
        extra += "" if self.kv_pool == 1 else f", kv_pool={self.kv_pool}"
        return f"in_channels={self.chanel_in}, backend={self.backend!r}{extra}"


class ChannelAttention(nn.Module):
    """Channel attention module (CAM). Parameter: gamma. mode: "original" | "paper"."""

    def __init__(self, mode="original", backend="auto", in_channels=None):
        super().__init__()
        if mode not in _contract.CAM_MODES:
            raise ValueError(f"mode must be one of {_contract.CAM_MODES}; got {mode!r}")
        self.mode = mode
        self.backend = backend
        self.chanel_in = in_channels  # optional, informative only (released attribute name)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        """x: [B, C, H, W] -> gamma * CAM(x) + x."""
        return channel_attention(x, self.gamma, mode=self.mode, backend=self.backend)

    def extra_repr(self):
        return f"mode={self.mode!r}, backend={self.backend!r}"
