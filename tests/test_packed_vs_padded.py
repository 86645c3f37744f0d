"""The packed ONE-PEACE step computes what the released padded multi-pass step computes:
every view's features (student, teacher, decoder predictions), the loss, every gradient."""

import pytest
import torch

from omni_core.data.sample import Sample
from omni_core.model.omni import OmniModel
from omni_core.recipes.one_peace import OnePeaceRecipe
from omni_core.recipes.one_peace_padded import padded_forward

EOS = 3


def make(stage: str, dtype: torch.dtype, n: int = 4):
    model = OmniModel.from_preset("tiny", depth=2, layer_scale_init=0.5).to(dtype)
    recipe = OnePeaceRecipe(stage, word_start=torch.rand(model.cfg.vocab_size) < 0.6, eos_id=EOS)
    recipe.attach(model)
    model.to(dtype)
    with torch.no_grad():  # non-zero relative-position tables so the bias path matters
        for table in (model.text.bias_table, model.image.bias_table, model.audio.bias_table):
            table.normal_(std=0.5)
    samples = []
    for i, (n_tok, seconds) in enumerate(zip((3, 9, 17, 5), (0.7, 2.0, 1.3, 3.1))):
        ids = torch.cat([torch.randint(5, model.cfg.vocab_size, (n_tok,)), torch.tensor([EOS])])
        ids[0] = 5 + int(torch.randint(0, 10, ()))
        recipe.word_start[ids[0]] = True  # every caption starts a word
        samples.append(Sample(f"s{i}", torch.randn(3, 64, 64, dtype=dtype), torch.randn(int(seconds * 16000),
                                                                                         dtype=dtype), "", ids))
    return model, recipe, samples[:n]


def run(model, recipe, samples, masks, forward):
    model.zero_grad()
    feats = forward(recipe, model, samples, masks)
    loss, _ = recipe.loss(model, feats, samples, masks)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), feats, grads


def packed(recipe, model, samples, masks):
    return recipe.forward(model, samples, masks)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("stage", ["1", "2", "joint"])
def test_packed_step_equals_the_released_padded_step(stage, dtype, bound):
    torch.manual_seed(7)
    model, recipe, samples = make(stage, dtype)
    masks = recipe.draw_masks(model, samples, torch.Generator().manual_seed(1))
    p_loss, p_feats, p_grads = run(model, recipe, samples, masks, packed)
    q_loss, q_feats, q_grads = run(model, recipe, samples, masks, padded_forward)
    assert rel(p_loss, q_loss) <= bound
    views = recipe.plan.student + recipe.plan.frozen
    for view in views:  # every view, every sample, every segment
        for seq_p, seq_q in zip(p_feats[view], q_feats[view], strict=True):
            for a, b in zip(seq_p, seq_q, strict=True):
                assert a.shape == b.shape and rel(a, b) <= bound, view
    assert p_feats["decoded"].keys() == q_feats["decoded"].keys()
    for key, a in p_feats["decoded"].items():
        assert a.shape == q_feats["decoded"][key].shape and rel(a, q_feats["decoded"][key]) <= bound, key
    assert p_grads.keys() == q_grads.keys()
    assert len(p_grads) > 40
    for name, g in p_grads.items():
        assert rel(g, q_grads[name]) <= bound, name


def test_the_comparison_notices_a_perturbed_weight():
    torch.manual_seed(7)
    model, recipe, samples = make("1", torch.float64)
    masks = recipe.draw_masks(model, samples, torch.Generator().manual_seed(1))
    loss_a = recipe.loss(model, packed(recipe, model, samples, masks), samples, masks)[0]
    with torch.no_grad():
        model.dcl_decoder.blocks[1].ffn.w_out[1] += 1e-3 * torch.randn_like(model.dcl_decoder.blocks[1].ffn.w_out[1])
    loss_b = recipe.loss(model, padded_forward(recipe, model, samples, masks), samples, masks)[0]
    assert rel(loss_a, loss_b) > 1e-9
