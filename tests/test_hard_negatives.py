"""Hard-negative step composition: samples sharing an object phrase travel together."""

import pytest
import torch

from omni_core.data.hard_negatives import clustered_order, next_fit, phrases
from omni_core.data.sample import Sample


def sample(i, text):
    return Sample(f"k{i}", torch.zeros(1), torch.zeros(1), text, torch.zeros(3 + i % 4, dtype=torch.long))


CAPTIONS = ["a red star on the left", "a red star on the left and a blue circle at the top",
            "a green square at the bottom", "a blue circle at the top", "a green square at the bottom and a red "
            "star on the left", "a yellow hexagon in the center"] * 3


def test_phrases_split_scenes_into_objects():
    assert phrases("a red star on the left and an orange circle at the top") == [
        "red star on the left", "orange circle at the top"]


def test_clustered_order_is_a_deterministic_permutation_with_related_samples_adjacent():
    samples = [sample(i, c) for i, c in enumerate(CAPTIONS)]
    order = clustered_order(samples, seed=1, epoch=0, cluster=6)
    assert sorted(order) == list(range(len(samples)))
    assert order == clustered_order(samples, seed=1, epoch=0, cluster=6)
    assert order != clustered_order(samples, seed=1, epoch=1, cluster=6)
    # the first cluster: every member mentions the same phrase
    first = [set(phrases(samples[i].text)) for i in order[:6]]
    assert set.intersection(*first)


def test_next_fit_keeps_the_order_and_the_budget():
    samples = [sample(i, c) for i, c in enumerate(CAPTIONS)]
    groups = list(next_fit(samples, budget=12, cost=lambda s: s.token_ids.numel()))
    assert [s for g in groups for s in g] == samples
    assert all(sum(s.token_ids.numel() for s in g) <= 12 for g in groups)
    with pytest.raises(ValueError, match="over the budget"):
        list(next_fit(samples, budget=3, cost=lambda s: 10))
