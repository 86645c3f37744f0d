"""`omni model plan`: parameter counts from the built model, budgets that add up, and the
activation estimate within 25 % of torch's measured CPU peak for the small presets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from omni_core.model.omni import OmniModel
from omni_core.model.plan import GiB, cpu_activation_estimate, measured_activation_peak, plan


@pytest.mark.parametrize("preset", ["tiny", "one-peace-4b"])
def test_budget_adds_up(preset):
    p = plan(preset, gpus=8, gpu_mem_gib=80)
    assert p.parameters == OmniModel.from_preset(preset, device="meta").num_parameters()
    assert p.max_tokens_per_gpu > 0 and p.fits
    over = plan(preset, gpus=8, gpu_mem_gib=80, tokens_per_gpu=p.max_tokens_per_gpu + 1)
    assert not over.fits and over.total_bytes > 80 * GiB >= p.total_bytes
    fewer = plan(preset, gpus=2, gpu_mem_gib=80)
    assert fewer.optimizer_bytes == pytest.approx(4 * p.optimizer_bytes)  # FSDP shards the states
    ddp = plan(preset, gpus=8, gpu_mem_gib=80, dist="ddp")
    assert ddp.optimizer_bytes == pytest.approx(8 * p.optimizer_bytes)
    ac = plan(preset, gpus=8, gpu_mem_gib=80, checkpoint_activations=True)
    assert ac.max_tokens_per_gpu > 2 * p.max_tokens_per_gpu


@pytest.mark.parametrize("preset,pairs,ac", [("tiny", 8, False), ("tiny", 8, True), ("small", 2, False)])
def test_activation_estimate_matches_measured_cpu_peak(preset, pairs, ac):
    peak, tokens, image_fraction = measured_activation_peak(preset, pairs, checkpoint_activations=ac)
    estimate = cpu_activation_estimate(preset, tokens, image_fraction, ac)
    assert 0.75 <= estimate / peak <= 1.25, (estimate / 2**20, peak / 2**20)


def test_cli_prints_the_plan():
    out = subprocess.run([sys.executable, "-m", "omni_core.cli", "model", "plan", "--preset", "one-peace-4b",
                          "--gpus", "8", "--gpu-mem", "80"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "largest token budget that fits" in out.stdout and "optimizer (AdamW fp32)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "omni_core.cli", "model", "plan", "--preset", "tiny",
                          "--gpus", "0", "--gpu-mem", "80"], capture_output=True, text=True)
    assert bad.returncode == 1 and "--gpus" in bad.stderr
