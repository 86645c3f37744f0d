"""OPT's nine pretext tasks as a registry of *views* and *tasks*.

A **view** builds, for each triplet of a step, one sequence of the cross-modal encoder (a
:class:`~omni_core.model.opt.TripletView` plus its targets). A **task** names the view it
reads and computes a loss from the step's packed encoder output. Tasks that read the same
view share its sequences (mrc, mrfr and mrct all read the masked-region view), and every
view of a step goes through the encoders in one packed pass.

The release (``mindspore-ai/models``, ``research/mm/opt``: ``src/data/*_three.py``,
``src/model_mindspore/pretrain_ms.py``, ``loss.py``) gives the facts:

========  ===========  ==================================================================
task      view         loss
========  ===========  ==================================================================
mlm       ``mlm``      text tokens 15% (80% [MASK], 10% random, 10% kept); cross-entropy
mrc       ``mr``       masked patches classified into the image tokenizer's codes
mrfr      ``mr``       masked patches' pixels regressed (MSE)
mrct      ``mr``       the regressed patch against its own target and 10 neighbouring
                       masked units' targets: cosine / 0.1, cross-entropy
mafr      ``ma``       masked audio frames' log-mel regressed (MSE)
mac       ``ma``       contrastive as mrct, over audio frames
itm       ``itm``      5-way matching on the pooled first token: matched (p = 0.5), or the
                       image and/or audio swapped with other samples' (the 4 swap kinds
                       equally likely)
td        ``td``       text left out; p 0.3 image left out (audio 15% masked), p 0.3 audio
                       left out (image 15%), else both 15%; the text decoder writes the
                       caption (label smoothing 0.1)
id        ``id``       image left out; p 0.3 text left out (audio 15%), p 0.3 audio left
                       out (text MLM-masked), else both masked; the image decoder writes
                       the 64 image codes (label smoothing 0.1)
========  ===========  ==================================================================

Region and frame masks (``mr``, ``ma``) mask every unit with probability 0.3, else each unit
with probability 0.15 (at least one), as ``_get_img_mask_with_all`` / ``_get_audio_mask_with_all``.

Optional tasks of ours (not in the default mix): ``td_image``, ``td_audio`` (the caption
from the image alone / the speech alone) and ``id_text``, ``id_audio`` (the image codes from
the caption alone / the speech alone) — the single-source conditions generation runs in.

Add a task with :func:`register_task` (and a view with :func:`register_view`); then name it
in ``--tasks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from omni_core.model.opt import AUDIO, IMAGE, ITM_CLASSES, TEXT, Encoded, OptModel, TripletView
from omni_core.train.objectives import _upcast, label_smoothed_nll

MASK_PROB = 0.15
MASK_ALL_PROB = 0.3  # a region/frame view masks everything; td/id leave a whole modality out
ITM_NEG_PROB = 0.5
CONTRAST_NEGATIVES = 10
CONTRAST_TEMPERATURE = 0.1
DECODER_LABEL_SMOOTHING = 0.1
FIRST_WORD_ID = 5  # ids below are the tokenizer's specials (omni_core.data.tokenizer)


# --------------------------------------------------------------------------- masking
def bert_mask(ids: torch.Tensor, g: torch.Generator, mask_id: int, vocab_size: int, eos_id: int | None,
              prob: float = MASK_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each token (not a final EOS) is chosen with ``prob`` (at least one);
    a chosen token becomes [MASK] (80%), a random word (10%) or stays (10%). Returns the new
    ids and the labels (the original id where chosen, -1 elsewhere)."""
    ids = ids.flatten().long()
    n = ids.numel() - int(eos_id is not None and ids.numel() > 0 and int(ids[-1]) == eos_id)
    if n < 1:
        raise ValueError(f"a caption needs at least one token besides EOS to mask, got {ids.tolist()}")
    chosen = torch.rand(n, generator=g) < prob
    if not chosen.any():
        chosen[int(torch.randint(n, (1,), generator=g))] = True
    chosen = torch.cat([chosen, chosen.new_zeros(ids.numel() - n)])
    action = torch.rand(ids.numel(), generator=g)
    random_ids = torch.randint(FIRST_WORD_ID, vocab_size, (ids.numel(),), generator=g)
    out = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, torch.where(chosen, ids, torch.full_like(ids, -1))


