"""The views of a pre-training step (ONE-PEACE's trainer runs one padded pass per view).

Stage 1 (image–text): text, image, joint text+image, and their masked variants.
Stage 2 (audio–text): text, audio, joint text+audio, and their masked variants.
A masked view keeps CLS plus a random subset of positions (MAE-style); kept tokens keep
their original positions so their relative-position bias is that of the full input.
The student (with gradients) runs the unimodal views and the masked views; the teacher
(no gradients) runs the unmasked views, whose features are the masked views' targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_core.model.omni import AUDIO, IMAGE, TEXT, SegmentRef

MASK_RATIO = {TEXT: 0.15, IMAGE: 0.75, AUDIO: 0.55}


@dataclass(frozen=True)
class View:
    name: str
    sequences: list[list[SegmentRef]]
    target: str | None = None  # the unmasked view whose features a masked view predicts
    student: bool = True  # False: only the no-grad teacher pass runs it (no loss term uses it)


def keep_positions(length: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """CLS (position 0) plus a sorted random subset of the other positions, at least one."""
    others = length - 1
    n_keep = max(1, round(others * (1.0 - ratio))) if others else 0
    chosen = torch.randperm(others, generator=generator)[:n_keep] + 1 if others else torch.empty(0, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), chosen.sort().values])


def step_views(other: int, num_pairs: int, token_counts: dict[int, list[int]], seed: int = 0) -> list[View]:
    """The six views of a step pairing text with ``other`` (IMAGE for stage 1, AUDIO for stage 2).

    ``token_counts[m][i]`` is the number of tokens (CLS included) of sample i of modality m,
    needed to draw the masks.
    """
    g = torch.Generator().manual_seed(seed)
    name = "image" if other == IMAGE else "audio"

    def masked(m: int, i: int) -> SegmentRef:
        return SegmentRef(m, i, keep_positions(token_counts[m][i], MASK_RATIO[m], g))

    pairs = range(num_pairs)
    return [
        View("text", [[SegmentRef(TEXT, i)] for i in pairs]),
        View(name, [[SegmentRef(other, i)] for i in pairs]),
        View(f"text+{name}", [[SegmentRef(TEXT, i), SegmentRef(other, i)] for i in pairs], student=False),
        View("masked_text", [[masked(TEXT, i)] for i in pairs], target="text"),
        View(f"masked_{name}", [[masked(other, i)] for i in pairs], target=name),
        View(f"masked_text+{name}", [[masked(TEXT, i), masked(other, i)] for i in pairs],
             target=f"text+{name}"),
    ]
