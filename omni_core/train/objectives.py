"""Pre-training objectives on per-view outputs.

``ViewFeatures`` maps a view name to, per sequence, the token features of each of its
segments (``[L_seg, D]``, CLS first). Both the packed step and the padded baseline produce
this form, so the same loss code scores both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_core.train.views import View

ViewFeatures = dict[str, list[list[torch.Tensor]]]


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised embeddings ``[N, E]``; scale clamped at 100."""
    logits = logit_scale.exp().clamp(max=100.0) * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def cls_embeddings(model, feats: ViewFeatures, view: str, modality: int) -> torch.Tensor:
    cls = torch.stack([seq[0][0] for seq in feats[view]])
    return model.project(cls, modality)


def masked_feature_loss(student: ViewFeatures, teacher: ViewFeatures, views: list[View]) -> torch.Tensor:
    """1 − cosine between each kept token of a masked view and the teacher's feature of the
    same token in the unmasked view (targets carry no gradient)."""
    losses = []
    for view in views:
        if view.target is None:
            continue
        for seq_ref, seq_s, seq_t in zip(view.sequences, student[view.name], teacher[view.target]):
            for ref, s, t in zip(seq_ref, seq_s, seq_t):
                target = t.detach()[ref.keep] if ref.keep is not None else t.detach()
                losses.append(1.0 - F.cosine_similarity(s, target, dim=-1))
    return torch.cat(losses).mean()
