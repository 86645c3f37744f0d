"""ONE-PEACE's pre-training losses, each a plain function of tensors (testable alone).

* :func:`cross_modal_contrast` — symmetric InfoNCE between two modalities' L2-normalised CLS
  embeddings, as ``compute_itc_loss`` / ``compute_atc_loss`` in the released criterions:
  each direction's candidates enter **without gradient** (``text_logits.data`` in one
  process, ``gather_without_grad`` across ranks), no label smoothing.
* :func:`denoising_contrast` — the intra-modal denoising contrast (``compute_dcl_loss``): for
  every masked unit, logits = 2.5 × cosine(student prediction, every non-CLS, non-padding
  teacher token of the local batch); the target is the teacher token at the same position;
  label-smoothed cross-entropy (ε = 0.1).
* :func:`label_smoothed_nll` — fairseq's ``adjust_label_smoothed_nll_loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DCL_LOGIT_SCALE = 2.5
DCL_LABEL_SMOOTHING = 0.1
MAX_LOGIT_SCALE = 100.0


def label_smoothed_nll(lprobs: torch.Tensor, target: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Mean over rows of ``(1 − ε − ε_i)·nll + ε_i·Σ(−lprobs)`` with ``ε_i = ε / (V − 1)``."""
    nll = -lprobs.gather(-1, target[:, None]).squeeze(-1)
    if epsilon == 0.0:
        return nll.mean()
    eps_i = epsilon / (lprobs.shape[-1] - 1)
    smooth = -lprobs.sum(-1)
    return ((1.0 - epsilon - eps_i) * nll + eps_i * smooth).mean()


def logit_scale_exp(logit_scale: torch.nn.Parameter) -> torch.Tensor:
    """ONE-PEACE clamps the parameter itself to [0, ln 100] (in place, no gradient) before
    every use, then exponentiates — so the gradient never vanishes at the clamp."""
    with torch.no_grad():
        logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))
    return logit_scale.exp()


def cross_modal_contrast(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                         a_all: torch.Tensor | None = None, b_all: torch.Tensor | None = None,
                         offset: int = 0) -> torch.Tensor:
    """``(CE(s·a @ b_allᵀ) + CE(s·b @ a_allᵀ)) / 2`` with targets ``offset + i``.

    ``a_all``/``b_all`` are the candidates of every rank (default: the local ``a``/``b``
    detached, as the released code). Pass them with gradient for ``--gather-grad``.
    """
    a_all = a.detach() if a_all is None else a_all
    b_all = b.detach() if b_all is None else b_all
    targets = torch.arange(a.shape[0], device=a.device) + offset
    ab = F.log_softmax(_upcast(scale * a @ b_all.t()), dim=-1)
    ba = F.log_softmax(_upcast(scale * b @ a_all.t()), dim=-1)
    return 0.5 * (label_smoothed_nll(ab, targets) + label_smoothed_nll(ba, targets))


def denoising_contrast(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                       scale: float = DCL_LOGIT_SCALE, epsilon: float = DCL_LABEL_SMOOTHING) -> torch.Tensor:
    """``student`` [N_masked, D]: predictions at masked units; ``teacher`` [N_tokens, D]: every
    non-CLS, non-padding teacher token of the view in the local batch (detached here);
    ``targets`` [N_masked]: the row of ``teacher`` at each prediction's position."""
    if student.shape[0] == 0:
        raise ValueError("denoising contrast needs at least one masked unit")
    s = F.normalize(_upcast(student), dim=-1)
    t = F.normalize(_upcast(teacher.detach()), dim=-1)
    return label_smoothed_nll(F.log_softmax(scale * s @ t.t(), dim=-1), targets, epsilon)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax statistics in at least float32, as fairseq's ``utils.log_softmax``."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
