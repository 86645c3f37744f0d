"""ONE-PEACE's encoder (:class:`OmniModel`) and its presets; ``one_peace`` loads released checkpoints."""

from omni_core.model.omni import (
    AUDIO,
    IMAGE,
    MODALITIES,
    PRESETS,
    TEXT,
    ModalInputs,
    OmniConfig,
    OmniModel,
    SegmentRef,
    prepare_waveform,
)

__all__ = ["AUDIO", "IMAGE", "MODALITIES", "PRESETS", "TEXT", "ModalInputs", "OmniConfig", "OmniModel",
           "SegmentRef", "prepare_waveform"]
