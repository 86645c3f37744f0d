"""The unit every loader yields."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """One decoded image–audio–text triplet.

    image: float32 [3, H, W], normalised with the CLIP mean/std.
    audio: float32 [S], mono 16 kHz, zero mean and unit variance per clip.
    token_ids: int64 [L], BPE ids of `text` (at most 70) followed by EOS; no CLS (the model adds it).
    """

    key: str
    image: torch.Tensor
    audio: torch.Tensor
    text: str
    token_ids: torch.Tensor
