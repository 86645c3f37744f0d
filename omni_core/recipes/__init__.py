"""Pre-training recipes: which views a step runs, its loss terms and weights, what a stage
trains. The trainer knows no recipe by name: it calls the :class:`Recipe` protocol.

* ``one-peace`` (:mod:`.one_peace`): ONE-PEACE's objective, stages ``1``, ``2`` and ``joint``.
* ``contrastive`` (:mod:`.contrastive`): plain CLIP-style image–text + audio–text InfoNCE.
* ``opt`` (:mod:`.opt`): OPT's nine pretext tasks (:mod:`.opt_tasks`) on an ``opt-*`` model; a
  recipe with ``build_model`` chooses the model family it trains.
"""

from __future__ import annotations

from typing import Protocol

import torch

from omni_core.data.sample import Sample
from omni_core.data.tokenizer import CaptionTokenizer
from omni_core.model.omni import OmniModel

RECIPES = ("one-peace", "contrastive", "opt")


class Recipe(Protocol):
    name: str
    loss_names: tuple[str, ...]

    def attach(self, model: OmniModel) -> None:
        """Add the recipe's own trained modules to the model (saved with it)."""

    def prepare(self, model: OmniModel, reset_logit_scale: bool) -> None:
        """Choose what trains (freezing) before the optimizer is built."""

    def step(self, model: OmniModel, samples: list[Sample], g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The step's loss and its named parts (floats)."""

    def after_step(self, model: OmniModel) -> None:
        """Runs after every optimizer step."""


def make_recipe(name: str, stage: str, tokenizer: CaptionTokenizer, gather_grad: bool = False,
                vq: str | None = None, tasks: str | None = None, task_weights: str | None = None,
                task_mix: str = "sum") -> Recipe:
    """``vq`` (an image-tokenizer directory), ``tasks``, ``task_weights`` and ``task_mix`` are opt's."""
    if name == "one-peace":
        from omni_core.recipes.one_peace import OnePeaceRecipe

        return OnePeaceRecipe(stage, word_starts(tokenizer), tokenizer.eos_id, gather_grad)
    if name == "contrastive":
        from omni_core.recipes.contrastive import ContrastiveRecipe

        return ContrastiveRecipe(gather_grad)
    if name == "opt":
        from omni_core.recipes.opt import OptRecipe, load_vq

        return OptRecipe(tokenizer, load_vq(vq) if vq else None, tasks, task_weights, task_mix)
    raise ValueError(f"unknown recipe {name!r}; choose one of {RECIPES}")


def word_starts(tokenizer: CaptionTokenizer) -> torch.Tensor:
    """Per token id: does it begin a word? (byte-level BPE marks a leading space with 'Ġ';
    special tokens count as word starts, as in fairseq's ``get_whole_word_mask``)."""
    vocab = tokenizer.tokenizer.get_vocab()
    starts = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for token, i in vocab.items():
        starts[i] = token.startswith("Ġ") or (token.startswith("[") and token.endswith("]"))
    return starts
