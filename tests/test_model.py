import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from omni_core.model.omni import AUDIO, IMAGE, PRESETS, TEXT, ModalInputs, OmniModel, SegmentRef
from omni_core.model.relpos import beit_lut_2d, bucket_lut_1d


def test_one_peace_4b_preset_on_meta_has_four_billion_parameters():
    model = OmniModel.from_preset("one-peace-4b", device="meta")
    cfg = model.cfg
    assert (cfg.depth, cfg.dim, cfg.heads, cfg.ffn_hidden) == (40, 1536, 24, 6144)
    assert 3.6e9 < model.num_parameters() < 4.4e9
    assert next(model.parameters()).device.type == "meta"


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown preset"):
        OmniModel.from_preset("huge")


def test_tiny_training_step_reaches_every_layer():
    """Speed is measured by the benchmarks (omni bench packing), not by a timed test."""
    model = OmniModel.from_preset("tiny")
    n = 16
    inputs = ModalInputs(text=[torch.randint(0, 1000, (20,)) for _ in range(n)],
                         image=torch.randn(n, 3, 64, 64))
    seqs = [[SegmentRef(TEXT, i)] for i in range(n)] + [[SegmentRef(IMAGE, i)] for i in range(n)]
    feats, batch = model(inputs, seqs)
    feats.sum().backward()
    assert feats.shape == (batch.num_tokens, model.cfg.dim) and torch.isfinite(feats).all()
    for block in model.blocks:
        assert block.attn.q_proj.weight.grad.abs().sum() > 0 and torch.isfinite(block.ffn.w_in.grad).all()


def test_adapters_reject_bad_input():
    model = OmniModel.from_preset("tiny")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1000\)"):
        model.text([torch.tensor([1, 1000])])
    with pytest.raises(ValueError, match="at most 71"):
        model.text([torch.zeros(72, dtype=torch.long)])
    with pytest.raises(ValueError, match="images must be"):
        model.image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="too short"):
        model.audio([torch.randn(100)])


def test_beit_lut_has_cls_rows_and_is_translation_invariant():
    lut, rows = beit_lut_2d(3, 4)
    assert rows == 5 * 7 + 3 and lut.shape == (13, 13)
    assert lut[0, 0] == rows - 1 and (lut[0, 1:] == rows - 3).all() and (lut[1:, 0] == rows - 2).all()
    # patches (0,0)->(1,1) and (1,2)->(2,3) have the same offset
    assert lut[1 + 0, 1 + 5] == lut[1 + 6, 1 + 11]
    assert len(torch.unique(lut[1:, 1:])) == 5 * 7


def one_peace_bucket(i: int, j: int, bs: int) -> int:
    """ONE-PEACE.md §6 written out for one pair, in float64 scalar math."""
    if i == 0 or j == 0:
        return 2 * bs + 1 if i == j == 0 else (2 * bs - 1 if i == 0 else 2 * bs)
    rel, mid = i - j, bs // 2
    if abs(rel) <= mid:
        b = rel
    else:
        b = int(math.copysign(mid + math.ceil(math.log(abs(rel) / mid) / math.log(1023 / mid) * (mid - 1)), rel))
    return b + bs - 1


@pytest.mark.parametrize("bs", [16, 32, 256])
def test_bucket_lut_matches_one_peace_with_cls_rows(bs):
    n = 300
    lut, rows = bucket_lut_1d(n, bs)
    assert rows == 2 * bs + 2 and lut.shape == (n, n) and lut.dtype == torch.int32
    idx = torch.randint(0, n, (2000, 2), generator=torch.Generator().manual_seed(bs))
    for i, j in idx.tolist() + [[0, 0], [0, 5], [5, 0], [1, 299], [299, 1]]:
        assert int(lut[i, j]) == one_peace_bucket(i, j, bs), (i, j)
    assert int(lut[1:, 1:].min()) >= 0 and int(lut[1:, 1:].max()) <= 2 * bs - 2
    far = lut[1, 1:].tolist()
    assert far == sorted(far, reverse=True), "monotone in the relative distance"


