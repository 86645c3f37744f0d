"""OPT's pre-training recipe in the packed engine (``omni pretrain --recipe opt --vq DIR``).

A step draws, for every triplet, one sequence per view its tasks read
(:mod:`omni_core.recipes.opt_tasks`: ``mlm``, ``mr``, ``ma``, ``itm``, ``td``, ``id``), runs
all of them through the single-modal and cross-modal encoders in one packed pass, the
caption targets through the text decoder in one packed pass and the image-code targets
through the image decoder in another, and sums the tasks' losses with their weights.

Two ways to mix the tasks (``task_mix``):

* ``"sample"``, the release's: each step draws one task with probability proportional to its
  weight (the release's mix ratio, 1 each) and runs only that task's views; the other tasks'
  loss columns are NaN for the step.
* ``"sum"`` (the trainer's default): every task runs every step (the views share one pass, so
  a step costs about one pass over six views of each triplet) and the weights scale the sum.

Masks, negatives and the drawn task come from the step's generator only, so a resumed run
draws the same ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F

from omni_core.data.sample import Sample
from omni_core.data.tokenizer import CaptionTokenizer
from omni_core.model.opt import IMAGE_GRID, PRESETS, Encoded, OptModel
from omni_core.recipes.opt_tasks import VIEWS, StepContext, Task, View, ViewInputs, resolve_tasks, resolve_weights

CODE_TASKS = ("mrc", "id", "id_text", "id_audio")  # the tasks whose targets are image-tokenizer codes
MIXES = ("sum", "sample")


class ImageTokenizer(Protocol):
    """The contract of :class:`omni_core.model.vq.VQTokenizer` the recipe relies on."""

    codebook_size: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images ``[N, 3, H, W]`` → int64 codes ``[N, 64]``."""


