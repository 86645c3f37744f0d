"""Helpers for the tests that run ``omni pretrain`` in subprocesses (trainer, OPT recipe)."""

import csv
import signal
import subprocess
import time
from pathlib import Path


def metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def kill_after_first_checkpoint(cmd: list[str], run: Path, env: dict, timeout_s: float = 300) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``run`` holds a checkpoint."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not (run / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-way"
