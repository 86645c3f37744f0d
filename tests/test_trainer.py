"""Trainer: exact resumption after a kill, corrupt samples skipped, clear errors."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from omni_core.eval.retrieval import evaluate
from runs import kill_after_first_checkpoint, metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every run: bitwise-equal math


def pretrain_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "omni_core.cli", "pretrain", "--data", str(data), "--out", str(out),
            "--steps", "8", "--batch-size", "8", "--ckpt-every", "2", "--warmup-steps", "2",
            "--seed", "3", "--loader", "pil", "--no-progress", *extra]


def test_killed_run_resumes_to_the_same_result(dataset, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # fp32 given at the start only: the resumed launch must keep the run's precision, not take
    # the default (auto: bf16 on a CPU with native bf16)
    subprocess.run(pretrain_cmd(dataset, whole, "--precision", "fp32"), check=True, env=ENV, capture_output=True)

    kill_after_first_checkpoint(pretrain_cmd(dataset, resumed, "--precision", "fp32"), resumed, ENV)
    steps_at_kill = len(metrics(resumed))
    assert steps_at_kill < 8 and not (resumed / "model.safetensors").exists()

    subprocess.run(pretrain_cmd(dataset, resumed, "--resume"), check=True, env=ENV, capture_output=True)
    a, b = metrics(whole), metrics(resumed)
    assert [r["step"] for r in b] == [str(s) for s in range(1, 9)]
    assert "dcl_image" in a[0] and "atc" in a[0]  # the default recipe: ONE-PEACE, all three modalities
    for key in a[0]:
        if key not in ("elapsed_s", "tokens_per_s"):
            assert [r[key] for r in a] == [r[key] for r in b], key
    assert json.loads((resumed / "summary.json").read_text())["precision"] == "fp32"
    eval_a, eval_b = evaluate(whole, dataset, "pil"), evaluate(resumed, dataset, "pil")
    assert eval_a == eval_b


def _rewrite_member(shard: Path, member_suffix: str, corrupt) -> str:
    """Replace the first member ending in ``member_suffix`` with ``corrupt(bytes)``."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    name = next(m.name for m, _ in members if m.name.endswith(member_suffix))
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            data = corrupt(data) if info.name == name else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return name


def test_corrupt_samples_are_skipped_and_counted(dataset, tmp_path):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(dataset), str(data)], check=True)
    shards = sorted(data.glob("train-*.tar"))
    bad_image = _rewrite_member(shards[0], ".jpg", lambda b: b"\xff\xd8 not a jpeg " + b[:40])
    bad_audio = _rewrite_member(shards[1], ".flac", lambda b: b[: len(b) // 3])
    run = tmp_path / "run"
    proc = subprocess.run(pretrain_cmd(data, run), env=ENV, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_samples"] == 2
    joined = " ".join(summary["skipped"])
    assert bad_image.split(".")[0] in joined and bad_audio.split(".")[0] in joined
    assert bad_image.split(".")[0] in proc.stderr + proc.stdout  # the warning names it
    assert len(metrics(run)) == 8


def test_missing_dataset_and_unreadable_shard_are_clear_errors(dataset, tmp_path):
    proc = subprocess.run(pretrain_cmd(tmp_path / "nowhere", tmp_path / "run"), env=ENV, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "nowhere" in proc.stderr
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(dataset), str(data)], check=True)
    broken = sorted(data.glob("train-*.tar"))[0]
    broken.write_bytes(b"this is not a tar archive")
    proc = subprocess.run(pretrain_cmd(data, tmp_path / "run2"), env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0 and broken.name in proc.stderr


def test_default_run_decodes_with_dali_and_packs_steps_to_the_budget(dataset, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "omni_core.cli", "pretrain", "--data", str(dataset), "--out", str(run),
                    "--steps", "3", "--token-budget", "400", "--no-progress"], check=True, env=ENV,
                   capture_output=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loader"] == "DaliDataset"
    rows = metrics(run)
    assert len(rows) == 3 and all(0 < int(r["tokens"]) <= 400 for r in rows)



def test_precision_is_applied_recorded_and_validated(dataset, tmp_path):
    # subprocesses, as the tests above: the run must not inherit another test's kernel backend
    for p in ("fp32", "bf16"):
        subprocess.run(pretrain_cmd(dataset, tmp_path / p, "--recipe", "contrastive", "--precision", p),
                       check=True, env=ENV, capture_output=True)
    summaries = {p: json.loads((tmp_path / p / "summary.json").read_text()) for p in ("fp32", "bf16")}
    assert summaries["fp32"]["precision"] == "fp32" and summaries["bf16"]["precision"] == "bf16"
    assert "asked for" in summaries["bf16"]["precision_reason"]
    first = float(metrics(tmp_path / "fp32")[0]["loss"]), float(metrics(tmp_path / "bf16")[0]["loss"])
    assert first[0] != first[1], "bf16 autocast must change the arithmetic"
    assert abs(first[0] - first[1]) < 0.05 * first[0], first  # same weights and data: same loss to bf16 precision
    bad = subprocess.run(pretrain_cmd(dataset, tmp_path / "bad", "--precision", "fp8"), env=ENV, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "--precision" in bad.stderr and "fp8" in bad.stderr
