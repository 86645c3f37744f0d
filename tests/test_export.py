"""Sharded checkpoints in one process: atomic saves survive an interrupted save; `omni export`
consolidates the latest into the single file that `omni eval` / `omni embed` read."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_dist import make_model

from omni_core.train import checkpoint as ckpt
from omni_core.train.trainer import load_trained


def save(run, step, model, opt=None):
    return ckpt.save_sharded(run, step, model, opt, {"config": model.config_dict(), "step": step},
                             {"position": step})


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    first = save(tmp_path, 1, model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = dcp.save

    def die_half_way(*args, **kwargs):  # the shards are written; rank files, meta and rename are not
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(dcp, "save", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, opt)
    monkeypatch.setattr(dcp, "save", real_save)
    assert (tmp_path / "dcp" / ".tmp-step-00000002" / ".metadata").exists()  # half a checkpoint on disk
    assert ckpt.latest_sharded(tmp_path) == first

    fresh = make_model(seed=5)
    meta, rank_state = ckpt.load_sharded(ckpt.latest_sharded(tmp_path), fresh, torch.optim.AdamW(fresh.parameters()))
    assert meta["step"] == 1 and rank_state == {"position": 1}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())

    third = save(tmp_path, 3, model, opt)  # the next save clears the debris and the old checkpoint
    assert ckpt.latest_sharded(tmp_path) == third
    assert sorted(p.name for p in (tmp_path / "dcp").iterdir()) == ["latest", "step-00000003"]


def test_export_writes_what_eval_reads(tmp_path):
    model = make_model().float()
    save(tmp_path, 4, model)
    out = subprocess.run([sys.executable, "-m", "omni_core.cli", "export", "--run", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded, meta = load_trained(tmp_path)
    assert meta["step"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "omni_core.cli", "export", "--run", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "no sharded checkpoint" in out.stderr
