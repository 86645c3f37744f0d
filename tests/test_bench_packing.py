import json

from omni_core.cli import main


def test_bench_packing_json_contract(capsys):
    assert main(["bench", "packing", "--json", "--repeats", "1", "--pairs", "3", "--mix", "stage2-audio-text",
                 "--precision", "fp32", "bf16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["mix"], r["precision"]) for r in rows] == [("stage2-audio-text", "fp32"), ("stage2-audio-text", "bf16")]
    bf16 = rows[1]  # the same step under bf16 autocast, timed alternating with fp32
    assert bf16["speedup_vs_fp32"] > 0 and bf16["gemm_peak_gflops"] > 0 and "speedup_vs_fp32" not in rows[0]
    assert bf16["precision_choice"].startswith("bf16 autocast")
    row = rows[0]
    for key in ("mix", "packed_tokens_per_s", "padded_tokens_per_s", "speedup", "flop_ratio", "gflops",
                "gemm_peak_gflops", "efficiency"):
        assert key in row
    assert row["packed_tokens_per_s"] > 0 and row["padded_tokens_per_s"] > 0 and 0 < row["efficiency"]
    assert row["passes_padded"] == 7  # stage 2: five encoder passes and two decoder passes
    # Audio clips of 1–15 s padded to the longest: padding must cost FLOPs.
    assert row["flop_ratio"] > 1.1
    assert abs(row["speedup"] - row["padded_tokens_per_s"] ** -1 * row["packed_tokens_per_s"]) < 0.05 * row["speedup"]
