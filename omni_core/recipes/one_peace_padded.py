"""ONE-PEACE's released pre-training step, padded pass by pass: the faithful baseline.

The released criterions run one padded encoder pass per view — stage 1: text, image, joint
text+image (no grad), masked text, masked image, masked joint; stage 2: text (no grad),
audio, joint text+audio (no grad), masked audio, masked joint — and one padded decoder
pass per masked view over the full-length input. Each pass pads every modality slot to its
longest member (the joint views concatenate the padded slots), masks padded keys with -inf
in a ``[B, H, L, L]`` bias that also carries each modality's relative-position block, runs
each modality's FFN on the positions its slot occupies (padding included) and so spends
FLOPs on padding. Weights and loss code are the packed recipe's, so the two steps must give
the same features, loss and gradients (``tests/test_packed_vs_padded.py``); the benchmark
(``omni bench packing``) times both.

One deliberate difference from the released code: the audio adapter runs per clip (as in
the packed engine) instead of over the zero-padded batch, whose padding leaks into the last
frames of short clips through the positional convolution (``shared/ONE-PEACE.md`` §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omni_core.data.sample import Sample
from omni_core.model.decoder import MaskedDecoder
from omni_core.model.omni import Block, OmniModel
from omni_core.recipes.one_peace import OnePeaceRecipe, SampleMasks, full_length


@dataclass
class PaddedLayout:
    """One padded pass: ``[B, L]`` layout of the view's slots (one per modality segment)."""

    slots: list[tuple[int, int, int]]  # (modality, start, end) along L
    lengths: list[list[int]]  # per sample, the real length of each slot
    valid: torch.Tensor  # bool [B, L]
    position: torch.Tensor  # long [B, L]: original positions (masked views keep theirs)
    modality: torch.Tensor  # int32 [L]: the slot's modality at every position

    @property
    def tokens(self) -> int:
        return self.valid.numel()


def layout(rows: list[list[tuple[int, torch.Tensor]]], device) -> PaddedLayout:
    """``rows[b]`` = per slot (modality, positions of the real tokens)."""
    mods = [m for m, _ in rows[0]]
    slot_len = [max(row[s][1].numel() for row in rows) for s in range(len(mods))]
    bounds = [0]
    for n in slot_len:
        bounds.append(bounds[-1] + n)
    B, L = len(rows), bounds[-1]
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    position = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        for s, (_, pos) in enumerate(row):
            valid[b, bounds[s]:bounds[s] + pos.numel()] = True
            position[b, bounds[s]:bounds[s] + pos.numel()] = pos.to(device)
    modality = torch.cat([torch.full((n,), m, dtype=torch.int32, device=device) for m, n in zip(mods, slot_len)])
    return PaddedLayout([(m, bounds[s], bounds[s + 1]) for s, m in enumerate(mods)],
                        [[pos.numel() for _, pos in row] for row in rows], valid, position, modality)


