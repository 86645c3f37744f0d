"""The packed pre-training step and ONE-PEACE's padded multi-pass step, side by side.

``packed_step`` runs the student's views of a step as one packed forward and the teacher's
as one packed no-grad forward. ``padded_step`` reproduces the released ONE-PEACE trainer:
one padded forward per view, key-padding masks, the relative-position bias built per modality block
of each padded pass, and each FFN applied to the slice of positions its modality occupies.
Both use the same weights and the same loss code, so a test can demand equal results.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from omni_core.model.omni import AUDIO, IMAGE, TEXT, Block, OmniModel
from omni_core.train.objectives import ViewFeatures, cls_embeddings, info_nce, masked_feature_loss
from omni_core.train.views import View


@contextmanager
def teacher_mode(model: OmniModel):
    """No gradients and no stochastic depth: the teacher is the model on unmasked input."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def step_loss(model: OmniModel, student: ViewFeatures, teacher: ViewFeatures, views: list[View]) -> torch.Tensor:
    """Cross-modal InfoNCE over the unimodal views + masked feature loss against the teacher."""
    text_view, other_view = views[0].name, views[1].name
    other = IMAGE if other_view == "image" else AUDIO
    contrastive = info_nce(cls_embeddings(model, student, text_view, TEXT),
                           cls_embeddings(model, student, other_view, other), model.logit_scale)
    return contrastive + masked_feature_loss(student, teacher, views)


def _unmasked(views: list[View]) -> list[View]:
    return [v for v in views if v.target is None]


def _student(views: list[View]) -> list[View]:
    return [v for v in views if v.student]


# ---------------------------------------------------------------- packed: one pass
def packed_forward(model: OmniModel, embedded: list[list[torch.Tensor]], views: list[View]) -> ViewFeatures:
    sequences = [seq for view in views for seq in view.sequences]
    batch = model.pack(embedded, sequences)
    features = model.encode(batch)
    per_sequence: list[list[torch.Tensor]] = [[] for _ in sequences]
    # split (not slicing per segment): backward concatenates instead of zero-filling [T, D] per segment
    for span, part in zip(batch.segments, torch.split(features, [s.length for s in batch.segments])):
        per_sequence[span.sequence].append(part)
    out, first = {}, 0
    for view in views:
        out[view.name] = per_sequence[first:first + len(view.sequences)]
        first += len(view.sequences)
    return out


def packed_step(model: OmniModel, inputs, views: list[View]) -> tuple[torch.Tensor, ViewFeatures, ViewFeatures]:
    """Returns (loss, student features, teacher features)."""
    student = packed_forward(model, model.embed(inputs), _student(views))
    with teacher_mode(model):
        teacher = packed_forward(model, model.embed(inputs), _unmasked(views))
    return step_loss(model, student, teacher, views), student, teacher


# ---------------------------------------------------------------- padded: a pass per view
def padded_forward(model: OmniModel, embedded: list[list[torch.Tensor]], views: list[View]) -> ViewFeatures:
    return {view.name: _padded_view(model, embedded, view) for view in views}


def padded_step(model: OmniModel, inputs, views: list[View]) -> tuple[torch.Tensor, ViewFeatures, ViewFeatures]:
    """Returns (loss, student features, teacher features)."""
    student = padded_forward(model, model.embed(inputs), _student(views))
    with teacher_mode(model):
        teacher = padded_forward(model, model.embed(inputs), _unmasked(views))
    return step_loss(model, student, teacher, views), student, teacher


