"""nn.Modules with the released DANet parameter names (PAM_Module / CAM_Module checkpoints load
with strict=True)."""
import torch
from torch import nn

from .functional import channel_attention, position_attention


class PositionAttention(nn.Module):
    """Position attention module (PAM). Parameters: query_conv, key_conv, value_conv, gamma."""

    def __init__(self, in_channels, reduction=8, backend="auto"):
        super().__init__()
        if in_channels // reduction < 1:
            raise ValueError(f"in_channels // reduction must be >= 1; got in_channels="
                             f"{in_channels}, reduction={reduction}")
        self.chanel_in = in_channels  # the released attribute name (not a parameter)
        self.backend = backend
        self.query_conv = nn.Conv2d(in_channels, in_channels // reduction, kernel_size=1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // reduction, kernel_size=1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        """x: [B, C, H, W] -> gamma * PAM(x) + x."""
        return position_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x),
                                  x, self.gamma, backend=self.backend)

    def extra_repr(self):
        return f"in_channels={self.chanel_in}, backend={self.backend!r}"


class ChannelAttention(nn.Module):
    """Channel attention module (CAM). Parameter: gamma. mode: "original" | "paper"."""

    def __init__(self, mode="original", backend="auto", in_channels=None):
        super().__init__()
        if mode not in ("original", "paper"):
            raise ValueError(f"mode must be 'original' or 'paper'; got {mode!r}")
        self.mode = mode
        self.backend = backend
        self.chanel_in = in_channels  # optional, informative only (released attribute name)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        """x: [B, C, H, W] -> gamma * CAM(x) + x."""
        return channel_attention(x, self.gamma, mode=self.mode, backend=self.backend)

    def extra_repr(self):
        return f"mode={self.mode!r}, backend={self.backend!r}"
