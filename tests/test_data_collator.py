import random

import pytest
import torch

from omni_core.data.collator import PackingCollator, fixed_groups, triplet_tokens
from omni_core.data.sample import Sample


def _mix(n: int, seed: int = 0) -> list[Sample]:
    """Samples shaped like the synthetic set: 64 px images, 1.5-4 s of speech, 6-16 text tokens."""
    rng = random.Random(seed)
    return [Sample(f"s{i}", torch.zeros(3, 64, 64), torch.zeros(rng.randint(24000, 64000)), "x",
                   torch.zeros(rng.randint(6, 16), dtype=torch.long)) for i in range(n)]


def test_triplet_tokens():
    s = Sample("k", torch.zeros(3, 64, 48), torch.zeros(16000), "x", torch.zeros(9, dtype=torch.long))
    assert triplet_tokens(s) == 10 + (4 * 3 + 1) + (50 + 1)


def test_packing_respects_budget_keeps_every_sample_and_is_efficient():
    samples = _mix(3000)
    collator = PackingCollator(budget=4096)
    groups = list(collator(samples))
    assert all(sum(triplet_tokens(s) for s in g) <= 4096 for g in groups)
    assert sorted(s.key for g in groups for s in g) == sorted(s.key for s in samples)
    real = sum(triplet_tokens(s) for s in samples)
    assert collator.efficiency == pytest.approx(real / (len(groups) * 4096))
    assert collator.efficiency >= 0.95
    again = [[s.key for s in g] for g in PackingCollator(budget=4096)(samples)]
    assert again == [[s.key for s in g] for g in groups]


def test_small_lookahead_still_bounded_and_complete():
    samples = _mix(200, seed=1)
    groups = list(PackingCollator(budget=1000, lookahead=3)(samples))
    assert sum(map(len, groups)) == 200
    assert all(sum(triplet_tokens(s) for s in g) <= 1000 for g in groups)


def test_oversized_sample_is_an_error_naming_it():
    with pytest.raises(ValueError, match="s0"):
        list(PackingCollator(budget=50)(_mix(1)))


def test_fixed_groups():
    assert [len(g) for g in fixed_groups(_mix(10), 4)] == [4, 4, 2]
    assert [len(g) for g in fixed_groups(_mix(10), 4, drop_last=True)] == [4, 4]


def test_data_bench_json(dataset, capsys):
    import json

    from omni_core.data import bench

    assert bench.main(["--data", str(dataset), "--repeats", "1", "--budget", "1024", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fallback_samples_per_s"] > 0 and result["samples"] == 24
    assert 0 < result["packing_efficiency"] <= 1
    assert result["dali_cpu_samples_per_s"] is None or result["dali_cpu_samples_per_s"] > 0
