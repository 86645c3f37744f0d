"""Gradient accumulation (``--accum K``): what is exact, and the trainer's use of it.

An optimizer step over K micro-batches backpropagates each micro-batch's loss / K, so its gradient
is the mean of the micro-batches' gradients. That equals one batch of all K·B samples exactly when
the batch loss is the mean of per-sample terms over equal micro-batches. A contrastive loss with
in-batch negatives is not: each micro-batch is scored against its own negatives (as ONE-PEACE's
fairseq ``update_freq`` does), so there accumulation is the mean of K smaller batches' losses, not
the loss of one K-times larger batch. The tests use a per-sample loss (each sample's image and
audio pulled towards its caption, no negatives) where the equality must hold.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_dist import SMALL, stage2_samples

from omni_core.model.omni import AUDIO, IMAGE, TEXT, OmniModel
from omni_core.recipes.contrastive import triplet_embeddings
from omni_core.train import trainer
from omni_core.train.trainer import TrainArgs, make_optimizer, train_step


class AlignRecipe:
    """Each sample's image and audio embeddings towards its caption's (cosine, scaled by the
    logit scale so that it trains too); a batch's loss is the mean over its samples."""

    name = "align"
    loss_names = ("align",)

    def attach(self, model: OmniModel) -> None:
        return None

    def prepare(self, model: OmniModel, reset_logit_scale: bool) -> None:
        model.requires_grad_(True)

    def after_step(self, model: OmniModel) -> None:
        return None

    def step(self, model: OmniModel, samples, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        emb = triplet_embeddings(model, samples)
        cosine = (emb[IMAGE] * emb[TEXT]).sum(-1) + (emb[AUDIO] * emb[TEXT]).sum(-1)
        loss = -(model.logit_scale.exp() * cosine).mean()
        return loss, {"align": float(loss.detach())}


def grads_after(micro: list, samples_per_step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", **SMALL).double()
    optimizer = make_optimizer(model, TrainArgs(data="", out="", lr=0.0))
    row = train_step(model, AlignRecipe(), optimizer, 0.0, 1e30, micro, torch.device("cpu"),
                     torch.Generator().manual_seed(0))  # lr 0, no clipping: the gradient stays as computed
    assert row["tokens"] > 0 and sum(len(m) for m in micro) == samples_per_step
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_k_micro_batches_equal_one_batch_gradient():
    samples = stage2_samples(6, seed=4)
    whole = grads_after([samples], 6)
    for micro in ([samples[:3], samples[3:]], [samples[:2], samples[2:4], samples[4:]]):
        accumulated = grads_after(micro, 6)
        assert accumulated.keys() == whole.keys() and "logit_scale" in whole
        for name, g in whole.items():
            assert (accumulated[name] - g).norm() <= 1e-10 * max(g.norm(), 1e-30), name


def run(dataset: Path, out: Path, monkeypatch, **kw) -> list[dict]:
    monkeypatch.setattr(trainer, "make_recipe", lambda *a, **k: AlignRecipe())
    trainer.train(TrainArgs(data=str(dataset), out=str(out), steps=3, warmup_steps=1, seed=2, loader="pil",
                            progress=False, precision="fp32", **kw))
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_trainer_accum_steps_equal_big_batch_steps(dataset, tmp_path, monkeypatch):
    """``--accum 2 --batch-size 4`` takes the same 8 samples per optimizer step as ``--batch-size 8``
    and, for a per-sample loss, the same loss curve (fp32: packing 4 or 8 sequences reorders sums)."""
    big = run(dataset, tmp_path / "big", monkeypatch, batch_size=8)
    accum = run(dataset, tmp_path / "accum", monkeypatch, batch_size=4, accum=2)
    assert [r["step"] for r in accum] == [r["step"] for r in big] == ["1", "2", "3"]
    for a, b in zip(accum, big):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        for key in ("loss", "align", "logit_scale"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), (a["step"], key)
    assert float(big[0]["loss"]) != pytest.approx(float(big[2]["loss"]), rel=1e-3)  # it trains