def scatter(lay: PaddedLayout, segments: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per sample, per slot tokens ``[n, D]`` → padded ``[B, L, D]`` (zeros in padding)."""
    first = segments[0][0]
    x = first.new_zeros(len(segments), lay.valid.shape[1], first.shape[-1])
    for b, row in enumerate(segments):
        for (_, start, _), t in zip(lay.slots, row):
            x[b, start:start + t.shape[0]] = t
    return x


def gather(lay: PaddedLayout, x: torch.Tensor) -> list[list[torch.Tensor]]:
    return [[x[b, start:start + n] for (_, start, _), n in zip(lay.slots, lens)] for b, lens in enumerate(lay.lengths)]


def padded_bias(model: OmniModel, lay: PaddedLayout, table: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, L]``: -inf on padded keys, each slot's relative-position block, 0 across slots."""
    B, L = lay.valid.shape
    bias = table.new_zeros(B, table.shape[1], L, L)
    for m, a, b in lay.slots:
        p = lay.position[:, a:b]
        entry = model.bias_lut[m][p[:, :, None], p[:, None, :]].long()
        block = table[entry.clamp(min=0)] * (entry >= 0)[..., None]
        bias[:, :, a:b, a:b] = block.permute(0, 3, 1, 2)
    return bias.masked_fill(~lay.valid[:, None, None, :], float("-inf"))


def padded_block(block: Block, x: torch.Tensor, bias: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """One pre-LN layer over ``[B, L, D]``, as the released layer computes it."""
    B, L, D = x.shape
    attn = block.attn
    H, Dh = attn.num_heads, attn.head_dim
    h = F.layer_norm(x, (D,), block.attn_norm.weight, block.attn_norm.bias, block.attn_norm.eps)
    q, k, v = (proj(h).view(B, L, H, Dh).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = q @ k.transpose(-1, -2) / math.sqrt(Dh) + bias
    out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(B, L, D)
    if attn.sub_ln is not None:
        out = attn.sub_ln(out)
    out = attn.out_proj(out)
    x = x + (out * block.gamma_attn if block.gamma_attn is not None else out)
    h = F.layer_norm(x, (D,), block.ffn_norm.weight, block.ffn_norm.bias, block.ffn_norm.eps)
    out = block.ffn(h.reshape(-1, D), modality.repeat(B)).view(B, L, D)
    return x + (out * block.gamma_ffn if block.gamma_ffn is not None else out)


def encoder_pass(model: OmniModel, embedded, refs_per_sample, table) -> tuple[list[list[torch.Tensor]], PaddedLayout]:
    flat = [ref for refs in refs_per_sample for ref in refs]
    segs = iter(model.segment_tokens(embedded, flat))
    rows, tokens = [], []
    for refs in refs_per_sample:
        row_t, row_p = [], []
        for ref in refs:
            t, p = next(segs)
            row_t.append(t)
            row_p.append((ref.modality, p if p is not None else torch.arange(t.shape[0])))
        tokens.append(row_t)
        rows.append(row_p)
    lay = layout(rows, table.device)
    x = scatter(lay, tokens)
    bias = padded_bias(model, lay, table)
    for block in model.blocks:
        x = padded_block(block, x, bias, lay.modality)
    B, L, D = x.shape
    x = model.final_norm(x.reshape(-1, D), lay.modality.repeat(B)).view(B, L, D)
    return gather(lay, x), lay


def decoder_pass(dec: MaskedDecoder, encoded: list[list[torch.Tensor]], refs_per_sample, lengths
                 ) -> list[list[torch.Tensor]]:
    """The released decoder over one masked view: full-length inputs, mask tokens at the
    masked positions. Returns, per sample and slot, predictions at the masked positions."""
    rows = [[(ref.modality, torch.arange(n)) for ref, n in zip(refs, lens)]
            for refs, lens in zip(refs_per_sample, lengths)]
    lay = layout(rows, encoded[0][0].device)
    B, L = lay.valid.shape
    Dd = dec.cfg.dim
    x = dec.mask_token[lay.modality.long()].expand(B, L, Dd).clone()
    masked = torch.zeros(B, L, dtype=torch.bool, device=x.device)
    for b, refs in enumerate(refs_per_sample):
        for (m, start, _), ref, feats, n in zip(lay.slots, refs, encoded[b], lay.lengths[b]):
            x[b, start + ref.keep] = dec.embed_in[m](feats).to(x.dtype)  # bf16 under autocast
            hidden = torch.ones(n, dtype=torch.bool, device=x.device)
            hidden[ref.keep] = False
            hidden[0] = False
            masked[b, start:start + n] = hidden
    x = x + dec.positions[dec.position_offset[lay.modality.long()] + lay.position]
    bias = x.new_zeros(B, 1, L, L).masked_fill(~lay.valid[:, None, None, :], float("-inf"))
    for block in dec.blocks:
        x = padded_block(block, x, bias, lay.modality)
    x = dec.final_norm(x.reshape(-1, Dd), lay.modality.repeat(B)).view(B, L, Dd)
    out = []
    for b in range(B):
        out.append([dec.heads[m](x[b, start:start + n][masked[b, start:start + n]])
                    for (m, start, _), n in zip(lay.slots, lay.lengths[b])])
    return out


def padded_forward(recipe: OnePeaceRecipe, model: OmniModel, samples: list[Sample],
                   masks: list[SampleMasks]) -> dict:
    """The released step's passes; returns the packed recipe's feature dict."""
    plan = recipe.plan
    embedded = model.embed(recipe.inputs(model, samples))
    table = model.bias_table()
    n = len(samples)
    out: dict = {}
    for view in plan.student + plan.frozen:
        refs = [recipe.sequences(view, i, masks[i]) for i in range(n)]
        with torch.set_grad_enabled(view in plan.student and torch.is_grad_enabled()):
            out[view], _ = encoder_pass(model, embedded, refs, table)
    decoded = {}
    for view in plan.student:
        if not view.startswith("m_"):
            continue
        refs = [recipe.sequences(view, i, masks[i]) for i in range(n)]
        lengths = [[full_length(model, samples[i], r.modality) for r in refs[i]] for i in range(n)]
        preds = decoder_pass(model.dcl_decoder, out[view], refs, lengths)
        for i in range(n):
            for ref, p in zip(refs[i], preds[i]):
                decoded[(view, i, ref.modality)] = p
    out["decoded"] = decoded
    return out


def padded_step(recipe: OnePeaceRecipe, model: OmniModel, samples: list[Sample], g: torch.Generator
                ) -> tuple[torch.Tensor, dict]:
    masks = recipe.draw_masks(model, samples, g)
    return recipe.loss(model, padded_forward(recipe, model, samples, masks), samples, masks)
