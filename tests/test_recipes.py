"""Recipe behaviour: what stage 2 trains and freezes, the logit-scale reset, deterministic masks."""

import math

import pytest
import torch

from omni_core.data.sample import Sample
from omni_core.model.omni import AUDIO, IMAGE, TEXT, OmniModel
from omni_core.recipes.one_peace import OnePeaceRecipe
from omni_core.train.trainer import TrainArgs, make_optimizer, train_step

EOS = 3


def samples(model, n=3):
    out = []
    for i in range(n):
        ids = torch.cat([torch.randint(5, model.cfg.vocab_size, (6 + i,)), torch.tensor([EOS])])
        out.append(Sample(f"s{i}", torch.randn(3, 64, 64), torch.randn(16000 + 4000 * i), "", ids))
    return out


def setup(stage):
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny", depth=1)
    recipe = OnePeaceRecipe(stage, word_start=torch.ones(model.cfg.vocab_size, dtype=torch.bool), eos_id=EOS)
    recipe.attach(model)
    return model, recipe


def test_stage2_trains_only_the_audio_tower_and_resets_the_logit_scale():
    model, recipe = setup("2")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    recipe.prepare(model, reset_logit_scale=True)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, TrainArgs(data="", out=""))
    for step in range(2):
        train_step(model, recipe, opt, 1e-3, 3.0, samples(model), torch.device("cpu"),
                   torch.Generator().manual_seed(step))
    after = model.state_dict()

    def changed(key, rows=None):
        a, b = before[key], after[key]
        return not torch.equal(a if rows is None else a[rows], b if rows is None else b[rows])

    ffn = "blocks.0.ffn."
    for name in ("w_in", "w_gate", "w_out", "b_out", "ln_weight"):
        assert changed(ffn + name, AUDIO), name  # the audio FFN trains
        assert not changed(ffn + name, TEXT) and not changed(ffn + name, IMAGE), name  # the others do not
    assert changed("final_norm.weight", AUDIO) and not changed("final_norm.weight", TEXT)
    assert any(changed(k) for k in after if k.startswith("audio."))
    assert changed("heads.2.weight") and changed("logit_scale")
    frozen = [k for k in after if k.startswith(("text.", "image.", "blocks.0.attn", "heads.0", "heads.1"))]
    assert frozen and not any(changed(k) for k in frozen)
    assert any(changed(k) for k in after if k.startswith("dcl_decoder."))


@pytest.mark.parametrize("stage", ["1", "joint"])
def test_other_stages_train_everything_they_use(stage):
    model, recipe = setup(stage)
    recipe.prepare(model, reset_logit_scale=False)
    assert all(p.requires_grad for p in model.parameters())
    loss, parts = recipe.step(model, samples(model), torch.Generator().manual_seed(0))
    loss.backward()
    assert set(parts) == set(recipe.loss_names) and all(math.isfinite(v) for v in parts.values())
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert model.dcl_decoder.mask_token.grad.abs().sum() > 0


def test_masks_are_drawn_from_the_step_generator():
    model, recipe = setup("joint")
    s = samples(model)
    a = recipe.draw_masks(model, s, torch.Generator().manual_seed(5))
    b = recipe.draw_masks(model, s, torch.Generator().manual_seed(5))
    c = recipe.draw_masks(model, s, torch.Generator().manual_seed(6))
    assert all(torch.equal(x.keep[k], y.keep[k]) for x, y in zip(a, b) for k in x.keep)
    assert any(not torch.equal(x.keep[k], y.keep[k]) for x, y in zip(a, c) for k in x.keep)


def test_unknown_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="stage"):
        OnePeaceRecipe("3", torch.ones(10, dtype=torch.bool), EOS)