class OptRecipe:
    name = "opt"

    def __init__(self, tokenizer: CaptionTokenizer, vq: ImageTokenizer | None,
                 tasks: str | Iterable[str] | None = None, weights: str | Iterable[float] | None = None,
                 mix: str = "sum") -> None:
        self.tasks = resolve_tasks(tasks)
        self.weights = resolve_weights(self.tasks, weights)
        if mix not in MIXES:
            raise ValueError(f"task mix must be one of {MIXES}, got {mix!r}")
        if mix == "sample" and not sum(self.weights.values()) > 0:
            raise ValueError(f"sampling a task per step needs a positive weight, got {self.weights}")
        self.mix = mix
        needs_codes = [t.name for t in self.tasks if t.name in CODE_TASKS]
        if vq is None and needs_codes:
            raise ValueError(f"tasks {needs_codes} predict image-tokenizer codes: pass --vq DIR "
                             f"(train one with `omni vq train`) or leave them out of --tasks")
        self.vq = vq
        self.mask_id, self.eos_id, self.cls_id = tokenizer.mask_id, tokenizer.eos_id, tokenizer.cls_id
        self.text_vocab = tokenizer.vocab_size
        self.loss_names = tuple(f"loss_{t.name}" for t in self.tasks)

    # ------------------------------------------------------------------ model set-up
    def build_model(self, preset: str, device: torch.device | str, overrides: dict) -> OptModel:
        """The ``opt-*`` preset, its image-code vocabulary sized to the tokenizer's codebook."""
        if preset not in PRESETS:
            raise ValueError(f"the opt recipe trains an OPT model: choose --preset from {sorted(PRESETS)}, "
                             f"got {preset!r}")
        if self.vq is not None:
            overrides = {"codebook_size": self.vq.codebook_size, **overrides}
        return OptModel.from_preset(preset, device=device, **overrides)

    def attach(self, model: OptModel) -> None:
        """Check that the model fits the tokenizers (its heads are its own)."""
        if not isinstance(model, OptModel):
            raise TypeError(f"the opt recipe trains an OptModel (an opt-* preset), got {type(model).__name__}")
        cfg = model.cfg
        if cfg.vocab_size < self.text_vocab:
            raise ValueError(f"the model's text vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
                             f"({self.text_vocab})")
        if (cfg.bos_id, cfg.eos_id) != (self.cls_id, self.eos_id):
            raise ValueError(f"the model decodes captions between ids {cfg.bos_id} and {cfg.eos_id}, the tokenizer "
                             f"marks them {self.cls_id} and {self.eos_id}")
        if self.vq is not None and self.vq.codebook_size != cfg.codebook_size:
            raise ValueError(f"the image tokenizer has {self.vq.codebook_size} codes, the model "
                             f"{cfg.codebook_size} (build it with codebook_size={self.vq.codebook_size})")

    def prepare(self, model: OptModel, reset_logit_scale: bool) -> None:
        model.requires_grad_(True)

    def after_step(self, model: OptModel) -> None:
        return None

    # ------------------------------------------------------------------ the step
    def step(self, model: OptModel, samples: list[Sample], g: torch.Generator) -> tuple[torch.Tensor, dict]:
        if self.mix == "sample":
            weights = torch.tensor([self.weights[t.name] for t in self.tasks], dtype=torch.float64)
            task = self.tasks[int(torch.multinomial(weights, 1, generator=g))]
            loss = self.losses(model, samples, g, tasks=[task])[task.name]
            return loss, {f"loss_{t.name}": float(loss.detach()) if t is task else float("nan") for t in self.tasks}
        parts = self.losses(model, samples, g)
        total = sum(self.weights[name] * loss for name, loss in parts.items())
        return total, {f"loss_{name}": float(loss.detach()) for name, loss in parts.items()}

    def losses(self, model: OptModel, samples: list[Sample], g: torch.Generator,
               packed: bool = True, tasks: list[Task] | None = None) -> dict[str, torch.Tensor]:
        """Each task's loss (of ``tasks``, default all). ``packed=False`` runs every sequence
        through the encoders and decoders alone (the reference the packed step must equal)."""
        tasks = self.tasks if tasks is None else tasks
        ctx = self.context(model, samples, g, packed, tasks)
        return {t.name: t.loss(ctx) for t in tasks}

    def context(self, model: OptModel, samples: list[Sample], g: torch.Generator, packed: bool = True,
                tasks: list[Task] | None = None) -> StepContext:
        """Draw the views of ``tasks`` (default all), run the encoder pass(es); the decoders run
        when a loss asks."""
        if not samples:
            raise ValueError("an OPT step needs at least one triplet")
        device = next(model.parameters()).device
        token_ids = [s.token_ids.to(device) for s in samples]
        images = torch.stack([s.image for s in samples]).to(device)
        audio = [s.audio.to(device) for s in samples]
        inputs = ViewInputs([t.cpu() for t in token_ids], model.grid ** 2,
                            [model.audio.num_frames(a.numel()) for a in audio], self.mask_id, self.text_vocab,
                            self.eos_id)
        views: dict[str, list[View]] = {}
        for task in self.tasks if tasks is None else tasks:
            if task.view not in views:
                views[task.view] = [VIEWS[task.view](inputs, i, g) for i in range(len(samples))]
        first, flat, offset = {}, [], 0
        for name, vs in views.items():
            first[name] = offset
            flat += [v.triplet for v in vs]
            offset += len(vs)
        if packed:
            encoded = model.encode_views(token_ids, images, audio, flat)
        else:
            encoded = Encoded.concat([model.encode_views(token_ids, images, audio, [t]) for t in flat])
        return StepContext(model, images, audio, token_ids, views, encoded, first,
                           lambda: self.image_codes(model, images), packed)

    @torch.no_grad()
    def image_codes(self, model: OptModel, images: torch.Tensor) -> torch.Tensor:
        """The image tokenizer's codes ``[N, 64]`` (images resized to its size when they differ)."""
        if self.vq is None:
            raise ValueError("this task needs image-tokenizer codes: pass --vq DIR")
        size = getattr(self.vq, "image_size", None)
        if size is not None and size != images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        vq_params = list(self.vq.parameters()) if isinstance(self.vq, torch.nn.Module) else []
        if vq_params:
            images = images.to(device=vq_params[0].device, dtype=vq_params[0].dtype)
        codes = self.vq.encode(images).long()
        expected = (images.shape[0], IMAGE_GRID ** 2)
        if tuple(codes.shape) != expected:
            raise ValueError(f"the image tokenizer returned codes {tuple(codes.shape)}, expected {expected}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= model.cfg.codebook_size):
            raise ValueError(f"image codes must lie in [0, {model.cfg.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes.to(model.mask_embed.device)


def load_vq(path: str) -> ImageTokenizer:
    """The image tokenizer ``omni vq train`` wrote to ``path``."""
    from omni_core.model.vq import VQTokenizer

    return VQTokenizer.load(path)
