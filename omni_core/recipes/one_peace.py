"""ONE-PEACE's pre-training recipe in the packed engine: one packed encoder pass with
gradients, one packed no-grad pass, one packed decoder pass per step.

What a step computes (released code: ``one_peace/criterions/*_pretrain_loss.py``,
``one_peace/models/one_peace/one_peace_pretrain.py``, the pre-training datasets and YAMLs):

* **Cross-modal contrast** over the unmasked unimodal views' CLS embeddings
  (:func:`~omni_core.train.objectives.cross_modal_contrast`).
* **Denoising contrast** for each masked view: the encoder sees only the kept units, the
  decoder re-inserts mask tokens and predicts the teacher's feature at every masked unit.
  Teachers are the model itself on unmasked input, in train mode (drop path on), detached:
  the unimodal text/image teachers are the contrastive pass's own features; the joint
  teachers (and, in stage 2, the audio teacher) come from the no-grad joint pass.
* Masks (:mod:`omni_core.train.masking`): text 15% whole words; image 75% of patches;
  audio 55% in spans of 5; joint text 40% (stage 1: complementary to the text view's mask;
  stage 2: fresh whole words), joint image 68.75% (every patch the image view kept plus
  some it masked), joint audio 45% in spans.

Stages:

* ``1`` image–text: ``itc + 0.5·text + 1·image + 0.5·joint-text + 0.5·joint-image``.
* ``2`` audio–text, everything frozen but the audio adapter, the audio FFNs, the audio final
  norm (plus the audio projection, the decoder and the reset logit scale, which the released
  model also trains): ``atc + 1·audio + 0.5·joint-text + 0.5·joint-audio``; the text pass
  runs without gradient.
* ``joint`` (our extension; the released trainer cannot do it): both stages' views and
  losses in one packed pass, every parameter trained.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from omni_core.data.sample import Sample
from omni_core.model.decoder import DecoderSegment, MaskedDecoder
from omni_core.model.omni import AUDIO, IMAGE, TEXT, ModalInputs, OmniModel, SegmentRef
from omni_core.train import masking
from omni_core.train.dist import local_rows
from omni_core.train.objectives import cross_modal_contrast, denoising_contrast, logit_scale_exp

STAGES = ("1", "2", "joint")
RATIOS = dict(text=0.15, image=0.75, audio=0.55, joint_text=0.4, joint_image=0.6875, joint_audio=0.45)
AUDIO_SPAN = 5


@dataclass(frozen=True)
class Dcl:
    """One denoising-contrast term: the masked view, the modality scored, the teacher view."""

    name: str
    view: str
    modality: int
    teacher: str
    weight: float


@dataclass(frozen=True)
class StagePlan:
    contrast: tuple[tuple[str, int, int], ...]  # (loss name, modality, paired modality)
    student: tuple[str, ...]  # views run with gradients
    frozen: tuple[str, ...]  # views run without (teachers, frozen towers)
    dcl: tuple[Dcl, ...]


_STAGE1_DCL = (Dcl("dcl_text", "m_text", TEXT, "text", 0.5),
               Dcl("dcl_image", "m_image", IMAGE, "image", 1.0),
               Dcl("dcl_joint_text_image:text", "m_text+image", TEXT, "text+image", 0.5),
               Dcl("dcl_joint_text_image:image", "m_text+image", IMAGE, "text+image", 0.5))
_STAGE2_DCL = (Dcl("dcl_audio", "m_audio", AUDIO, "text+audio", 1.0),
               Dcl("dcl_joint_text_audio:text", "m_text+audio", TEXT, "text+audio", 0.5),
               Dcl("dcl_joint_text_audio:audio", "m_text+audio", AUDIO, "text+audio", 0.5))
PLANS = {
    "1": StagePlan((("itc", IMAGE, TEXT),), ("text", "image", "m_text", "m_image", "m_text+image"),
                   ("text+image",), _STAGE1_DCL),
    "2": StagePlan((("atc", AUDIO, TEXT),), ("audio", "m_audio", "m_text+audio"), ("text", "text+audio"),
                   _STAGE2_DCL),
    "joint": StagePlan((("itc", IMAGE, TEXT), ("atc", AUDIO, TEXT)),
                       ("text", "image", "audio", "m_text", "m_image", "m_audio", "m_text+image", "m_text+audio"),
                       ("text+image", "text+audio"), _STAGE1_DCL + _STAGE2_DCL),
}


@dataclass
class SampleMasks:
    """Kept positions (CLS = 0 included) of one sample in each masked view."""

    keep: dict[str, torch.Tensor] = field(default_factory=dict)


class OnePeaceRecipe:
    name = "one-peace"

    def __init__(self, stage: str, word_start: torch.Tensor, eos_id: int | None, gather_grad: bool = False) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown ONE-PEACE stage {stage!r}; choose one of {STAGES}")
        self.stage, self.plan = stage, PLANS[stage]
        self.word_start, self.eos_id, self.gather_grad = word_start, eos_id, gather_grad
        self.loss_names = tuple(c[0] for c in self.plan.contrast) + tuple(d.name for d in self.plan.dcl)
        self._frozen_rows: dict[str, torch.Tensor] = {}  # stage 2: parameter name -> its frozen rows' values

    # ------------------------------------------------------------------ model set-up
    def attach(self, model: OmniModel) -> None:
        """Give the model its pre-training decoder (saved with it in checkpoints)."""
        if not hasattr(model, "dcl_decoder"):
            rows = position_rows(model)
            device = next(model.parameters()).device
            model.add_module("dcl_decoder", MaskedDecoder(model.cfg, rows).to(device))

    def prepare(self, model: OmniModel, reset_logit_scale: bool) -> None:
        """Stage 2 freezes what ONE-PEACE freezes; a new stage resets the logit scale."""
        if reset_logit_scale:
            with torch.no_grad():
                model.logit_scale.fill_(torch.tensor(1 / 0.07).log().item())
        self._frozen_rows = {}
        if self.stage != "2":
            model.requires_grad_(True)
            return
        model.requires_grad_(False)
        for module in (model.audio, model.heads[AUDIO], model.dcl_decoder):
            module.requires_grad_(True)
        model.logit_scale.requires_grad_(True)
        # The audio FFNs and the audio final norm are the AUDIO rows of modality-stacked
        # parameters: they train; the other rows' gradients are zeroed as they arrive (before
        # clipping) and their values restored after every step (AdamW's weight decay moves them).
        # The hook sees the gradient after accumulation: under FSDP2, this rank's shard after the
        # reduce-scatter (dist.wrap_model moves the hook to the sharded parameter).
        for block in model.blocks:
            block.ffn.requires_grad_(True)
        model.final_norm.requires_grad_(True)
        for name, p in model.named_parameters():
            if name.startswith("final_norm.") or (name.startswith("blocks.") and ".ffn." in name):
                p.register_post_accumulate_grad_hook(functools.partial(self._freeze_rows, name))

    def _freeze_rows(self, name: str, p: torch.Tensor) -> None:
        """Zero the frozen rows of ``p``'s gradient; on the first call, keep their values (this rank's
        rows only), which no optimizer step has touched yet (a resumed run: the loaded ones)."""
        grad, first = local_rows(p.grad)
        frozen = _non_audio_rows(p.shape[0], grad.device)[first:first + grad.shape[0]]
        with torch.no_grad():
            grad[frozen] = 0
            if name not in self._frozen_rows:
                self._frozen_rows[name] = local_rows(p.detach())[0][frozen].clone()

    def after_step(self, model: OmniModel) -> None:
        """Undo weight decay on the frozen rows of stacked parameters (stage 2)."""
        with torch.no_grad():
            for name, saved in self._frozen_rows.items():
                p = model.get_parameter(name)
                local, first = local_rows(p.detach())
                local[_non_audio_rows(p.shape[0], local.device)[first:first + local.shape[0]]] = saved

    # ------------------------------------------------------------------ the step
    def draw_masks(self, model: OmniModel, samples: list[Sample], g: torch.Generator) -> list[SampleMasks]:
        views = set(self.plan.student)
        out = []
        for s in samples:
            m = SampleMasks()
            n_text, eos = self._text_units(s.token_ids)
            starts = self.word_start[s.token_ids[:n_text].long()]
            if "m_text" in views or "m_text+image" in views:
                text = masking.whole_word_mask(starts, RATIOS["text"], g)
                m.keep["m_text"] = masking.keep_positions(text, eos)
                m.keep["m_text+image:text"] = masking.keep_positions(
                    masking.complementary_mask(text, RATIOS["joint_text"], g), eos)
            if "m_image" in views:
                n = model.image.grid ** 2
                image = masking.random_mask(n, RATIOS["image"], g)
                m.keep["m_image"] = masking.keep_positions(image)
                m.keep["m_text+image:image"] = masking.keep_positions(
                    masking.complementary_image_mask(image, RATIOS["joint_image"], g))
            if "m_audio" in views:
                n = model.audio.num_frames(s.audio.numel())
                m.keep["m_audio"] = masking.keep_positions(masking.block_mask_1d(n, RATIOS["audio"], AUDIO_SPAN, g))
                m.keep["m_text+audio:audio"] = masking.keep_positions(
                    masking.block_mask_1d(n, RATIOS["joint_audio"], AUDIO_SPAN, g))
                m.keep["m_text+audio:text"] = masking.keep_positions(
                    masking.whole_word_mask(starts, RATIOS["joint_text"], g), eos)
            out.append(m)
        return out

    def _text_units(self, ids: torch.Tensor) -> tuple[int, int]:
        """Maskable caption tokens and the number of trailing EOS tokens (never masked)."""
        eos = int(self.eos_id is not None and ids.numel() > 0 and int(ids[-1]) == self.eos_id)
        return ids.numel() - eos, eos

    def sequences(self, view: str, i: int, masks: SampleMasks) -> list[SegmentRef]:
        """The segments of sample ``i`` in ``view``."""
        mods = view_modalities(view)
        if not view.startswith("m_"):
            return [SegmentRef(m, i) for m in mods]
        if len(mods) == 1:
            return [SegmentRef(mods[0], i, masks.keep[view])]
        return [SegmentRef(m, i, masks.keep[f"{view}:{_NAME[m]}"]) for m in mods]

    def step(self, model: OmniModel, samples: list[Sample], g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The loss of one step (to be backpropagated) and its parts as floats."""
        masks = self.draw_masks(model, samples, g)
        feats = self.forward(model, samples, masks)
        return self.loss(model, feats, samples, masks)

    def forward(self, model: OmniModel, samples: list[Sample], masks: list[SampleMasks]) -> dict:
        """Encoder (grad), encoder (no grad) and decoder passes; per view and sample, the
        token features of each segment; ``"decoded"``: the decoder's masked predictions."""
        embedded = model.embed(self.inputs(model, samples))
        out: dict = {}
        features, spans = self._encode(model, embedded, self.plan.student, masks, out)
        with torch.no_grad():
            self._encode(model, embedded, self.plan.frozen, masks, out)
        out["decoded"] = self._decode(model, features, spans, samples, masks)
        return out

    def inputs(self, model: OmniModel, samples: list[Sample]) -> ModalInputs:
        """The step's samples, only the modalities its views use, on the model's device."""
        device = next(model.parameters()).device
        used = {m for v in self.plan.student + self.plan.frozen for m in view_modalities(v)}
        return ModalInputs(
            text=[s.token_ids.to(device) for s in samples] if TEXT in used else [],
            image=torch.stack([s.image for s in samples]).to(device) if IMAGE in used else None,
            audio=[s.audio.to(device) for s in samples] if AUDIO in used else [])

    def _encode(self, model, embedded, views, masks, out) -> tuple[torch.Tensor, dict]:
        """One packed pass over ``views``; fills ``out[view]`` and returns the features and,
        per view, each sample's segment spans in the pass."""
        n = len(masks)
        sequences = [self.sequences(v, i, masks[i]) for v in views for i in range(n)]
        batch = model.pack(embedded, sequences)
        features = model.encode(batch)
        spans: dict[int, list] = {}
        parts: dict[int, list[torch.Tensor]] = {}
        # split, not a slice per segment: backward concatenates instead of zero-filling [T, D] each time
        for span, part in zip(batch.segments, torch.split(features, [s.length for s in batch.segments])):
            spans.setdefault(span.sequence, []).append(span)
            parts.setdefault(span.sequence, []).append(part)
        for k, v in enumerate(views):
            out[v] = [parts[k * n + i] for i in range(n)]
        return features, {v: [spans[k * n + i] for i in range(n)] for k, v in enumerate(views)}

    def _decode(self, model, features, spans, samples, masks) -> dict[tuple[str, int, int], torch.Tensor]:
        sequences, keys = [], []
        for v in (v for v in self.plan.student if v.startswith("m_")):
            for i in range(len(samples)):
                row = []
                for ref, span in zip(self.sequences(v, i, masks[i]), spans[v][i]):
                    length = full_length(model, samples[i], ref.modality)
                    rows = torch.arange(span.start, span.start + span.length)
                    row.append(DecoderSegment(ref.modality, length, ref.keep, rows))
                    keys.append((v, i, ref.modality, length - ref.keep.numel()))
                sequences.append(row)
        predictions, _, _ = model.dcl_decoder(features, sequences)
        parts = predictions.split([k[3] for k in keys])
        return {k[:3]: p for k, p in zip(keys, parts)}

    def loss(self, model: OmniModel, feats: dict, samples: list[Sample], masks: list[SampleMasks]
             ) -> tuple[torch.Tensor, dict]:
        parts: dict[str, torch.Tensor] = {}
        scale = logit_scale_exp(model.logit_scale)
        for name, a_mod, b_mod in self.plan.contrast:
            a = model.project(torch.stack([seq[0][0] for seq in feats[_NAME[a_mod]]]), a_mod)
            b = model.project(torch.stack([seq[0][0] for seq in feats[_NAME[b_mod]]]), b_mod)
            a_all, offset = gather_candidates(a, self.gather_grad)
            b_all, _ = gather_candidates(b, self.gather_grad)
            parts[name] = cross_modal_contrast(a, b, scale, a_all, b_all, offset)
        for term in self.plan.dcl:
            parts[term.name] = self._dcl(term, feats, masks)
        total = sum(parts[name] for name, _, _ in self.plan.contrast)
        total = total + sum(t.weight * parts[t.name] for t in self.plan.dcl)
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def _dcl(self, term: Dcl, feats: dict, masks: list[SampleMasks]) -> torch.Tensor:
        teacher_rows, predictions, targets, offset = [], [], [], 0
        mods = view_modalities(term.teacher)
        for i, seq in enumerate(feats[term.teacher]):
            tokens = seq[mods.index(term.modality)][1:]  # CLS is never a target nor a negative
            teacher_rows.append(tokens)
            ref = next(r for r in self.sequences(term.view, i, masks[i]) if r.modality == term.modality)
            full = tokens.shape[0] + 1
            hidden = torch.ones(full, dtype=torch.bool)
            hidden[ref.keep] = False
            predictions.append(feats["decoded"][(term.view, i, term.modality)])
            targets.append(hidden.nonzero().flatten() - 1 + offset)
            offset += tokens.shape[0]
        student = torch.cat(predictions)
        if student.shape[0] == 0:
            return student.sum() * 0.0
        teacher = torch.cat(teacher_rows)
        return denoising_contrast(student, teacher, torch.cat(targets).to(student.device))


