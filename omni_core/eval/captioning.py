"""Metrics of OPT's generation on the synthetic triplets.

* ``caption_scores``: corpus BLEU-4 and CIDEr-D of generated captions against reference captions,
  computed by ``pycocoevalcap`` (the COCO caption evaluation code, pinned in requirements.txt:
  BLEU with the "closest" reference length, CIDEr-D with σ = 6 and the ×10 scale). Its PTB
  tokenizer needs Java, so captions are tokenised here the same way for these plain captions:
  lower case, punctuation dropped, split on white space.
* ``attribute_accuracy``: the colour, shape and position words of a generated caption against the
  objects the synthetic generator drew (``items`` of the sample's metadata, see
  :mod:`omni_core.data.synth`).
* ``dominant_colour`` / ``colour_match``: which palette colour covers most of a generated image's
  shape pixels, and whether it is a colour the caption names.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from omni_core.data.synth import COLOURS, POSITIONS, SHAPES

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(caption: str) -> str:
    """Lower case, punctuation dropped, single spaces (what the COCO PTB tokenizer yields here)."""
    return " ".join(_WORD.findall(caption.lower()))


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of one hypothesis per sample against its reference(s)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no captions to score")
    res, gts = {}, {}
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"sample {i} has no reference caption")
        res[i] = [tokenize(hyp)]
        gts[i] = [tokenize(r) for r in refs]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


@dataclass(frozen=True)
class Obj:
    """An object a caption names; an attribute the caption does not name is None."""

    colour: str | None
    shape: str | None
    position: str | None


def parse_caption(caption: str) -> list[Obj]:
    """Objects of a caption in the generator's grammar ("a red star on the left and ..."): one per
    phrase between "and"s, each with its first colour, shape and position word."""
    objects = []
    for phrase in re.split(r"\band\b", tokenize(caption)):
        words = phrase.split()
        if not words:
            continue
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        position = next((w for w in words if w in POSITIONS), None)  # "on the left" -> left
        if colour or shape or position:
            objects.append(Obj(colour, shape, position))
    return objects


def truth_objects(meta: dict) -> list[Obj]:
    """The objects of a synthetic sample's metadata (its ``items``)."""
    return [Obj(i["colour"], i["shape"], i["position"]) for i in meta["items"]]


def attribute_scores(predicted: list[Obj], truth: list[Obj]) -> dict[str, float]:
    """Per-sample accuracy of colour, shape and position words.

    Each true object is paired with the predicted object at its position (positions are distinct
    in an image); those left are paired in order of mention, with the position wrong. Every pair
    scores its three attributes; objects without a partner (missing or invented) score 0, so the
    denominator is max(#true, #predicted) objects.
    """
    if not truth:
        raise ValueError("a sample with no objects cannot be scored")
    left = list(predicted)
    pairs: list[tuple[Obj, Obj | None]] = []
    unplaced = []
    for t in truth:
        match = next((p for p in left if p.position == t.position), None)
        if match is None:
            unplaced.append(t)
        else:
            left.remove(match)
            pairs.append((t, match))
    pairs += [(t, left.pop(0) if left else None) for t in unplaced]
    slots = max(len(truth), len(predicted))
    hits = {"colour": 0, "shape": 0, "position": 0}
    for t, p in pairs:
        if p is not None:
            hits["colour"] += p.colour == t.colour
            hits["shape"] += p.shape == t.shape
            hits["position"] += p.position == t.position
    out = {k: v / slots for k, v in hits.items()}
    out["all"] = sum(hits.values()) / (3 * slots)
    out["exact"] = float(sorted(map(str, predicted)) == sorted(map(str, truth)))
    return out


def attribute_accuracy(captions: Sequence[str], metas: Sequence[dict]) -> dict[str, float]:
    """Mean over samples of :func:`attribute_scores`: ``all`` (the headline number), ``colour``,
    ``shape``, ``position`` and ``exact`` (the caption names exactly the drawn objects)."""
    if len(captions) != len(metas):
        raise ValueError(f"{len(captions)} captions but {len(metas)} samples")
    if not captions:
        raise ValueError("no captions to score")
    rows = [attribute_scores(parse_caption(c), truth_objects(m)) for c, m in zip(captions, metas)]
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


# -- colour of generated images ---------------------------------------------------------------
# Background channels are drawn from 200-250 and every palette colour (with its +-20 jitter) has a
# channel below 90: a pixel whose darkest channel is above this is background (or a blurred edge).
BACKGROUND_MIN_CHANNEL = 150
MIN_SHAPE_SHARE = 0.005  # fewer shape pixels than this share of the image: no shape was drawn


def _pixels(image: Image.Image | np.ndarray | bytes | str | Path) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image, an array, PNG/JPEG bytes or a file."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            return np.asarray(img.convert("RGB"))
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as img:
            return np.asarray(img.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
    return arr


def colour_shares(image: Image.Image | np.ndarray | bytes | str | Path) -> dict[str, float]:
    """Share of the image's pixels nearest to each palette colour (background pixels excluded)."""
    px = _pixels(image).reshape(-1, 3).astype(np.float32)
    shape_px = px[px.min(axis=1) <= BACKGROUND_MIN_CHANNEL]
    names = sorted(COLOURS)
    if not len(shape_px):
        return dict.fromkeys(names, 0.0)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    nearest = ((shape_px[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(names))
    return {n: float(c) / len(px) for n, c in zip(names, counts)}


def _dominant(shares: dict[str, float]) -> str | None:
    best = max(shares, key=shares.get)
    return best if shares[best] >= MIN_SHAPE_SHARE else None


def dominant_colour(image: Image.Image | np.ndarray | bytes | str | Path) -> str | None:
    """The palette colour covering most shape pixels, or None when (almost) no shape is drawn."""
    return _dominant(colour_shares(image))


def caption_colours(caption: str) -> set[str]:
    return {o.colour for o in parse_caption(caption) if o.colour}


def colour_match(images: Iterable, captions: Sequence[str]) -> dict[str, float]:
    """``match``: the fraction of images whose dominant shape colour is a colour their caption
    names; ``all_present``: the fraction in which every named colour covers at least
    MIN_SHAPE_SHARE of the image."""
    images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to score")
    match = present = 0
    for image, caption in zip(images, captions):
        wanted = caption_colours(caption)
        shares = colour_shares(image)
        match += _dominant(shares) in wanted
        present += bool(wanted) and all(shares[c] >= MIN_SHAPE_SHARE for c in wanted)
    return {"match": round(match / len(images), 4), "all_present": round(present / len(images), 4)}
