"""omni-core: a compiled-kernel engine for omni-modal representation models."""

from omni_core.model import ModalInputs, OmniConfig, OmniModel, SegmentRef
from omni_core.ops import PackedBatch, Segment, layer_norm, routed_ffn, varlen_attention

__version__ = "0.1.0"
__all__ = ["ModalInputs", "OmniConfig", "OmniModel", "PackedBatch", "Segment", "SegmentRef", "layer_norm",
           "routed_ffn", "varlen_attention"]
