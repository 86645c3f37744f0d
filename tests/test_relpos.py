"""The model's relative-position LUTs in their CLS-aware compact form: the same entries as
the dense ``[M, P, P]`` LUT for every pair of real positions, and the model's pass through
it equal, bit for bit, to its pass through the dense LUT."""

from __future__ import annotations

import pytest
import torch

from omni_core.model import omni
from omni_core.model.omni import IMAGE, TEXT, ModalInputs, OmniModel, SegmentRef
from omni_core.model.relpos import beit_lut_2d, bucket_lut_1d, cls_relative_lut, grid_positions
from omni_core.ops.attention import lut_columns


@pytest.mark.parametrize("preset", sorted(omni.PRESETS))
def test_compact_lut_reads_the_dense_entries(preset):
    cfg = omni.PRESETS[preset]
    dense, compact = omni.bias_lut(cfg), omni.bias_lut_compact(cfg)
    grid = cfg.image_size // 16
    for m, n in enumerate((cfg.text_positions, grid * grid + 1, cfg.audio_max_frames + 1)):
        pos = torch.arange(n)
        pos = grid_positions(pos, grid) if m == IMAGE else pos
        got = compact[m][lut_columns(compact, pos[:, None], pos[None, :])]
        assert torch.equal(got, dense[m, :n, :n])


def test_grid_positions_give_one_difference_per_offset():
    """Respaced, a key - query difference names one (dy, dx): BEiT's 2D table is 1D relative."""
    h, w = 3, 4
    spaced = grid_positions(torch.arange(1, h * w + 1), w)
    ys, xs = torch.arange(h * w) // w, torch.arange(h * w) % w
    diff = (spaced[None, :] - spaced[:, None]).flatten()
    offset = ((ys[None, :] - ys[:, None]) * 100 + xs[None, :] - xs[:, None]).flatten()
    pairs = torch.unique(torch.stack([diff, offset]), dim=1)
    assert pairs.shape[1] == torch.unique(diff).numel() == torch.unique(offset).numel()
    assert int(grid_positions(torch.tensor([0]), w)) == 0


def test_non_relative_lut_is_refused():
    lut, _ = beit_lut_2d(3, 3)
    with pytest.raises(ValueError, match="no CLS-aware relative form"):
        cls_relative_lut(lut, torch.arange(10), 10)  # 2D table over unspaced positions
    lut, _ = bucket_lut_1d(12, 4)
    lut[3, 5] += 1
    with pytest.raises(ValueError, match=r"entry \("):
        cls_relative_lut(lut, torch.arange(12), 12)


def test_model_pass_through_compact_lut_equals_dense(monkeypatch):
    """The reference backend takes the compact LUT; the same pass with it refused (as for the
    native kernel) reads the dense LUT: outputs and the tables' gradients agree bit for bit."""
    monkeypatch.setenv("OMNI_BACKEND", "reference")
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny").double().eval()
    with torch.no_grad():
        for adapter in (model.text, model.image, model.audio):
            adapter.bias_table.normal_()
    size = model.cfg.image_size
    inputs = ModalInputs(text=[torch.randint(5, 100, (9,)), torch.randint(5, 100, (14,))],
                         image=torch.randn(2, 3, size, size, dtype=torch.float64))
    sequences = [[SegmentRef(IMAGE, 0, torch.tensor([0, 2, 3, 5, 7, 9, 11, 12])), SegmentRef(TEXT, 0)],
                 [SegmentRef(IMAGE, 1), SegmentRef(TEXT, 1)]]
    luts = []

    def results():
        model.zero_grad()
        out, _ = model(inputs, sequences)
        out.square().sum().backward()
        return [out.detach()] + [a.bias_table.grad.clone() for a in (model.text, model.image)]

    spy = model.blocks[0].attn.forward
    monkeypatch.setattr(model.blocks[0].attn, "forward", lambda x, b, lut, t: luts.append(lut) or spy(x, b, lut, t))
    compact = results()
    monkeypatch.setattr(omni, "backend_implements", lambda mode, device: False)
    dense = results()
    assert luts[0] is model.bias_lut_compact and luts[1] is model.bias_lut
    assert all(torch.equal(a, b) for a, b in zip(compact, dense, strict=True))