def audio_reference_positions(audio, frames):
    """ONE-PEACE's conv positional stack over ``frames [n, D]`` alone (plain torch)."""
    p = frames.T[None]
    for conv in audio.pos_convs:
        p = F.conv1d(p, conv.weight, conv.bias, padding=conv.padding[0], groups=conv.groups)
        p = F.gelu(F.layer_norm(p.transpose(1, 2), (p.shape[1],))).transpose(1, 2)
    return p[0].T


def test_audio_masked_view_runs_the_positional_stack_over_kept_frames_only():
    torch.manual_seed(0)
    model = OmniModel.from_preset("one-peace-tiny").double()
    waves = [torch.randn(9000, dtype=torch.float64), torch.randn(4000, dtype=torch.float64)]
    embedded = model.embed(ModalInputs(audio=waves))
    raw = embedded[AUDIO][0]  # [cls; f] without positions
    keep = torch.tensor([0, 2, 3, 7, 20])
    seqs = [[SegmentRef(AUDIO, 0, keep=keep)], [SegmentRef(AUDIO, 1)], [SegmentRef(AUDIO, 0)]]
    batch = model.pack(embedded, seqs)
    masked, other, full = batch.unpack()
    f = raw[keep[1:]]
    expected = torch.cat([(raw[0] + model.audio.cls_pos)[None], f + audio_reference_positions(model.audio, f)])
    assert torch.allclose(masked, expected, atol=1e-12, rtol=0)
    assert batch.position[:5].tolist() == keep.tolist()
    f_all = raw[1:]
    assert torch.allclose(full[1:], f_all + audio_reference_positions(model.audio, f_all), atol=1e-12, rtol=0)
    # packed with a shorter clip, each clip gets the result it has alone
    alone = model.pack(model.embed(ModalInputs(audio=waves[1:])), [[SegmentRef(AUDIO, 0)]]).x
    assert torch.allclose(other, alone, atol=1e-12, rtol=0)
    # keeping frames changes the kept frames' positional embedding (ONE-PEACE masks before it)
    assert not torch.allclose(masked[1:], full[keep[1:]])
    with pytest.raises(ValueError, match="keep must start with 0"):
        model.pack(embedded, [[SegmentRef(AUDIO, 0, keep=torch.tensor([2, 3]))]])


def test_shared_relative_position_tables_reach_every_layer():
    model = OmniModel.from_preset("one-peace-tiny")
    cfg = model.cfg
    assert model.text.bias_table.shape == (2 * cfg.text_bucket + 2, cfg.heads)
    assert model.image.bias_table.shape == ((2 * (cfg.image_size // 16) - 1) ** 2 + 3, cfg.heads)
    assert model.audio.bias_table.shape == (2 * cfg.audio_bucket + 2, cfg.heads)
    assert not any("bias_table" in n for n, _ in model.blocks.named_parameters())
    ids = [torch.randint(0, cfg.vocab_size, (9,))]
    seqs = [[SegmentRef(TEXT, 0)]]
    feats, _ = model(ModalInputs(text=ids), seqs)
    feats.sum().backward()
    assert model.text.bias_table.grad.abs().sum() > 0
    assert model.image.bias_table.grad is None or model.image.bias_table.grad.abs().sum() == 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cli_model_info_prints_parameter_count(preset):
    out = subprocess.run([sys.executable, "-m", "omni_core.cli", "model", "info", preset],
                         capture_output=True, text=True, check=True).stdout
    expected = OmniModel.from_preset(preset, device="meta").num_parameters()
    assert f"{expected:,}" in out


def test_omni_model_is_importable_from_the_package_and_model_module():
    import omni_core
    import omni_core.model

    assert omni_core.OmniModel is omni_core.model.OmniModel is OmniModel
