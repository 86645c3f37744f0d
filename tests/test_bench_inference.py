"""``omni bench inference``: packed and padded embeddings agree, numbers are reported per
modality and precision, bad arguments are rejected."""

from __future__ import annotations

import json

import pytest

from omni_core import cli


def test_inference_bench_json(dataset, capsys):
    code = cli.main(["bench", "inference", "--data", str(dataset), "--items", "6", "--batch-size", "4",
                     "--repeats", "1", "--precision", "fp32", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [r["modality"] for r in rows] == ["text", "image", "audio"]
    for r in rows:
        assert r["items"] == 6 and r["precision"] == "fp32"
        assert r["packed_per_s"] > 0 and r["padded_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["packed_per_s"] / r["padded_per_s"], rel=2e-2, abs=1e-3)
        # the same model on the same items: packing must not change the embeddings
        assert r["max_diff"] < 1e-4, r


def test_inference_bench_rejects_bad_arguments(dataset, capsys):
    assert cli.main(["bench", "inference", "--data", str(dataset), "--items", "0"]) == 1
    assert "--items" in capsys.readouterr().err
