"""Plain cross-modal contrastive pre-training (CLIP-style): image–text and audio–text
symmetric InfoNCE on the CLS embeddings of one packed pass over every text, image and
audio of the step, gradients through both sides of every logit. No masked views, no
decoder: the cheapest recipe per step."""

from __future__ import annotations

import torch

from omni_core.data.sample import Sample
from omni_core.model.omni import AUDIO, IMAGE, TEXT, ModalInputs, OmniModel, SegmentRef
from omni_core.recipes.one_peace import gather_candidates
from omni_core.train.objectives import cross_modal_contrast, logit_scale_exp


class ContrastiveRecipe:
    name = "contrastive"
    loss_names = ("loss_image_text", "loss_audio_text")

    def __init__(self, gather_grad: bool = False) -> None:
        self.gather_grad = gather_grad

    def attach(self, model: OmniModel) -> None:
        return None

    def prepare(self, model: OmniModel, reset_logit_scale: bool) -> None:
        model.requires_grad_(True)
        if reset_logit_scale:
            with torch.no_grad():
                model.logit_scale.fill_(torch.tensor(1 / 0.07).log().item())

    def after_step(self, model: OmniModel) -> None:
        return None

    def step(self, model: OmniModel, samples: list[Sample], g: torch.Generator) -> tuple[torch.Tensor, dict]:
        emb = triplet_embeddings(model, samples)
        scale = logit_scale_exp(model.logit_scale)
        parts = {}
        for name, m in (("loss_image_text", IMAGE), ("loss_audio_text", AUDIO)):
            a, b = emb[m].float(), emb[TEXT].float()
            a_all, offset = gather_candidates(a, True)  # CLIP: candidates keep their gradient
            b_all, _ = gather_candidates(b, True)
            parts[name] = cross_modal_contrast(a, b, scale, a_all, b_all, offset)
        loss = parts["loss_image_text"] + parts["loss_audio_text"]
        return loss, {k: float(v.detach()) for k, v in parts.items()}


def triplet_embeddings(model: OmniModel, samples: list[Sample]) -> dict[int, torch.Tensor]:
    """L2-normalised embeddings of each modality of ``samples`` from one packed pass."""
    device = next(model.parameters()).device
    n = len(samples)
    inputs = ModalInputs(text=[s.token_ids.to(device) for s in samples],
                         image=torch.stack([s.image for s in samples]).to(device),
                         audio=[s.audio.to(device) for s in samples])
    sequences = [[SegmentRef(m, i)] for m in (TEXT, IMAGE, AUDIO) for i in range(n)]
    features, batch = model(inputs, sequences)
    cls = features[batch.cu_seqlens[:-1].long()]
    return {m: model.project(cls[k * n:(k + 1) * n], m) for k, m in enumerate((TEXT, IMAGE, AUDIO))}
