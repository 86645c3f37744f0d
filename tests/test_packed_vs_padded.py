"""The one packed pass computes what ONE-PEACE's padded multi-pass step computes."""

import pytest
import torch

from omni_core.model.omni import AUDIO, IMAGE, TEXT, ModalInputs, OmniModel
from omni_core.train.steps import packed_step, padded_step
from omni_core.train.views import step_views


def make_step(other, dtype, n=4):
    model = OmniModel.from_preset("tiny", layer_scale_init=0.5).to(dtype)
    # Non-zero relative-position tables so the bias path is exercised.
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.bias_table, std=0.5)
    inputs = ModalInputs(
        text=[torch.randint(0, model.cfg.vocab_size, (n_tok,)) for n_tok in (3, 9, 17, 5)[:n]],
        image=torch.randn(n, 3, 64, 64, dtype=dtype),
        audio=[torch.randn(s, dtype=dtype) for s in (4000, 16000, 9000, 30000)[:n]],
    )
    counts = {TEXT: [t.numel() + 1 for t in inputs.text], IMAGE: [17] * n,
              AUDIO: [model.audio.num_frames(a.numel()) + 1 for a in inputs.audio]}
    return model, inputs, step_views(other, n, counts, seed=3)


def run(step, model, inputs, views):
    model.zero_grad()
    loss, student, teacher = step(model, inputs, views)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {**{f"teacher:{k}": v for k, v in teacher.items()}, **student}, grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("other", [IMAGE, AUDIO], ids=["stage1-image-text", "stage2-audio-text"])
def test_packed_step_equals_padded_step(other, dtype, bound):
    torch.manual_seed(7)
    model, inputs, views = make_step(other, dtype)
    packed = run(packed_step, model, inputs, views)
    padded = run(padded_step, model, inputs, views)
    assert rel(packed[0], padded[0]) <= bound
    names = sorted(packed[1])
    assert names == sorted(padded[1]) and len(names) == 8  # 5 student views + 3 teacher views
    for name in names:  # every view, every sequence, every segment: CLS and token features
        assert len(packed[1][name]) == len(padded[1][name]) == 4
        for seq_p, seq_q in zip(packed[1][name], padded[1][name]):
            for p, q in zip(seq_p, seq_q, strict=True):
                assert p.shape == q.shape
                assert rel(p[0], q[0]) <= bound, f"{name} CLS"
                assert rel(p, q) <= bound, f"{name} tokens"
    assert packed[2].keys() == padded[2].keys()
    used = [n for n in packed[2] if padded[2][n].norm() > 0]
    assert len(used) > 50
    for name in used:
        assert rel(packed[2][name], padded[2][name]) <= bound, name


def test_padded_step_notices_a_perturbed_weight():
    """The comparison can fail: change one weight in between and the results differ."""
    model, inputs, views = make_step(IMAGE, torch.float64)
    loss_a = packed_step(model, inputs, views)[0]
    with torch.no_grad():
        model.blocks[1].ffn.w_out[IMAGE] += 1e-3 * torch.randn_like(model.blocks[1].ffn.w_out[IMAGE])
    loss_b = padded_step(model, inputs, views)[0]
    assert rel(loss_a, loss_b) > 1e-8
