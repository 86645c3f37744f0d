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
