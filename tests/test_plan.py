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


CALIBRATION = [("tiny", 8, False, 24, {}), ("tiny", 8, True, 24, {}), ("small", 2, False, 24, {})]
# shapes the estimate's fitted term never saw: other token counts, caption lengths, widths, depths, images
HELD_OUT = [("tiny", 16, False, 24, {}), ("tiny", 4, False, 60, {}), ("small", 2, True, 24, {}),
            ("tiny", 6, False, 24, dict(dim=256, heads=4, ffn_hidden=768, depth=2)),
            ("tiny", 8, True, 24, dict(depth=6)), ("tiny", 6, False, 24, dict(image_size=96)),
            ("small", 3, False, 40, dict(depth=3))]


@pytest.mark.parametrize("preset,pairs,ac,text_tokens,overrides", CALIBRATION + HELD_OUT)
def test_activation_estimate_matches_measured_cpu_peak(preset, pairs, ac, text_tokens, overrides):
    peak, tokens, image_fraction = measured_activation_peak(preset, pairs, text_tokens, ac, **overrides)
    estimate = cpu_activation_estimate(preset, tokens, image_fraction, ac, **overrides)
    assert 0.75 <= estimate / peak <= 1.25, (estimate / 2**20, peak / 2**20)


def test_cli_prints_the_plan():
    out = subprocess.run([sys.executable, "-m", "omni_core.cli", "model", "plan", "--preset", "one-peace-4b",
                          "--gpus", "8", "--gpu-mem", "80"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "largest token budget that fits" in out.stdout and "optimizer (AdamW fp32)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "omni_core.cli", "model", "plan", "--preset", "tiny",
                          "--gpus", "0", "--gpu-mem", "80"], capture_output=True, text=True)
    assert bad.returncode == 1 and "--gpus" in bad.stderr
