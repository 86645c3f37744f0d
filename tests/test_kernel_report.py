"""The static kernel report compiles real kernels for sm_80 and sm_90 without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(REPORT), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_quick_json_report_has_real_values():
    done = _run("--json", "--quick", "--kernel", "varlen_attention")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"varlen_attention_fwd", "varlen_attention_bwd_delta", "varlen_attention_bwd_dkdv",
                       "varlen_attention_bwd_dq", "varlen_attention_bwd_dq_bias_grad", "varlen_attention_bwd_fused",
                       "varlen_attention_bwd_fused_bias_grad"}
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert {"kernel", "target", "config", "registers", "spill_bytes", "shared_bytes", "tensor_core"} <= set(r)
        assert 0 < r["registers"] <= 255
        assert r["shared_bytes"] > 0
        assert r["spill_bytes"] == 0, r
        # The bias-gradient kernels keep 32-row tiles (64 rows spill: configs.DQ_BIAS_GRAD_CONFIGS,
        # FUSED_BIAS_GRAD_CONFIGS), below warpgroup MMA's 64, so sm_90 runs them as HMMA.
        # The fused backward's first config has 64 key rows (warpgroup MMA for the four dots with
        # key rows) and 32 query rows (HMMA for the dq dot).
        hopper = "HMMA" if r["kernel"].endswith("_bias_grad") else (
            "HGMMA,HMMA" if r["kernel"] == "varlen_attention_bwd_fused" else "HGMMA")
        if r["kernel"] == "varlen_attention_bwd_delta":  # a row reduction: no dot, no tensor cores
            assert r["mma"] == "none", r
        else:
            assert r["mma"] == {"sm_80": "HMMA", "sm_90": hopper}[r["target"]], r  # fp16: tensor cores
        assert r["flops"] > 0 and r["min_bytes"] > 0


def test_static_table_and_interpreter_rerun():
    """Under TRITON_INTERPRET=1 the report re-runs itself without the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(REPORT), "--static", "--quick", "--kernel", "varlen_attention_fwd"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["kernel", "target", "dtype", "config"]
    assert len(lines) == 3 and all(line.startswith("varlen_attention_fwd") for line in lines[1:])


def test_hopper_only_attention_tiles_are_pruned_elsewhere():
    """The fused backward's sm_90-only tiles are listed for the sm_90 report only, and the
    autotuner drops them at launch time on anything older (compiled code path, no GPU needed)."""
    script = """
from omni_core.kernels.varlen_attention import configs
hopper = [c for c in configs.aot_configs() if c.label.endswith("sm_90 only")]
assert hopper and all(c.extra["targets"] == (90,) for c in hopper)
tuner = configs._bwd_fused[False][("half", 64)]
portable = len(configs.FUSED_CONFIGS[("half", 64)])
for on_hopper, kept in ((False, portable), (True, len(tuner.configs))):
    configs._on_hopper = lambda on_hopper=on_hopper: on_hopper
    assert len(tuner.early_config_prune(tuner.configs, {})) == kept
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
