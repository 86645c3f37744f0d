import json

from omni_core.cli import main


def test_bench_packing_json_contract(capsys):
    assert main(["bench", "packing", "--json", "--repeats", "1", "--pairs", "3", "--mix", "stage2-audio-text"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mix"] for r in rows] == ["stage2-audio-text"]
    row = rows[0]
    for key in ("mix", "packed_tokens_per_s", "padded_tokens_per_s", "speedup", "flop_ratio", "gflops",
                "gemm_peak_gflops", "efficiency"):
        assert key in row
    assert row["packed_tokens_per_s"] > 0 and row["padded_tokens_per_s"] > 0 and 0 < row["efficiency"]
    assert row["passes_padded"] == 7  # stage 2: five encoder passes and two decoder passes
    # Audio clips of 1–15 s padded to the longest: padding must cost FLOPs.
    assert row["flop_ratio"] > 1.1
    assert abs(row["speedup"] - row["padded_tokens_per_s"] ** -1 * row["packed_tokens_per_s"]) < 0.05 * row["speedup"]
