"""danet_ops: fused, memory-efficient DANet position (PAM) and channel (CAM) attention."""
__version__ = "0.1.0"

from . import _compiled
from ._backends import BackendUnavailableError, available_backends
from .convert import convert_attention
from .functional import channel_attention, position_attention
from .maps import attention_map, channel_attention_map
from .modules import ChannelAttention, PositionAttention

# Register the compiled ops now when a prebuilt library exists (a cheap dlopen); a missing one
# is JIT-compiled lazily, on the first call that needs it.
if _compiled.prebuilt_present():
    _compiled.load()
_compiled._register_export()  # ONNX lowering of the ops (danet_ops/_export.py)

__all__ = [
    "PositionAttention", "ChannelAttention", "position_attention", "channel_attention",
    "available_backends", "BackendUnavailableError",
    "attention_map", "channel_attention_map", "convert_attention",
]
