import subprocess
import sys
import time

import pytest
import torch

from omni_core.model.omni import IMAGE, PRESETS, TEXT, ModalInputs, OmniModel, SegmentRef
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


def test_tiny_training_step_is_about_a_second():
    model = OmniModel.from_preset("tiny")
    n = 16
    inputs = ModalInputs(text=[torch.randint(0, 1000, (20,)) for _ in range(n)],
                         image=torch.randn(n, 3, 64, 64))
    seqs = [[SegmentRef(TEXT, i)] for i in range(n)] + [[SegmentRef(IMAGE, i)] for i in range(n)]
    start = time.perf_counter()
    feats, batch = model(inputs, seqs)
    feats.sum().backward()
    assert feats.shape == (batch.num_tokens, model.cfg.dim) and torch.isfinite(feats).all()
    assert time.perf_counter() - start < 5.0


def test_adapters_reject_bad_input():
    model = OmniModel.from_preset("tiny")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1000\)"):
        model.text([torch.tensor([1, 1000])])
    with pytest.raises(ValueError, match="at most 72"):
        model.text([torch.zeros(80, dtype=torch.long)])
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


def test_bucket_lut_is_exact_near_and_saturates_far():
    lut, rows = bucket_lut_1d(200, 16)
    assert rows == 31 and int(lut.min()) == 0 and int(lut.max()) == 30
    assert [int(lut[50, 50 + d]) - 15 for d in range(-7, 8)] == list(range(-7, 8))
    far = lut[0].tolist()
    assert far == sorted(far), "monotone in the relative distance"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cli_model_info_prints_parameter_count(preset):
    out = subprocess.run([sys.executable, "-m", "omni_core.cli", "model", "info", preset],
                         capture_output=True, text=True, check=True).stdout
    expected = OmniModel.from_preset(preset, device="meta").num_parameters()
    assert f"{expected:,}" in out
