"""Streaming training data for many ranks: disjoint shards per rank and worker, decoded on the
fly, packed into steps, exactly resumable, never a whole split in memory.

Order. Epoch e visits the split's shards in a permutation drawn from (seed, e); rank r of W
takes shards ``perm[r::W]`` and its worker k of K takes ``perm[r::W][k::K]``, so ranks and
workers read disjoint shards that together cover the epoch. Inside a shard the samples come in a
permutation drawn from (seed, e, shard).

Chunks. Each worker reads its order in chunks of ``chunk`` records; a worker thread decodes a
chunk (DALI or PIL, as :func:`omni_core.data.dali.make_loader` chooses: DALI's GPU pipeline
where it sees a GPU, its CPU pipeline otherwise, PIL + soundfile without DALI) and cuts it into
steps with ``group`` (the trainer's packing collator or fixed batches). Chunks are taken from the
workers in turn. A chunk is packed on its own, so a step never spans two chunks and the steps are
a pure function of (seed, epoch, rank, world size, workers).

Position. :class:`StreamPosition` is (epoch, the worker whose chunk is current, where each
worker's current or next chunk starts in its order, steps already taken from the current chunk).
Resuming re-decodes the current chunk and skips the steps already taken: the same steps follow.
Memory: one raw shard per worker (the tar is read whole, as the loaders do) and a few decoded
chunks.

Equal steps. With a process group, every step is agreed by an all-reduce of "I have a step": the
epoch ends on every rank as soon as one rank has run out, and the other ranks DROP their
remaining steps of that epoch (the next epoch is a fresh permutation). Corrupt samples are
skipped by the decoders and recorded per rank in ``skipped``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from omni_core.data.dali import DaliDataset, make_loader
from omni_core.data.loader import ShardDataset, Skipped, split_entries
from omni_core.data.sample import Sample
from omni_core.data.shards import ShardError, prefetch, read_shard
from omni_core.data.tokenizer import CaptionTokenizer

Groups = Callable[[list[Sample]], list[list[Sample]]]


@dataclass
class StreamPosition:
    epoch: int = 0
    worker: int = 0  # whose chunk is current
    starts: list[int] = field(default_factory=list)  # per worker: record index of its current/next chunk
    groups_done: int = 0  # steps already taken from the current chunk

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StreamPosition:
        return cls(**d)


class StreamingLoader:
    """Steps of one rank: ``for group, position in loader.steps(position)``."""

    def __init__(self, path: str | Path, split: str, group: Groups, *, rank: int = 0, world_size: int = 1,
                 workers: int = 1, chunk: int = 256, image_size: int | None = None,
                 tokenizer: CaptionTokenizer | None = None, seed: int = 0, shuffle: bool = True,
                 backend: str = "auto", decode_threads: int = 2, train_crop: bool | None = None,
                 sync: Callable[[bool], bool] | None = None) -> None:
        if not 0 <= rank < world_size or workers < 1 or chunk < 1:
            raise ValueError("need 0 <= rank < world_size, workers >= 1 and chunk >= 1")
        self.root, self.split, self.group = Path(path), split, group
        self.entries = split_entries(self.root, split)
        readers = world_size * workers
        if len(self.entries) < readers:
            raise ValueError(f"{self.root}: split {split!r} has {len(self.entries)} shards, fewer than "
                             f"{world_size} ranks x {workers} workers; streaming gives every reader whole "
                             f"shards (write more, smaller shards, or train from memory with --cache)")
        self.rank, self.world_size, self.workers, self.chunk = rank, world_size, workers, chunk
        self.seed, self.shuffle = seed, shuffle
        self.sync = sync if sync is not None else _all_ranks_have
        self.decoders = [self._decoder(image_size, tokenizer, backend, decode_threads, train_crop)
                         for _ in range(workers)]

    def _decoder(self, image_size, tokenizer, backend, threads, train_crop) -> ShardDataset | DaliDataset:
        ds = make_loader(self.root, self.split, image_size=image_size, tokenizer=tokenizer, seed=self.seed,
                         num_threads=threads, backend=backend, train_crop=train_crop)
        source = ds.source if isinstance(ds, DaliDataset) else ds
        # a chunk re-reads its shard; keep the last raw shard instead of re-reading the tar
        source.read_records = lru_cache(maxsize=1)(lambda shard: self._read_tolerant(source, shard))
        return ds

    def _read_tolerant(self, source: ShardDataset, shard: int) -> list[tuple[str, dict[str, bytes]]]:
        """A shard's records; past a damaged or truncated part of the tar, empty placeholders, which
        the decoders then skip and record one by one (the run goes on)."""
        records: list[tuple[str, dict[str, bytes]]] = []
        try:
            records.extend(read_shard(source.shards[shard]))
        except ShardError as err:
            warnings.warn(f"rank {self.rank}: {err}; its remaining samples are skipped", stacklevel=2)
        expected = self.entries[shard]["num_samples"]
        records = records[:expected]
        return records + [(f"unreadable-{i}", {}) for i in range(len(records), expected)]

    @property
    def backend(self) -> str:
        return type(self.decoders[0]).__name__

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return sum(e["num_samples"] for e in self.entries)

    @property
    def skipped(self) -> list[Skipped]:
        """This rank's skipped samples (all its workers)."""
        return [s for d in self.decoders for s in d.skipped]

    def start(self, epoch: int = 0) -> StreamPosition:
        return StreamPosition(epoch, 0, [0] * self.workers, 0)

    # ------------------------------------------------------------ order
    def rank_shards(self, epoch: int) -> list[int]:
        shards = list(range(len(self.entries)))
        if self.shuffle:
            random.Random(f"stream-shards-{self.seed}-{epoch}").shuffle(shards)
        return shards[self.rank::self.world_size]

    def worker_order(self, epoch: int, worker: int) -> list[tuple[int, int]]:
        """(shard, position in shard) that ``worker`` of this rank visits in ``epoch``."""
        order = []
        for s in self.rank_shards(epoch)[worker::self.workers]:
            positions = list(range(self.entries[s]["num_samples"]))
            if self.shuffle:
                random.Random(f"stream-samples-{self.seed}-{epoch}-{s}").shuffle(positions)
            order.extend((s, p) for p in positions)
        return order

    def describe(self, pos: StreamPosition) -> dict:
        """The (epoch, shard, sample) where each worker's current/next chunk starts."""
        out = []
        for k, start in enumerate(pos.starts):
            order = self.worker_order(pos.epoch, k)
            shard, sample = order[start] if start < len(order) else (None, None)
            out.append({"worker": k, "shard": None if shard is None else self.entries[shard]["path"],
                        "sample": sample})
        return {"epoch": pos.epoch, "groups_done": pos.groups_done, "workers": out}

    # ------------------------------------------------------------ steps
    def steps(self, pos: StreamPosition) -> Iterator[tuple[list[Sample], StreamPosition]]:
        """This rank's steps of ``pos.epoch`` from ``pos`` on, each with the position after it.
        Stops on every rank together (see the module docstring)."""
        local = self._local_steps(pos)
        while True:
            item = next(local, None)
            if not self.sync(item is not None):
                local.close()
                return
            yield item

    def _local_steps(self, pos: StreamPosition) -> Iterator[tuple[list[Sample], StreamPosition]]:
        if len(pos.starts) != self.workers:
            raise ValueError(f"data position has {len(pos.starts)} workers, this loader {self.workers}")
        orders = [self.worker_order(pos.epoch, k) for k in range(self.workers)]
        chunks = [prefetch(self._chunks(pos.epoch, k, orders[k], pos.starts[k]), depth=2)
                  for k in range(self.workers)]
        starts, k, skip = list(pos.starts), pos.worker, pos.groups_done
        try:
            while True:
                live = [j for j in range(self.workers) if starts[j] < len(orders[j])]
                if not live:
                    return
                k = min(live, key=lambda j: (j - k) % self.workers)  # k itself, else the next live worker
                start, groups = next(chunks[k])
                assert start == starts[k], "worker chunks out of step"
                for i in range(skip, len(groups)):
                    yield groups[i], StreamPosition(pos.epoch, k, list(starts), i + 1)
                starts[k] = min(start + self.chunk, len(orders[k]))
                k, skip = (k + 1) % self.workers, 0
        finally:
            for c in chunks:
                c.close()

    def _chunks(self, epoch: int, worker: int, order: list[tuple[int, int]], start: int
                ) -> Iterator[tuple[int, list[list[Sample]]]]:
        """(chunk start, its steps) for the worker's chunks from ``start`` on (runs in a thread)."""
        decoder = self.decoders[worker]
        source = decoder.source if isinstance(decoder, DaliDataset) else decoder
        for lo in range(start, len(order), self.chunk):
            window = order[lo:lo + self.chunk]
            # Both decoders visit the records their source's epoch_order lists: point it at this chunk.
            source.epoch_order = lambda _epoch, w=window: w
            samples = list(decoder.iter_epoch(epoch))
            yield lo, self.group(samples)


def _all_ranks_have(have: bool) -> bool:
    """True when every rank has a next step (an all-reduce MIN), ``have`` in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return have
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([int(have)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
