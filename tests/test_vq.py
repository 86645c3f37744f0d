"""The VQ image tokenizer: contract (shapes, CLIP in/out, errors), EMA update by hand, k-means
init, save/load, and `omni vq train` end to end on the small real dataset."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from omni_core.model.vq import (
    GRID,
    VQConfig,
    VQTokenizer,
    VQTrainArgs,
    from_pixels,
    psnr,
    to_pixels,
    train_vq,
)

SMALL = VQConfig(image_size=16, channels=8, codebook_size=16)


def test_identity_start_and_shapes() -> None:
    vq = VQTokenizer(SMALL)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64).float()
    # patchify / un-patchify weights and zero residual branches: the untrained autoencoder is the identity
    assert torch.allclose(vq.decoder(vq.encoder(x)), x, atol=1e-6)
    vq.init_codebook(x)
    codes = vq.encode(from_pixels(x))
    assert codes.shape == (3, GRID * GRID) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < vq.codebook_size
    out = vq.decode(codes)
    assert out.shape == (3, 3, 16, 16)
    assert torch.allclose(from_pixels(to_pixels(out)), out, atol=1e-5)


def test_nearest_against_float64_brute_force() -> None:
    vq = VQTokenizer(SMALL)
    z = torch.randn(50, SMALL.code_dim)
    d = torch.cdist(z.double(), vq.codebook.double())
    assert torch.equal(vq.nearest(z), d.argmin(1))


def test_ema_update_hand_computed() -> None:
    cfg = VQConfig(image_size=8, channels=4, codebook_size=2, decay=0.5, dead_after=10)
    vq = VQTokenizer(cfg)
    vq.codebook.zero_()
    vq.ema_sum.zero_()
    vq.ema_count.fill_(1.0)
    flat = torch.tensor([[1.0] * 3, [3.0] * 3, [10.0] * 3])
    vq._ema_update(flat, torch.tensor([0, 0, 1]))
    # counts: 0.5*1 + 0.5*2 = 1.5 and 0.5*1 + 0.5*1 = 1; sums: 0.5*(1+3) = 2 and 0.5*10 = 5
    # (the Laplace smoothing's 1e-5 moves these by < 1e-5)
    assert torch.allclose(vq.ema_count, torch.tensor([1.5, 1.0]))
    assert torch.allclose(vq.codebook[:, 0], torch.tensor([2 / 1.5, 5.0]), atol=1e-4)
    assert vq.last_used.tolist() == [1, 1]


def test_dead_codes_are_reseeded() -> None:
    cfg = VQConfig(image_size=8, channels=4, codebook_size=4, dead_after=2)
    vq = VQTokenizer(cfg)
    flat = torch.randn(6, cfg.code_dim)
    for _ in range(3):  # at step 3 codes 1-3 have gone unused for more than 2 steps
        vq._ema_update(flat, torch.zeros(6, dtype=torch.long))  # only code 0 ever used
    assert vq.last_used.tolist() == [3, 3, 3, 3]
    assert all(any(torch.equal(c, f) for f in flat) for c in vq.codebook[1:])


def test_init_codebook_is_kmeans() -> None:
    vq = VQTokenizer(SMALL)
    x = torch.rand(4, 3, 16, 16)
    vq.init_codebook(x)
    z = vq.encoder(x - 0.5).permute(0, 2, 3, 1).reshape(-1, SMALL.code_dim).detach()
    codes = vq.nearest(z)
    # k-means re-seeds empty clusters, so on the data it was fit to every code is used
    assert codes.unique().numel() == SMALL.codebook_size
    with pytest.raises(ValueError, match="k-means needs at least"):
        VQTokenizer(VQConfig(image_size=8, channels=4, codebook_size=128)).init_codebook(torch.rand(1, 3, 8, 8))


def test_bad_input() -> None:
    vq = VQTokenizer(SMALL)
    with pytest.raises(ValueError, match=r"\[N, 3, 16, 16\].*trained at 16 px"):
        vq.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="codes must be"):
        vq.decode(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integers in \[0, 16\)"):
        vq.decode(torch.full((1, 64), 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        VQConfig(image_size=20)


def test_save_load_and_errors(tmp_path) -> None:
    vq = VQTokenizer(SMALL)
    vq.init_codebook(torch.rand(4, 3, 16, 16))
    vq.save(tmp_path / "v")
    back = VQTokenizer.load(tmp_path / "v")
    x = from_pixels(torch.rand(2, 3, 16, 16))
    assert torch.equal(back.encode(x), vq.encode(x))
    assert back.cfg == SMALL and not back.training
    with pytest.raises(FileNotFoundError, match="does not exist.*omni vq train"):
        VQTokenizer.load(tmp_path / "missing")
    (tmp_path / "v" / "vq.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        VQTokenizer.load(tmp_path / "v")
    VQTokenizer(VQConfig(image_size=16, channels=8, codebook_size=32)).save(tmp_path / "w")
    (tmp_path / "w" / "vq_config.json").write_text(json.dumps(asdict(SMALL)))
    with pytest.raises(ValueError, match="do not match"):
        VQTokenizer.load(tmp_path / "w")


def test_psnr() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert psnr(x + 0.1, x).shape == (2,)
    assert psnr((x + 0.1).clamp(0, 1), x).min() >= 20.0 - 1e-4  # mse <= 0.01


def test_train_cli_end_to_end(dataset, tmp_path, capsys) -> None:
    from omni_core.cli import main

    out = tmp_path / "vq"
    assert main(["vq", "train", "--data", str(dataset), "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--codebook-size", "64"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_images"] == 8 and summary["eval_psnr"] > 15
    vq = VQTokenizer.load(out)
    assert vq.codebook_size == 64 and vq.image_size == summary["image_size"]
    with pytest.raises(ValueError, match="positive"):
        train_vq(VQTrainArgs(data=str(dataset), out=str(tmp_path / "x"), steps=0))
