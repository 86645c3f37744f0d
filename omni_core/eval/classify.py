"""Zero-shot classification with prompted class names, as ONE-PEACE's zero-shot audio
classification (ESC-50): each class is the mean L2-normalised text embedding of prompts
that name it; an image or audio clip takes the class whose embedding is most similar.

On the synthetic eval split the labels are the shape and the colour of the single-object
scenes (two-object scenes have two of each and are left out). A class's prompts are the
captions that name it in every context the generator uses — e.g. for "star": "a red star on
the left", "a blue star at the top", … (6 colours × 5 positions) — so no caption template
outside the training distribution is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_core.data.synth import COLOURS, POSITIONS, SHAPES
from omni_core.data.tokenizer import CaptionTokenizer
from omni_core.model.omni import OmniModel

TASKS = {"shape": SHAPES, "colour": tuple(COLOURS)}


def label_of(caption: str) -> dict[str, str] | None:
    """(shape, colour) of a single-object caption, ``None`` for any other caption."""
    if " and " in caption:
        return None
    words = caption.lower().split()
    shape = next((s for s in SHAPES if s in words), None)
    colour = next((c for c in COLOURS if c in words), None)
    return None if shape is None or colour is None else {"shape": shape, "colour": colour}


def prompts(task: str, name: str) -> list[str]:
    others = TASKS["colour"] if task == "shape" else TASKS["shape"]
    phrases = [p for p, _ in POSITIONS.values()]
    if task == "shape":
        return [f"a {c} {name} {p}" for c in others for p in phrases]
    return [f"a {name} {s} {p}" for s in others for p in phrases]


@torch.no_grad()
def class_embeddings(model: OmniModel, tokenizer: CaptionTokenizer, task: str) -> torch.Tensor:
    """``[C, E]``: per class, the normalised mean of its prompts' embeddings."""
    rows = []
    for name in TASKS[task]:
        ids = [torch.tensor(tokenizer.encode(p), dtype=torch.long) for p in prompts(task, name)]
        rows.append(F.normalize(model.embed_texts(ids).mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot(model: OmniModel, tokenizer: CaptionTokenizer, captions: list[str],
              embeddings: dict[str, torch.Tensor]) -> dict:
    """Accuracy per modality and task on the single-object samples. ``embeddings[m]`` holds
    the eval split's L2-normalised image / audio embeddings, in the order of ``captions``."""
    labelled = [(i, lab) for i, c in enumerate(captions) if (lab := label_of(c)) is not None]
    if not labelled:
        raise ValueError("zero-shot classification needs single-object scenes in the eval split; found none")
    index = torch.tensor([i for i, _ in labelled])
    out: dict = {"num_samples": len(labelled)}
    for task, names in TASKS.items():
        classes = class_embeddings(model, tokenizer, task)
        truth = torch.tensor([names.index(lab[task]) for _, lab in labelled])
        for modality in ("image", "audio"):
            pred = (embeddings[modality][index] @ classes.t()).argmax(dim=1)
            out[f"{modality}_{task}_acc"] = round((pred == truth).float().mean().item(), 4)
        out[f"{task}_chance"] = round(1.0 / len(names), 4)
    return out
