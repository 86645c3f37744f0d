"""Step groups from a sample stream: packed up to a token budget, or a fixed number of samples.

Packing is first-fit-decreasing over a lookahead buffer: the buffered samples are packed into bins of
`budget` tokens; bins filled to at least `min_fill` of the budget leave as step groups, the rest go
back to the buffer to be combined with the next samples. Ties are broken by arrival order, so the
groups are a pure function of the stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from omni_core.data.sample import Sample

AUDIO_STRIDE = 320  # wav2vec2-style front end: 50 frames/s at 16 kHz


def triplet_tokens(sample: Sample, patch: int = 16, audio_stride: int = AUDIO_STRIDE) -> int:
    """Tokens of an image+audio+text sample: text (ids end with EOS) + CLS, image patches + CLS, audio frames + CLS."""
    _, h, w = sample.image.shape
    return (len(sample.token_ids) + 1) + ((h // patch) * (w // patch) + 1) + (len(sample.audio) // audio_stride + 1)


@dataclass(eq=False)  # bins compare by identity
class _Bin:
    load: int = 0
    items: list[tuple[int, int, Sample]] = field(default_factory=list)  # (cost, arrival, sample)


class PackingCollator:
    """`collator(samples)` yields lists of samples whose costs sum to at most `budget`."""

    def __init__(self, budget: int, cost: Callable[[Sample], int] = triplet_tokens,
                 lookahead: int = 256, min_fill: float = 0.97) -> None:
        if budget < 1 or lookahead < 1 or not 0 < min_fill <= 1:
            raise ValueError("need budget >= 1, lookahead >= 1 and 0 < min_fill <= 1")
        self.budget, self.cost, self.lookahead, self.min_fill = budget, cost, lookahead, min_fill
        self.real_tokens = 0
        self.groups = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / (groups × budget) over every group emitted so far."""
        return self.real_tokens / (self.groups * self.budget) if self.groups else 0.0

    def __call__(self, samples: Iterable[Sample]) -> Iterator[list[Sample]]:
        buffer: list[tuple[int, int, Sample]] = []
        for arrival, sample in enumerate(samples):
            cost = self.cost(sample)
            if cost > self.budget:
                raise ValueError(f"sample {sample.key} needs {cost} tokens, over the budget of {self.budget}")
            buffer.append((cost, arrival, sample))
            if len(buffer) >= self.lookahead:
                buffer = yield from self._emit(buffer, final=False)
        while buffer:
            buffer = yield from self._emit(buffer, final=True)

    def _emit(self, buffer: list[tuple[int, int, Sample]], final: bool):
        bins = self._first_fit_decreasing(buffer)
        ready = [b for b in bins if b.load >= self.min_fill * self.budget]
        if final:
            ready = bins
        elif not ready:  # nothing full enough: release the fullest so the buffer stays bounded
            ready = [max(bins, key=lambda b: b.load)]
        for b in ready:
            self.real_tokens += b.load
            self.groups += 1
            yield [s for _, _, s in sorted(b.items, key=lambda it: it[1])]
        left = [it for b in bins if b not in ready for it in b.items]
        return sorted(left, key=lambda it: it[1])

    def _first_fit_decreasing(self, items: list[tuple[int, int, Sample]]) -> list[_Bin]:
        bins: list[_Bin] = []
        for item in sorted(items, key=lambda it: (-it[0], it[1])):
            target = next((b for b in bins if b.load + item[0] <= self.budget), None)
            if target is None:
                target = _Bin()
                bins.append(target)
            target.load += item[0]
            target.items.append(item)
        return bins


def fixed_groups(samples: Iterable[Sample], size: int, drop_last: bool = False) -> Iterator[list[Sample]]:
    """Groups of `size` samples in stream order."""
    it = iter(samples)
    while group := list(islice(it, size)):
        if len(group) < size and drop_last:
            return
        yield group
