"""danet_ops: fused, memory-efficient DANet position (PAM) and channel (CAM) attention.

Importing it is cheap: it imports no triton, queries no GPU and compiles nothing. A prebuilt
danet_ops._C is loaded now (a dlopen); without one the C++ ops are JIT-compiled on the first
call that needs them. The backends and how one is chosen: danet_ops.backends.
"""
__version__ = "0.1.0"

from . import _compiled_ops
from .backends import BackendUnavailableError, available_backends
from .convert import convert_attention
from .functional import channel_attention, position_attention
from .maps import attention_map, channel_attention_map
from .modules import ChannelAttention, PositionAttention

_compiled_ops.load(build=False)

__all__ = [
    "PositionAttention", "ChannelAttention", "position_attention", "channel_attention",
    "available_backends", "BackendUnavailableError",
    "attention_map", "channel_attention_map", "convert_attention",
]
