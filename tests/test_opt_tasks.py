"""OPT's nine tasks: masking and view statistics, each loss against a hand computation,
the packed step against one pass per sequence in fp64 (losses and every gradient), the
registry and its errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from omni_core.data.sample import Sample
from omni_core.model.opt import AUDIO, IMAGE, PRESETS, TEXT, OptModel, load_opt
from omni_core.model.vq import VQConfig, VQTokenizer
from omni_core.recipes import opt_tasks
from omni_core.recipes.opt import OptRecipe
from omni_core.recipes.opt_tasks import (
    DEFAULT_TASKS,
    Task,
    ViewInputs,
    bert_mask,
    decoder_loss,
    register_task,
    resolve_tasks,
    resolve_weights,
    windowed_contrast,
)
from runs import kill_after_first_checkpoint, metrics

CODEBOOK = 16


class Tok:
    mask_id, eos_id, cls_id, vocab_size = 4, 3, 2, 64


class FakeVQ:
    """The image-tokenizer contract: codes from the mean of each 8×8 cell of a 32-px image."""

    codebook_size = CODEBOOK
    image_size = 32

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        cells = images.mean(1).reshape(-1, 8, 4, 8, 4).mean((2, 4)).reshape(-1, 64)
        return (cells.abs() * 97).long() % CODEBOOK


def make_model(dtype=torch.float64) -> OptModel:
    torch.manual_seed(0)
    cfg = replace(PRESETS["opt-tiny"], dim=32, heads=2, ffn_hidden=48, depth=2, unimodal_depth=1, dec_dim=24,
                  dec_heads=2, dec_ffn=40, dec_depth=1, vocab_size=64, codebook_size=CODEBOOK, stem_channels=8,
                  audio_channels=16, audio_pos_groups=4)
    return OptModel(cfg).to(dtype)


def make_samples(n: int = 4, dtype=torch.float64, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.cat([torch.randint(5, 64, (3 + i % 4,), generator=g), torch.tensor([3])])
        out.append(Sample(str(i), torch.randn(3, 64, 64, generator=g, dtype=dtype),
                          torch.randn(8000 + 1500 * i, generator=g, dtype=dtype), "", ids))
    return out


# --------------------------------------------------------------------------- masking and views
def test_bert_mask_rates_and_eos():
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.arange(10, 60), torch.tensor([3])])
    chosen = masked = kept = 0
    for _ in range(400):
        out, labels = bert_mask(ids, g, mask_id=4, vocab_size=64, eos_id=3)
        assert labels[-1] == -1 and out[-1] == 3  # EOS is never masked
        sel = labels >= 0
        assert torch.equal(labels[sel], ids[sel]) and torch.equal(out[~sel], ids[~sel])
        chosen += int(sel.sum())
        masked += int((out[sel] == 4).sum())
        kept += int((out[sel] == ids[sel]).sum())
    assert abs(chosen / (400 * 50) - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.03 and abs(kept / chosen - 0.1) < 0.03
    one = bert_mask(torch.tensor([7, 3]), g, 4, 64, 3)[1]
    assert one.tolist() == [7, -1]  # at least one token is chosen


def view_inputs(n: int) -> ViewInputs:
    ids = [torch.tensor([5 + i, 6, 7, 3]) for i in range(n)]
    return ViewInputs(ids, 16, [20] * n, 4, 64, 3)


def test_itm_negatives_swap_as_the_release():
    g = torch.Generator().manual_seed(0)
    v = view_inputs(5)
    counts = [0] * 5
    for trial in range(1000):
        view = opt_tasks.VIEWS["itm"](v, trial % 5, g)
        t, i = view.triplet, view.sample
        counts[view.itm_label] += 1
        expected = {0: (True, True), 1: (False, False), 2: (False, True), 3: (True, False), 4: (False, False)}
        assert (t.image == i, t.audio == i) == expected[view.itm_label]
        assert t.text == i
        if view.itm_label == 1:
            assert t.image == t.audio
        if view.itm_label == 4:
            assert t.image != t.audio
    assert abs(counts[0] / 1000 - 0.5) < 0.05
    assert all(abs(c / 1000 - 0.125) < 0.04 for c in counts[1:])


@pytest.mark.parametrize("name", ["td", "id"])
def test_modality_level_masking(name):
    g = torch.Generator().manual_seed(1)
    v = view_inputs(2)
    target = TEXT if name == "td" else IMAGE
    left_out = {TEXT: 0, IMAGE: 0, AUDIO: 0}
    for _ in range(1000):
        t = opt_tasks.VIEWS[name](v, 0, g).triplet
        present = {m for m, _ in t.modalities()}
        assert target not in present
        for m in {TEXT, IMAGE, AUDIO} - present - {target}:
            left_out[m] += 1
        if AUDIO in present:
            assert t.audio_mask.any()
    others = [m for m in (TEXT, IMAGE, AUDIO) if m != target]
    assert all(abs(left_out[m] / 1000 - 0.3) < 0.05 for m in others)


# --------------------------------------------------------------------------- losses by hand
def test_windowed_contrast_by_hand():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    # one negative: windows {0,1}, {1,2}, {1,2}; cosines by hand
    r = 1 / math.sqrt(2)
    cos = {(0, 0): 1.0, (0, 1): r, (1, 1): r, (1, 2): 1.0, (2, 1): 1.0, (2, 2): r}
    expected = 0.0
    for i, window in ((0, (0, 1)), (1, (1, 2)), (2, (1, 2))):
        expected += -cos[i, i] / 0.1 + math.log(sum(math.exp(cos[i, j] / 0.1) for j in window))
    got = windowed_contrast(pred, target, negatives=1)
    assert math.isclose(float(got), expected / 3, rel_tol=1e-12)
    assert float(windowed_contrast(pred[:1], target[:1])) == 0.0  # alone: no negative


def test_decoder_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    expected = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        lse = math.log(sum(math.exp(v) for v in row))
        lp = [v - lse for v in row]
        expected += -(0.9 * lp[t] + 0.05 * sum(lp[j] for j in range(3) if j != t))
    assert math.isclose(float(decoder_loss(logits, targets)), expected / 2, rel_tol=1e-6)


@pytest.fixture(scope="module")
def setup():
    model, samples, recipe = make_model(), make_samples(), OptRecipe(Tok(), FakeVQ())
    ctx = recipe.context(model, samples, torch.Generator().manual_seed(5))
    losses = {t.name: t.loss(ctx) for t in recipe.tasks}
    return model, samples, recipe, ctx, losses


def test_each_task_loss_by_hand(setup):
    """Every loss recomputed from the encoder output with explicit per-sample loops."""
    model, samples, recipe, ctx, losses = setup
    x = ctx.encoded.x
    row = lambda view, k, m: ctx.encoded.spans[ctx.first[view] + k][m][0]  # noqa: E731
    # mlm: each MLM-chosen text position (after CLS) against its original id
    feats, labels = [], []
    for k, v in enumerate(ctx.views["mlm"]):
        for j, label in enumerate(v.text_labels.tolist()):
            if label >= 0:
                feats.append(x[row("mlm", k, TEXT) + 1 + j])
                labels.append(label)
    torch.testing.assert_close(losses["mlm"], F.cross_entropy(model.mlm_head(torch.stack(feats)), torch.tensor(labels)))
    # mrc / mrfr / mrct: each masked patch's codes (2×2 code cells of a 4×4 grid) and pixels
    codes = FakeVQ().encode(F.interpolate(torch.stack([s.image for s in samples]), size=(32, 32),
                                          mode="bilinear", antialias=True)).view(-1, 8, 8)
    feats, code_t, pix_t = [], [], []
    for k, v in enumerate(ctx.views["mr"]):
        img = samples[v.triplet.image].image
        for p in v.triplet.image_mask.nonzero().flatten().tolist():
            r, c = divmod(p, 4)
            feats.append(x[row("mr", k, IMAGE) + 1 + p])
            code_t.append(codes[v.triplet.image, 2 * r:2 * r + 2, 2 * c:2 * c + 2].flatten())
            pix_t.append(img[:, 16 * r:16 * r + 16, 16 * c:16 * c + 16].flatten())
    feats = torch.stack(feats)
    mrc_logits = model.mrc_head(feats).view(-1, CODEBOOK)
    torch.testing.assert_close(losses["mrc"], F.cross_entropy(mrc_logits, torch.stack(code_t).flatten()))
    pred = model.region_regress(feats)
    torch.testing.assert_close(losses["mrfr"], F.mse_loss(pred, torch.stack(pix_t)))
    torch.testing.assert_close(losses["mrct"], windowed_contrast(pred, torch.stack(pix_t)))
    # mafr / mac: masked frames against the clip's per-frame log-mel targets
    feats, tgt = [], []
    for k, v in enumerate(ctx.views["ma"]):
        per_frame = model.audio_targets(samples[v.triplet.audio].audio)
        for f in v.triplet.audio_mask.nonzero().flatten().tolist():
            feats.append(x[row("ma", k, AUDIO) + 1 + f])
            tgt.append(per_frame[f])
    pred = model.audio_regress(torch.stack(feats))
    torch.testing.assert_close(losses["mafr"], F.mse_loss(pred, torch.stack(tgt)))
    torch.testing.assert_close(losses["mac"], windowed_contrast(pred, torch.stack(tgt)))
    # itm: the first token of each matching sequence, pooled
    first = torch.stack([x[ctx.encoded.cu_seqlens[ctx.first["itm"] + k]] for k in range(len(samples))])
    labels = torch.tensor([v.itm_label for v in ctx.views["itm"]])
    torch.testing.assert_close(losses["itm"], F.cross_entropy(model.itm_head(torch.tanh(model.pooler(first))), labels))
    # td / id: teacher forcing one sequence at a time
    td_logits, td_t, id_logits, id_t = [], [], [], []
    for k, v in enumerate(ctx.views["td"]):
        cap = samples[v.sample].token_ids
        memory = ctx.encoded.select([ctx.first["td"] + k])
        td_logits.append(model.text_decoder([torch.cat([torch.tensor([2]), cap[:-1]])], memory))
        td_t.append(cap)
    for k, v in enumerate(ctx.views["id"]):
        target = codes[v.sample].flatten()
        memory = ctx.encoded.select([ctx.first["id"] + k])
        id_logits.append(model.image_decoder([torch.cat([torch.tensor([CODEBOOK]), target[:-1]])], memory))
        id_t.append(target)
    torch.testing.assert_close(losses["td"], decoder_loss(torch.cat(td_logits), torch.cat(td_t)))
    torch.testing.assert_close(losses["id"], decoder_loss(torch.cat(id_logits), torch.cat(id_t)))


def test_packed_step_equals_unpacked_in_fp64():
    model, samples, recipe = make_model(), make_samples(5, seed=3), OptRecipe(Tok(), FakeVQ())
    results = []
    for packed in (True, False):
        model.zero_grad(set_to_none=True)
        parts = recipe.losses(model, samples, torch.Generator().manual_seed(11), packed=packed)
        sum(parts.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((parts, grads))
    (packed, g_packed), (alone, g_alone) = results
    assert set(packed) == set(DEFAULT_TASKS)
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], rtol=1e-10, atol=1e-12)
    assert set(g_packed) == set(g_alone)
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_alone[name], rtol=1e-8, atol=1e-10, msg=name)
    # every trained part gets a gradient (the adapters' unused relative-bias tables excepted)
    untouched = {n for n, p in model.named_parameters() if n not in g_packed}
    assert untouched <= {"text.bias_table", "image.bias_table", "audio.bias_table"}, untouched


def test_step_sums_weighted_tasks_and_is_reproducible():
    model, samples = make_model(torch.float32), make_samples(3, torch.float32)
    recipe = OptRecipe(Tok(), FakeVQ(), tasks="mlm,itm,td", weights="1,0.5,2")
    assert recipe.loss_names == ("loss_mlm", "loss_itm", "loss_td")
    total, parts = recipe.step(model, samples, torch.Generator().manual_seed(2))
    again, parts2 = recipe.step(model, samples, torch.Generator().manual_seed(2))
    assert parts == parts2
    expected = parts["loss_mlm"] + 0.5 * parts["loss_itm"] + 2 * parts["loss_td"]
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-5)


def test_sampled_mix_draws_one_task_by_weight():
    """task_mix="sample" (the release's): one task per step, drawn with probability proportional
    to its weight; the step's loss is that task's loss from the same draw of views, the others'
    columns are NaN; zero-weight tasks are never drawn."""
    model, samples = make_model(torch.float32), make_samples(3, torch.float32)
    recipe = OptRecipe(Tok(), FakeVQ(), tasks="mlm,itm,td", weights="3,1,0", mix="sample")
    drawn = []
    for seed in range(120):
        loss, parts = recipe.step(model, samples, torch.Generator().manual_seed(seed))
        live = [k for k, v in parts.items() if not math.isnan(v)]
        assert len(live) == 1 and math.isclose(parts[live[0]], float(loss.detach()), rel_tol=1e-6)
        drawn.append(live[0])
        if seed < 3:  # the loss is the drawn task's own: replay the draw, then that task alone
            g = torch.Generator().manual_seed(seed)
            task = recipe.tasks[int(torch.multinomial(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64), 1,
                                                      generator=g))]
            alone = recipe.losses(model, samples, g, tasks=[task])[task.name]
            assert f"loss_{task.name}" == live[0] and math.isclose(float(alone), float(loss), rel_tol=1e-6)
    assert "loss_td" not in drawn
    assert 0.6 < drawn.count("loss_mlm") / len(drawn) < 0.9  # expected 0.75
    with pytest.raises(ValueError, match="task mix must be one of"):
        OptRecipe(Tok(), FakeVQ(), mix="random")
    with pytest.raises(ValueError, match="positive weight"):
        OptRecipe(Tok(), FakeVQ(), tasks="mlm,itm", weights="0,0", mix="sample")


def test_a_registered_task_runs_in_the_step():
    def caption_length(ctx) -> torch.Tensor:  # a user's task reading the shared matching view
        first = ctx.encoded.cu_seqlens[ctx.first["itm"]:ctx.first["itm"] + len(ctx.views["itm"])].long()
        return ctx.encoded.x[first].pow(2).mean()

    register_task(Task("toy", "itm", caption_length))
    try:
        recipe = OptRecipe(Tok(), None, tasks=["itm", "toy"])
        _, parts = recipe.step(make_model(torch.float32), make_samples(3, torch.float32),
                               torch.Generator().manual_seed(0))
        assert set(parts) == {"loss_itm", "loss_toy"}
        with pytest.raises(ValueError, match="already registered"):
            register_task(Task("toy", "itm", caption_length))
    finally:
        opt_tasks.TASKS.pop("toy")


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown OPT task\(s\) \['mim'\]"):
        resolve_tasks("mlm,mim")
    with pytest.raises(ValueError, match="2 task weights for 3 tasks"):
        resolve_weights(resolve_tasks("mlm,mrc,td"), "1,2")
    with pytest.raises(ValueError, match="numbers"):
        resolve_weights(resolve_tasks("mlm"), "one")
    with pytest.raises(ValueError, match="--vq"):
        OptRecipe(Tok(), None)
    with pytest.raises(ValueError, match="32 codes, the model 16"):
        class BigVQ(FakeVQ):
            codebook_size = 32
        OptRecipe(Tok(), BigVQ()).attach(make_model(torch.float32))
    model = make_model(torch.float32)
    long = make_samples(1, torch.float32)[0]
    long.token_ids = torch.cat([torch.randint(5, 64, (75,)), torch.tensor([3])])
    with pytest.raises(ValueError, match="text decoder.s window is 72 tokens"):
        OptRecipe(Tok(), None, tasks="td").step(model, [long], torch.Generator())
    wrong = make_samples(2, torch.float32)
    for s in wrong:
        s.image = torch.randn(3, 48, 48)
    with pytest.raises(ValueError, match=r"images must be \[N, 3, 64, 64\]"):
        OptRecipe(Tok(), None, tasks="itm").step(model, wrong, torch.Generator())


# --------------------------------------------------------------------------- the trainer
def _opt_cmd(data, out, vq, *extra: str) -> list[str]:
    return [sys.executable, "-m", "omni_core.cli", "pretrain", "--recipe", "opt", "--data", str(data), "--out",
            str(out), "--steps", "6", "--batch-size", "4", "--ckpt-every", "2", "--warmup-steps", "2", "--seed", "1",
            "--loader", "pil", "--precision", "fp32", "--no-progress", "--vq", str(vq), *extra]


def test_pretrain_opt_resumes_exactly_after_a_kill(dataset, tmp_path):
    """``omni pretrain --recipe opt``: a column per task; a run killed after a checkpoint and
    resumed logs the same losses as one run straight through."""
    vq = VQTokenizer(VQConfig(image_size=32, codebook_size=32)).save(tmp_path / "vq")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run(_opt_cmd(dataset, whole, vq), check=True, env=env, capture_output=True)
    kill_after_first_checkpoint(_opt_cmd(dataset, resumed, vq), resumed, env)
    assert len(metrics(resumed)) < 6
    subprocess.run(_opt_cmd(dataset, resumed, vq, "--resume"), check=True, env=env, capture_output=True)
    a, b = metrics(whole), metrics(resumed)
    assert [k for k in a[0] if k.startswith("loss_")] == [f"loss_{t}" for t in DEFAULT_TASKS]
    for key in a[0]:
        if key not in ("elapsed_s", "tokens_per_s"):
            assert [r[key] for r in a] == [r[key] for r in b], key
    model, meta = load_opt(whole)
    assert isinstance(model, OptModel) and meta["args"]["recipe"] == "opt"
    assert model.cfg.codebook_size == 32


def test_pretrain_opt_rejects_bad_options(dataset, tmp_path):
    from omni_core.train.trainer import TrainArgs, train

    with pytest.raises(ValueError, match="unknown OPT task"):
        train(TrainArgs(data=str(dataset), out=str(tmp_path / "a"), recipe="opt", preset="opt-tiny", steps=1,
                        tasks="mlm,nope"))
    with pytest.raises(ValueError, match="choose --preset from"):
        train(TrainArgs(data=str(dataset), out=str(tmp_path / "b"), recipe="opt", preset="tiny", steps=1,
                        tasks="mlm"))
    with pytest.raises(FileNotFoundError, match="no VQ tokenizer"):
        train(TrainArgs(data=str(dataset), out=str(tmp_path / "c"), recipe="opt", preset="opt-tiny", steps=1,
                        vq=str(tmp_path / "missing")))


def test_single_source_tasks_match_the_inference_encoding():
    """The optional td_image / td_audio / id_text / id_audio tasks train exactly the condition
    ``model.encode`` gives generation: one modality alone."""
    model, samples = make_model(), make_samples(3)
    recipe = OptRecipe(Tok(), FakeVQ(), tasks="td_image,td_audio,id_text,id_audio")
    losses = recipe.losses(model, samples, torch.Generator().manual_seed(0))
    captions = [s.token_ids for s in samples]
    cap_in = [torch.cat([torch.tensor([2]), c[:-1]]) for c in captions]
    codes = recipe.image_codes(model, torch.stack([s.image for s in samples]))
    code_in = [torch.cat([torch.tensor([CODEBOOK]), c[:-1]]) for c in codes]
    memories = {"image": model.encode(image=torch.stack([s.image for s in samples])),
                "audio": model.encode(audio=[s.audio for s in samples]), "text": model.encode(text=captions)}
    for name, source in (("td_image", "image"), ("td_audio", "audio")):
        expected = decoder_loss(model.text_decoder(cap_in, memories[source]), torch.cat(captions))
        torch.testing.assert_close(losses[name], expected)
    for name, source in (("id_text", "text"), ("id_audio", "audio")):
        expected = decoder_loss(model.image_decoder(code_in, memories[source]), codes.flatten())
        torch.testing.assert_close(losses[name], expected)
