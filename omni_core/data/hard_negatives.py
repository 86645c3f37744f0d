"""Hard-negative step composition for contrastive training on scene captions.

The synthetic eval split asks retrieval to tell "a red star on the left" from "a red star on
the left and a blue circle at the top": the second scene contains the first. With random
steps such a pair rarely shares a step, so the contrastive loss seldom sees it. This order
puts samples that share an object phrase next to each other — every phrase in turn
(shuffled), up to ``cluster`` not-yet-placed samples that mention it — and the steps are
then cut from that order in sequence, so each step holds several such clusters. The order is
a pure function of (seed, epoch).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator

from omni_core.data.sample import Sample


def phrases(caption: str) -> list[str]:
    """The object phrases of a caption ("a red star on the left and a blue circle ..." →
    ["red star on the left", "blue circle ..."])."""
    return [p.strip().removeprefix("a ").removeprefix("an ") for p in caption.lower().split(" and ")]


def clustered_order(samples: list[Sample], seed: int, epoch: int, cluster: int = 6) -> list[int]:
    """Sample indices with each object phrase's samples (up to ``cluster``) adjacent."""
    rng = random.Random(f"hard-negatives-{seed}-{epoch}")
    by_phrase: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        for p in phrases(s.text):
            by_phrase[p].append(i)
    keys = sorted(by_phrase)
    rng.shuffle(keys)
    placed = [False] * len(samples)
    order: list[int] = []
    for key in keys:
        members = [i for i in by_phrase[key] if not placed[i]]
        rng.shuffle(members)
        for i in members[:cluster]:
            placed[i] = True
            order.append(i)
    rest = [i for i in range(len(samples)) if not placed[i]]
    rng.shuffle(rest)
    return order + rest


def next_fit(samples: list[Sample], budget: int, cost: Callable[[Sample], int]) -> Iterator[list[Sample]]:
    """Consecutive samples up to ``budget`` tokens per step (keeps the clusters together)."""
    group, load = [], 0
    for s in samples:
        c = cost(s)
        if c > budget:
            raise ValueError(f"sample {s.key} needs {c} tokens, over the budget of {budget}")
        if load + c > budget:
            yield group
            group, load = [], 0
        group.append(s)
        load += c
    if group:
        yield group
