"""`omni pretrain` under torchrun: a 2-rank FSDP2 run (contrastive recipe, autograd gather) is
killed after a sharded checkpoint and resumed on 1 rank; its whole loss curve must equal a 1-rank
run on the same global batches (fp32: the reductions run in another order)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMNI_DIST_TIMEOUT": "120"}


def pretrain(data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["-m", "omni_core.cli", "pretrain", "--data", str(data), "--out", str(out), "--recipe", "contrastive",
            "--steps", "6", "--batch-size", str(batch), "--ckpt-every", "2", "--warmup-steps", "2", "--seed", "3",
            "--loader", "pil", "--precision", "fp32", "--no-progress", *extra]


def curve(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_rank_fsdp_run_killed_and_resumed_on_one_rank(dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *pretrain(dataset, one, 8)], check=True, env=ENV, capture_output=True)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.Popen([*torchrun, *pretrain(dataset, two, 4, "--dist", "fsdp")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 400
    while not (two / "dcp" / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert (two / "dcp" / "latest").exists(), err.decode()[-3000:]
    if (two / "model.safetensors").exists():
        # On a loaded machine the run can finish before this poll sees its first checkpoint: then stop
        # it "after" its previous checkpoint instead (what a kill there leaves: latest naming it).
        previous = sorted(p.name for p in (two / "dcp").glob("step-*"))[-2]
        (two / "dcp" / "latest").write_text(previous)
        (two / "model.safetensors").unlink()
    killed_at = int((two / "dcp" / "latest").read_text().split("-")[1])

    resumed = subprocess.run([sys.executable, *pretrain(dataset, two, 4, "--resume")], env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = curve(one), curve(two)
    assert [r["step"] for r in b] == [str(s) for s in range(1, 7)] and killed_at in (2, 4)
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_image_text", "loss_audio_text", "logit_scale"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=2e-4, abs=1e-4), (ra["step"], key)
        assert ra["lr"] == rb["lr"] and ra["tokens"] == rb["tokens"]
    assert (two / "model.safetensors").exists()


def stage2(data: Path, out: Path, init: Path, *extra: str) -> list[str]:
    return [*TORCHRUN, "-m", "omni_core.cli", "pretrain", "--data", str(data), "--out", str(out), "--recipe",
            "one-peace", "--stage", "2", "--init", str(init), "--dist", "fsdp", "--stream", "--eval-every", "1e-9",
            "--steps", "4", "--batch-size", "2", "--ckpt-every", "2", "--warmup-steps", "1", "--seed", "3",
            "--loader", "pil", "--precision", "fp32", "--no-progress", *extra]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def test_streamed_fsdp_stage2_with_eval_resumes_exactly(dataset, tmp_path):
    """ONE-PEACE stage 2 (frozen rows) under FSDP2 on 2 ranks, streaming each rank's shards, evaluating
    every step: resumed from its step-2 checkpoint (each rank's stream position), the run continues
    with the same losses and ends with the same weights; the frozen rows keep the --init run's values."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from omni_core.model.omni import AUDIO, OmniModel
    from omni_core.train.checkpoint import save_checkpoint

    init, full, resumed = tmp_path / "init", tmp_path / "full", tmp_path / "resumed"
    init.mkdir()
    torch.manual_seed(5)  # other weights than the run's own seed would build
    model = OmniModel.from_preset("tiny")
    save_checkpoint(init / "model.safetensors", model, None, {"config": model.config_dict()})

    run = subprocess.run(stage2(dataset, full, init), env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    shutil.copytree(full, resumed)  # as if killed right after its step-2 checkpoint
    kept = sorted(p.name for p in (resumed / "dcp").glob("step-*"))
    assert len(kept) == 2  # steps 2 and 4
    (resumed / "dcp" / "latest").write_text(kept[0])
    (resumed / "model.safetensors").unlink()
    run = subprocess.run(stage2(dataset, resumed, init, "--resume"), env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]

    a, b = curve(full), curve(resumed)
    assert [r["step"] for r in b] == ["1", "2", "3", "4"] == [r["step"] for r in a]
    for ra, rb in zip(a[2:], b[2:]):
        for key in ("loss", "atc", "dcl_audio", "logit_scale", "tokens"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-5), (ra["step"], key)
    with (full / "eval_curve.csv").open() as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["0", "1", "2", "3", "4"]  # rank 0 writes, once a step

    start = model.state_dict()
    final_full, final_resumed = (load_file(str(run / "model.safetensors")) for run in (full, resumed))
    for key, value in final_full.items():
        if key.startswith("model/"):
            assert torch.allclose(final_resumed[key], value, rtol=1e-5, atol=1e-7), key
    for key in ("blocks.0.ffn.w_in", "blocks.3.ffn.b_out", "final_norm.weight"):
        after = final_resumed[f"model/{key}"]
        rows = [m for m in range(after.shape[0]) if m != AUDIO]
        assert torch.equal(after[rows], start[key][rows]), key  # frozen: the init run's values
        assert not torch.equal(after[AUDIO], start[key][AUDIO]), key
