"""ONE-PEACE's masking policies for the denoising-contrast views.

Every function returns a boolean mask over the units of one sample (True = masked) and
draws from the given ``torch.Generator`` only, so a step's masks are a pure function of
its seed. Positions here exclude CLS (and the text's EOS, which is never masked): unit
``u`` of a mask is token position ``u + 1`` of the sequence. ``keep_positions`` turns a
mask into the kept positions of a ``SegmentRef`` (CLS and EOS included).

Released code: ``one_peace/data/pretrain_data/{image,audio}_text_pretrain_dataset.py`` and
``compute_block_mask_1d`` in ``one_peace/utils/data_utils.py``.
"""

from __future__ import annotations

import math

import torch


def whole_word_mask(word_start: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Mask ``ceil(words * ratio)`` whole words: pick word starts at random, then extend
    each to the following non-start tokens. ``word_start`` is a bool per token."""
    starts = word_start.nonzero().flatten()
    n_mask = math.ceil(starts.numel() * ratio)
    if starts.numel() == 0 or n_mask == 0:
        raise ValueError("a caption needs at least one word to mask")
    chosen = starts[torch.randperm(starts.numel(), generator=g)[:n_mask]]
    mask = torch.zeros(word_start.numel(), dtype=torch.bool)
    mask[chosen] = True
    continues = torch.cat([~word_start, torch.zeros(1, dtype=torch.bool)])  # a sentinel start at the end
    idx = chosen
    while idx.numel():
        idx = idx[continues[idx + 1]] + 1
        mask[idx] = True
    return mask


def random_mask(n: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """``int(n * ratio)`` units chosen uniformly (image patches)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: int(n * ratio)]] = True
    return mask


def complementary_mask(unimodal: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """The joint view's mask of ``int(n * ratio)`` units: the units the unimodal view kept
    come first (in random order), then units it masked — so the joint view hides what the
    unimodal view showed. ONE-PEACE uses this for the joint text (40%) and, with the
    image's ratios (75% / 68.75%), it keeps a subset of the patches the image view masked."""
    n = unimodal.numel()
    order = torch.randn(n, generator=g).masked_fill(unimodal, float("-inf")).argsort(descending=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[: int(n * ratio)]] = True
    return mask


def complementary_image_mask(unimodal: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """ONE-PEACE's joint image mask: every patch the image view kept, plus a random subset
    of the patches it masked, ``int(n * ratio)`` in all."""
    n = unimodal.numel()
    total = int(n * ratio)
    kept_by_unimodal = (~unimodal).nonzero().flatten()
    extra = total - kept_by_unimodal.numel()
    if extra < 0:
        raise ValueError(f"joint ratio {ratio} masks fewer patches than the image view keeps")
    order = torch.randn(n, generator=g).masked_fill(~unimodal, float("-inf")).argsort(descending=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.cat([order[:extra], kept_by_unimodal])] = True
    return mask


def block_mask_1d(n: int, ratio: float, span: int, g: torch.Generator, adjust: float = 0.1) -> torch.Tensor:
    """wav2vec2 / data2vec-style span mask (``compute_block_mask_1d`` with the released
    settings): ``int(n * (ratio + adjust) / span)`` centres, a span of ``span`` frames
    around each, then exactly ``int(n * ratio)`` frames by unmasking or masking at random."""
    mask = torch.zeros(n)
    centres = int(n * ((ratio + adjust) / span))
    if centres:
        idx = torch.multinomial(torch.ones(n), min(centres, n), replacement=False, generator=g)
        offsets = torch.arange(span) - span // 2
        mask[(idx[:, None] + offsets).clamp(0, n - 1).flatten()] = 1
    target, have = int(n * ratio), int(mask.sum())
    if have > target:
        mask[torch.multinomial(mask, have - target, replacement=False, generator=g)] = 0
    elif have < target:
        mask[torch.multinomial(1 - mask, target - have, replacement=False, generator=g)] = 1
    return mask.bool()


def keep_positions(mask: torch.Tensor, trailing: int = 0) -> torch.Tensor:
    """Kept sequence positions for a unit mask: CLS (0), the unmasked units (shifted by
    one for CLS) and ``trailing`` never-masked tokens after them (the text's EOS)."""
    n = mask.numel()
    units = (~mask).nonzero().flatten() + 1
    tail = torch.arange(n + 1, n + 1 + trailing)
    return torch.cat([torch.zeros(1, dtype=torch.long), units, tail])


def masked_positions(mask: torch.Tensor) -> torch.Tensor:
    """Sequence positions (CLS = 0) of the masked units."""
    return mask.nonzero().flatten() + 1