_MODALITY = {"text": TEXT, "image": IMAGE, "audio": AUDIO}
_NAME = {TEXT: "text", IMAGE: "image", AUDIO: "audio"}


def position_rows(model: OmniModel) -> tuple[int, int, int]:
    """Decoder position rows per modality: the longest input each can see, CLS included."""
    return (model.cfg.text_positions, model.image.grid ** 2 + 1, model.cfg.audio_max_frames + 1)


def view_modalities(view: str) -> list[int]:
    """The modality of each segment of a view (``"m_text+image"`` → [TEXT, IMAGE])."""
    return [_MODALITY[n] for n in view.removeprefix("m_").split("+")]


def gather_candidates(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, int]:
    """Every rank's rows (ONE-PEACE: without gradient) and this rank's offset among them."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return (x if with_grad else x.detach()), 0
    from omni_core.train.dist import gather_rows

    return gather_rows(x if with_grad else x.detach(), with_grad=with_grad)


def _non_audio_rows(rows: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(rows, dtype=torch.bool, device=device)
    mask[AUDIO] = False
    return mask


def full_length(model: OmniModel, sample: Sample, modality: int) -> int:
    """Tokens of a sample's unmasked segment, CLS included."""
    if modality == TEXT:
        return sample.token_ids.numel() + 1
    if modality == IMAGE:
        return model.image.grid ** 2 + 1
    return model.audio.num_frames(sample.audio.numel()) + 1
