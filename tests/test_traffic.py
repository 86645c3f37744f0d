"""The traffic model's counters (benchmarks/traffic.py) on kernels whose traffic is known exactly."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "traffic.py"
_spec = importlib.util.spec_from_file_location("omni_traffic", _PATH)
traffic = sys.modules.setdefault("omni_traffic", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(traffic)


@triton.jit
def _tiny_kernel(X, W, Y, Acc, ROWS: tl.constexpr):
    """Per program: a 16x16 fp32 tile of X and all of W, one dot, ROWS of 16 output rows
    stored, 16 atomics onto 4 addresses (each address 4 times)."""
    pid = tl.program_id(0)
    r = tl.arange(0, 16)
    x = tl.load(X + pid * 256 + r[:, None] * 16 + r[None, :])
    w = tl.load(W + r[:, None] * 16 + r[None, :])
    y = tl.dot(x, w)
    tl.store(Y + pid * 256 + r[:, None] * 16 + r[None, :], y, mask=r[:, None] < ROWS)
    tl.atomic_add(Acc + r % 4, tl.sum(y, 1))


def test_counts_of_a_known_kernel():
    programs, rows = 3, 10
    x, w = torch.randn(programs * 16, 16), torch.randn(16, 16)
    y, acc = torch.zeros(programs * 16, 16), torch.zeros(4)
    launches, _ = traffic.count(lambda: _tiny_kernel[(programs,)](x, w, y, acc, ROWS=rows))
    assert [launch.name for launch in launches] == ["_tiny_kernel"]
    (launch,) = launches
    assert launch.grid == (programs, 1, 1)
    assert launch.flops == programs * 2 * 16 * 16 * 16
    assert launch.atomics == programs * 16
    assert launch.max_same_address_atomics == programs * 4  # 16 lanes onto 4 words, every program
    # requested: every X tile, W once per program, the unmasked Y rows, one fp32 per atomic
    assert launch.requested_bytes == 4 * (programs * 256 + programs * 256 + programs * rows * 16 + programs * 16)
    # DRAM model: distinct 32-byte sectors: X and W once, the stored rows, Acc's one sector
    assert launch.bytes == 4 * (programs * 256 + 256 + programs * rows * 16) + traffic.SECTOR
    assert sum(b for _, b in launch.by_tensor) == launch.bytes
    shapes = dict(launch.by_tensor)
    assert shapes[(programs * 16, 16)] in (4 * programs * 256, 4 * programs * rows * 16)
    torch.testing.assert_close(y[:rows], (x @ w)[:rows])  # the instrumented run still computes


def test_torch_ops_between_launches_are_counted():
    a = torch.randn(100, 8)
    launches, _ = traffic.count(lambda: (a.float() * 2.0).sum(0))
    names = [launch.name for launch in launches]
    assert names == ["torch.mul", "torch.sum"]
    assert launches[0].bytes == 2 * 100 * 8 * 4  # read a, write the product
    assert launches[1].bytes == 100 * 8 * 4 + 8 * 4


def test_roofline_bound_and_time():
    compute = traffic.Launch("gemm", flops=10**12, bytes=10**6)
    memory = traffic.Launch("copy", bytes=2 * 3_350 * 10**6)
    assert traffic.launch_ms(compute, "h100", "bf16") == (pytest.approx(1e3 / 989.4), "compute")
    assert traffic.launch_ms(memory, "h100", "bf16") == (pytest.approx(2.0), "bandwidth")
    row = traffic.summarise("k", "c", [compute, memory], ideal_bytes=10**6, dtype="bf16")
    assert row["h100_ms"] == pytest.approx(1e3 / 989.4 + 2.0)
    assert row["bound"] == "bandwidth"
    assert row["h100_tensor_peak_fraction"] == pytest.approx((1e3 / 989.4) / (1e3 / 989.4 + 2.0), abs=1e-3)


def test_scale_launch_carries_each_tensor():
    launch = traffic.Launch("k", flops=100, bytes=700, requested_bytes=1400,
                            by_tensor=[((10, 4), 400), ((4, 6), 200), ((), 100)])
    full = traffic.scale_launch(launch, {10: 1000, 4: 8}, flop_ratio=50.0)
    assert full.bytes == 400 * 200 + 200 * 2 + 100
    assert full.flops == 5000
    assert full.requested_bytes == round(1400 * full.bytes / 700)


def test_json_report_rows(monkeypatch, capsys):
    """The CLI's JSON: one object per (kernel, case) with the documented keys; tiny widths."""
    monkeypatch.setattr(traffic, "DIM", 48)
    monkeypatch.setattr(traffic, "PACKS", {"stage1": 1, "stage2": 1})
    monkeypatch.setattr(traffic, "pack_sequences", lambda pack, pairs, seed=0: [[(0, 5)], [(1, 9), (0, 3)]])
    assert traffic.main(["--json", "--kernel", "layer_norm", "--case", "stage1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kernel"], r["case"]) for r in rows] == [("layer_norm_fwd", "stage1"), ("layer_norm_bwd", "stage1")]
    for r in rows:
        assert {"kernel", "case", "bytes", "ideal_bytes", "flops", "atomics", "max_same_address_atomics",
                "h100_ms", "a100_ms", "bound"} <= set(r)
        assert r["bytes"] >= r["ideal_bytes"] * 0.9 > 0
        assert r["h100_ms"] < r["a100_ms"]
    # forward: x read, y written (17 x 48 bf16 each), weight and bias, the fp32 statistics
    fwd = rows[0]
    assert fwd["ideal_bytes"] == 2 * 17 * 48 * 2 + 2 * 48 * 2


def test_attention_path_sweep_compares_both_backward_paths():
    """The data behind the attention backward's dispatch rule: both paths on one pack, the fused
    one with 5/7 of the two kernels' FLOPs and dq atomics, the two kernels with none."""
    fused, two = traffic.attention_path_sweep(lengths=(128,), tokens=128)
    assert (fused["case"], two["case"]) == ("sweep-L128-fused", "sweep-L128-two_kernel")
    assert fused["flops"] * 7 == two["flops"] * 5
    assert fused["atomics"] > 0 and two["atomics"] == 0
    assert fused["over_two_kernel"]["h100"] == fused["h100_ms"] / two["h100_ms"]