def unit_mask(n: int, g: torch.Generator, prob: float = MASK_PROB) -> torch.Tensor:
    """Each of ``n`` units masked with ``prob``, at least one."""
    mask = torch.rand(n, generator=g) < prob
    if not mask.any():
        mask[int(torch.randint(n, (1,), generator=g))] = True
    return mask


def unit_mask_with_all(n: int, g: torch.Generator) -> torch.Tensor:
    """With probability 0.3 every unit, else :func:`unit_mask`."""
    if float(torch.rand(1, generator=g)) < MASK_ALL_PROB:
        return torch.ones(n, dtype=torch.bool)
    return unit_mask(n, g)


# --------------------------------------------------------------------------- views
@dataclass
class View:
    """One triplet's sequence in a view and its targets."""

    sample: int  # the triplet this view was made from
    triplet: TripletView
    text_labels: torch.Tensor | None = None  # original id at MLM-masked positions, -1 elsewhere
    itm_label: int | None = None


@dataclass
class ViewInputs:
    """What a view builder may read about the step."""

    token_ids: list[torch.Tensor]
    num_patches: int
    num_frames: list[int]
    mask_id: int
    vocab_size: int
    eos_id: int | None

    @property
    def num_samples(self) -> int:
        return len(self.token_ids)

    def mlm(self, i: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return bert_mask(self.token_ids[i], g, self.mask_id, self.vocab_size, self.eos_id)


ViewBuilder = Callable[[ViewInputs, int, torch.Generator], View]
VIEWS: dict[str, ViewBuilder] = {}


def register_view(name: str, builder: ViewBuilder, replace: bool = False) -> None:
    if name in VIEWS and not replace:
        raise ValueError(f"a view named {name!r} is already registered (pass replace=True)")
    VIEWS[name] = builder


def _mlm_view(v: ViewInputs, i: int, g: torch.Generator) -> View:
    ids, labels = v.mlm(i, g)
    return View(i, TripletView(i, i, i, text_ids=ids), text_labels=labels)


def _mr_view(v: ViewInputs, i: int, g: torch.Generator) -> View:
    return View(i, TripletView(i, i, i, image_mask=unit_mask_with_all(v.num_patches, g)))


def _ma_view(v: ViewInputs, i: int, g: torch.Generator) -> View:
    return View(i, TripletView(i, i, i, audio_mask=unit_mask_with_all(v.num_frames[i], g)))


def _other(n: int, exclude: set[int], g: torch.Generator) -> int:
    """A sample index outside ``exclude``, uniformly."""
    pool = [j for j in range(n) if j not in exclude]
    return pool[int(torch.randint(len(pool), (1,), generator=g))]


def _itm_view(v: ViewInputs, i: int, g: torch.Generator) -> View:
    n = v.num_samples
    if n < 2 or float(torch.rand(1, generator=g)) >= ITM_NEG_PROB:
        return View(i, TripletView(i, i, i), itm_label=0)
    kind = 1 + int(torch.randint(len(ITM_CLASSES) - 1, (1,), generator=g))
    if kind == 4 and n < 3:
        kind = 1  # two distinct other samples need three in the step
    j = _other(n, {i}, g)
    image, audio = {1: (j, j), 2: (j, i), 3: (i, j)}[kind] if kind < 4 else (j, _other(n, {i, j}, g))
    return View(i, TripletView(i, image, audio), itm_label=kind)


def _modality_drop(g: torch.Generator) -> int:
    """0 or 1: which of two modalities is left out (p 0.3 each), 2: neither."""
    r = float(torch.rand(1, generator=g))
    return 0 if r < MASK_ALL_PROB else 1 if r < 2 * MASK_ALL_PROB else 2


def _td_view(v: ViewInputs, i: int, g: torch.Generator) -> View:
    drop = _modality_drop(g)
    image_mask = None if drop == 0 else unit_mask(v.num_patches, g)
    audio_mask = None if drop == 1 else unit_mask(v.num_frames[i], g)
    return View(i, TripletView(None, None if drop == 0 else i, None if drop == 1 else i,
                               image_mask=image_mask, audio_mask=audio_mask))


def _id_view(v: ViewInputs, i: int, g: torch.Generator) -> View:
    drop = _modality_drop(g)
    text_ids = None if drop == 0 else v.mlm(i, g)[0]
    audio_mask = None if drop == 1 else unit_mask(v.num_frames[i], g)
    return View(i, TripletView(None if drop == 0 else i, None, None if drop == 1 else i,
                               text_ids=text_ids, audio_mask=audio_mask))


def _only(modality: int) -> ViewBuilder:
    """A view of one unmasked modality alone (the optional single-source decoding tasks)."""

    def build(v: ViewInputs, i: int, g: torch.Generator) -> View:
        return View(i, TripletView(*(i if m == modality else None for m in (TEXT, IMAGE, AUDIO))))

    return build


for _name, _builder in (("mlm", _mlm_view), ("mr", _mr_view), ("ma", _ma_view), ("itm", _itm_view),
                        ("td", _td_view), ("id", _id_view), ("image_only", _only(IMAGE)),
                        ("audio_only", _only(AUDIO)), ("text_only", _only(TEXT))):
    register_view(_name, _builder)


# --------------------------------------------------------------------------- the step's state
@dataclass
class StepContext:
    """Everything a task's loss reads: the model, the step's samples, its views, the packed
    encoder output (sequence ``first[view] + k`` is triplet k's sequence of ``view``) and
    lazily computed targets."""

    model: OptModel
    images: torch.Tensor
    audio: list[torch.Tensor]
    token_ids: list[torch.Tensor]
    views: dict[str, list[View]]
    encoded: Encoded
    first: dict[str, int]
    image_codes: Callable[[], torch.Tensor]  # [N, 64] the image tokenizer's codes of the step's images
    packed: bool = True  # False: decoders run one sequence at a time (the unpacked reference)
    _memo: dict = field(default_factory=dict)

    def span(self, view: str, k: int, modality: int) -> tuple[int, int]:
        return self.encoded.spans[self.first[view] + k][modality]

    def codes(self) -> torch.Tensor:
        if "codes" not in self._memo:
            self._memo["codes"] = self.image_codes()
        return self._memo["codes"]

    def masked_rows(self, view: str, modality: int) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Rows of ``encoded.x`` of every masked unit of ``modality`` in ``view`` (view order),
        and per view ``(source sample, masked unit indices)``."""
        rows, units = [], []
        for k, view_k in enumerate(self.views[view]):
            t = view_k.triplet
            mask, source = (t.image_mask, t.image) if modality == IMAGE else (t.audio_mask, t.audio)
            idx = mask.nonzero().flatten()
            start, _ = self.span(view, k, modality)
            rows.append(start + 1 + idx)
            units.append((source, idx))
        return torch.cat(rows).to(self.encoded.x.device), units

    def decode(self, decoder: torch.nn.Module, view: str, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits of ``tokens[k]`` against view sequence k, packed or one by one."""
        rows = [self.first[view] + k for k in range(len(tokens))]
        if self.packed:
            return decoder(tokens, self.encoded.select(rows))
        return torch.cat([decoder([t], self.encoded.select([r])) for t, r in zip(tokens, rows)])


# --------------------------------------------------------------------------- losses (plain tensors)
def windowed_contrast(prediction: torch.Tensor, target: torch.Tensor, negatives: int = CONTRAST_NEGATIVES,
                      temperature: float = CONTRAST_TEMPERATURE) -> torch.Tensor:
    """The release's masked-unit contrast: unit i's prediction is scored (cosine / temperature)
    against its own target and the targets of ``negatives`` neighbouring units in the step's
    order (a window of ``negatives + 1`` around i, shifted to stay inside); cross-entropy.

    The release scores with ``(1 - cos)/t`` (``loss.py``), which rewards dissimilarity to the
    positive; we score with ``cos/t``, the contrast its task describes."""
    N = prediction.shape[0]
    if N == 0 or target.shape[0] != N:
        raise ValueError(f"contrast needs matching non-empty predictions and targets, got {N} and {target.shape[0]}")
    logits = F.normalize(prediction, dim=-1) @ F.normalize(target, dim=-1).t() / temperature
    width = min(negatives + 1, N)
    i = torch.arange(N, device=logits.device)
    start = (i - negatives // 2).clamp(0, N - width)
    inside = (i[None, :] >= start[:, None]) & (i[None, :] < start[:, None] + width)
    return F.cross_entropy(logits.masked_fill(~inside, float("-inf")), i)


def decoder_loss(logits: torch.Tensor, targets: torch.Tensor,
                 smoothing: float = DECODER_LABEL_SMOOTHING) -> torch.Tensor:
    """Label-smoothed cross-entropy over every target token (the release's TransformerTrainingLoss)."""
    return label_smoothed_nll(F.log_softmax(_upcast(logits), dim=-1), targets, smoothing)


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    name: str
    view: str  # the view whose sequences the loss reads
    loss: Callable[[StepContext], torch.Tensor]


TASKS: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> None:
    if task.name in TASKS and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered (pass replace=True)")
    TASKS[task.name] = task


def _mlm(ctx: StepContext) -> torch.Tensor:
    rows, targets = [], []
    for k, view in enumerate(ctx.views["mlm"]):
        idx = (view.text_labels >= 0).nonzero().flatten()
        rows.append(ctx.span("mlm", k, TEXT)[0] + 1 + idx)
        targets.append(view.text_labels[idx])
    x = ctx.encoded.x[torch.cat(rows).to(ctx.encoded.x.device)]
    return F.cross_entropy(_upcast(ctx.model.mlm_head(x)), torch.cat(targets).to(x.device))


def _region_targets(ctx: StepContext, units, per_sample: torch.Tensor) -> torch.Tensor:
    return torch.cat([per_sample[source][idx.to(per_sample.device)] for source, idx in units])


def _mrc(ctx: StepContext) -> torch.Tensor:
    rows, units = ctx.masked_rows("mr", IMAGE)
    codes = _region_targets(ctx, units, ctx.model.patch_codes(ctx.codes()))  # [n, k]
    logits = ctx.model.mrc_head(ctx.encoded.x[rows]).view(codes.numel(), -1)
    return F.cross_entropy(_upcast(logits), codes.flatten())


def _region_prediction(ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(regressed, target) pixels of every masked patch; shared by mrfr and mrct."""
    if "region" not in ctx._memo:
        rows, units = ctx.masked_rows("mr", IMAGE)
        target = _region_targets(ctx, units, ctx.model.pixel_patches(ctx.images))
        ctx._memo["region"] = ctx.model.region_regress(ctx.encoded.x[rows]), target
    return ctx._memo["region"]


def _frame_prediction(ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(regressed, target) log-mel of every masked audio frame; shared by mafr and mac."""
    if "frames" not in ctx._memo:
        rows, units = ctx.masked_rows("ma", AUDIO)
        per_clip = {s: ctx.model.audio_targets(ctx.audio[s]) for s in sorted({s for s, _ in units})}
        target = torch.cat([per_clip[s][idx.to(per_clip[s].device)] for s, idx in units])
        ctx._memo["frames"] = ctx.model.audio_regress(ctx.encoded.x[rows]), target
    return ctx._memo["frames"]


def _mse(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(_upcast(pair[0]), _upcast(pair[1]).to(_upcast(pair[0]).dtype))


def _contrast(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return windowed_contrast(_upcast(pair[0]), _upcast(pair[1]).to(_upcast(pair[0]).dtype))


def _itm(ctx: StepContext) -> torch.Tensor:
    rows = torch.arange(len(ctx.views["itm"])) + ctx.first["itm"]
    logits = ctx.model.matching_logits(ctx.encoded, rows)
    labels = torch.tensor([v.itm_label for v in ctx.views["itm"]], device=logits.device)
    return F.cross_entropy(_upcast(logits), labels)


def _text_decoding(view: str) -> Callable[[StepContext], torch.Tensor]:
    def loss(ctx: StepContext) -> torch.Tensor:
        captions = [ctx.token_ids[v.sample].long() for v in ctx.views[view]]
        inputs = [torch.cat([c.new_full((1,), ctx.model.cfg.bos_id), c[:-1]]) for c in captions]
        return decoder_loss(ctx.decode(ctx.model.text_decoder, view, inputs), torch.cat(captions))

    return loss


def _image_decoding(view: str) -> Callable[[StepContext], torch.Tensor]:
    def loss(ctx: StepContext) -> torch.Tensor:
        codes = ctx.codes()
        targets = [codes[v.sample] for v in ctx.views[view]]
        bos = ctx.model.cfg.codebook_size
        inputs = [torch.cat([t.new_full((1,), bos), t[:-1]]) for t in targets]
        return decoder_loss(ctx.decode(ctx.model.image_decoder, view, inputs), torch.cat(targets))

    return loss


for _task in (Task("mlm", "mlm", _mlm), Task("mrc", "mr", _mrc),
              Task("mrfr", "mr", lambda ctx: _mse(_region_prediction(ctx))),
              Task("mrct", "mr", lambda ctx: _contrast(_region_prediction(ctx))),
              Task("mafr", "ma", lambda ctx: _mse(_frame_prediction(ctx))),
              Task("mac", "ma", lambda ctx: _contrast(_frame_prediction(ctx))),
              Task("itm", "itm", _itm), Task("td", "td", _text_decoding("td")),
              Task("id", "id", _image_decoding("id")),
              # ours, off by default: decoding from one source alone (what captioning from an
              # image or from speech, and imagining from a caption or from speech, ask at inference)
              Task("td_image", "image_only", _text_decoding("image_only")),
              Task("td_audio", "audio_only", _text_decoding("audio_only")),
              Task("id_text", "text_only", _image_decoding("text_only")),
              Task("id_audio", "audio_only", _image_decoding("audio_only"))):
    register_task(_task)

DEFAULT_TASKS = ("mlm", "mrc", "mrfr", "mrct", "mafr", "mac", "itm", "td", "id")


def resolve_tasks(names: str | Iterable[str] | None) -> list[Task]:
    """Tasks by name (a comma-separated string or a list; None: the release's nine)."""
    if names is None:
        names = DEFAULT_TASKS
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise ValueError("give at least one task")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown OPT task(s) {unknown}; registered: {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a task is named twice in {names}")
    missing = sorted({TASKS[n].view for n in names} - set(VIEWS))
    if missing:
        raise ValueError(f"tasks read views that are not registered: {missing}")
    return [TASKS[n] for n in names]


def resolve_weights(tasks: list[Task], weights: str | Iterable[float] | None) -> dict[str, float]:
    """One weight per task (a comma-separated string or a list, in task order; None: all 1,
    the release's mix ratio)."""
    if weights is None:
        return {t.name: 1.0 for t in tasks}
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError as err:
            raise ValueError(f"task weights must be numbers, got {weights!r}") from err
    weights = [float(w) for w in weights]
    if len(weights) != len(tasks):
        raise ValueError(f"{len(weights)} task weights for {len(tasks)} tasks ({[t.name for t in tasks]})")
    if any(w < 0 for w in weights):
        raise ValueError(f"task weights must be >= 0, got {weights}")
    return {t.name: w for t, w in zip(tasks, weights)}