def _padded_view(model: OmniModel, embedded: list[list[torch.Tensor]], view: View) -> list[list[torch.Tensor]]:
    """One padded pass: every sequence of the view has the same modality layout; each
    modality slot is padded to its longest member and the slots are concatenated."""
    slot_modality = [ref.modality for ref in view.sequences[0]]
    tokens, positions = [], []
    for seq in view.sequences:
        if [ref.modality for ref in seq] != slot_modality:
            raise ValueError(f"view {view.name!r} mixes modality layouts; a padded pass needs one")
        row_t, row_p = [], []
        for ref in seq:
            t = embedded[ref.modality][ref.index]
            p = torch.arange(t.shape[0])
            if ref.keep is not None:
                t, p = t[ref.keep], ref.keep
            row_t.append(t)
            row_p.append(p)
        tokens.append(row_t)
        positions.append(row_p)
    B, D = len(tokens), tokens[0][0].shape[-1]
    slot_len = [max(row[s].shape[0] for row in tokens) for s in range(len(slot_modality))]
    bounds = [sum(slot_len[:s]) for s in range(len(slot_len) + 1)]
    x = tokens[0][0].new_zeros(B, bounds[-1], D)
    pos = torch.zeros(B, bounds[-1], dtype=torch.long)
    valid = torch.zeros(B, bounds[-1], dtype=torch.bool)
    for b, (row_t, row_p) in enumerate(zip(tokens, positions)):
        for s, (t, p) in enumerate(zip(row_t, row_p)):
            x[b, bounds[s]:bounds[s] + t.shape[0]] = t
            pos[b, bounds[s]:bounds[s] + t.shape[0]] = p
            valid[b, bounds[s]:bounds[s] + t.shape[0]] = True
    slots = [(m, bounds[s], bounds[s + 1]) for s, m in enumerate(slot_modality)]
    # Modality by position within the pass (padding included, as in the padded original).
    by_position = torch.cat([torch.full((b - a,), m, dtype=torch.int32) for m, a, b in slots])
    by_position = by_position.repeat(B)
    bias_rows = _padded_bias_rows(model.bias_lut, pos, slots)  # per pass, shared by its layers
    for block in model.blocks:
        x = _padded_block(block, x, valid, bias_rows, by_position)
    x = model.final_norm(x.reshape(-1, D), by_position).view(B, -1, D)
    return [[x[b, bounds[s]:bounds[s] + row[s].shape[0]] for s in range(len(slots))]
            for b, row in enumerate(tokens)]


def _padded_block(block: Block, x, valid, bias_rows, by_position) -> torch.Tensor:
    B, L, D = x.shape
    attn = block.attn
    H, Dh = attn.num_heads, attn.head_dim
    h = F.layer_norm(x, (D,), block.attn_norm.weight, block.attn_norm.bias, block.attn_norm.eps)
    q, k, v = (proj(h).view(B, L, H, Dh).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    if attn.bias_table is not None:
        logits = logits + _padded_bias(attn.bias_table, bias_rows, B, H, L)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(B, L, D)
    if attn.sub_ln is not None:
        out = attn.sub_ln(out)
    out = attn.out_proj(out)
    x = x + (out * block.gamma_attn if block.gamma_attn is not None else out)
    flat = x.reshape(-1, D)
    out = block.ffn(block.ffn_norm(flat, by_position), by_position).view(B, L, D)
    return x + (out * block.gamma_ffn if block.gamma_ffn is not None else out)


def _padded_bias_rows(bias_lut, pos, slots) -> list:
    """Per modality slot of a padded pass: its bounds, the bias_table row of each
    (query, key) pair and the mask of pairs with a bias."""
    rows = []
    for m, a, b in slots:
        p = pos[:, a:b]
        entry = bias_lut[m][p[:, :, None], p[:, None, :]].long()
        rows.append((a, b, entry.clamp(min=0).flatten(), (entry >= 0)[..., None]))
    return rows


def _padded_bias(table, bias_rows, B, H, L) -> torch.Tensor:
    """``[B, H, L, L]``: each modality slot's own bias block; nothing across slots."""
    bias = table.new_zeros(B, H, L, L)
    for a, b, entry, keep in bias_rows:
        block = table.index_select(0, entry).view(B, b - a, b - a, H) * keep
        bias[:, :, a:b, a:b] = block.permute(0, 3, 1, 2)
    return bias


__all__ = ["packed_forward", "packed_step", "padded_forward", "padded_step", "step_loss"]
