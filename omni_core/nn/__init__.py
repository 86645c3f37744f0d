"""Drop-in modules built on :mod:`omni_core.ops`."""

from omni_core.nn.attention import VarlenAttention
from omni_core.nn.ffn import ModalityLayerNorm, ModalityRoutedFFN

__all__ = ["ModalityLayerNorm", "ModalityRoutedFFN", "VarlenAttention"]
