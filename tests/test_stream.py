"""Streaming loader: disjoint ranks and workers covering the epoch, exact mid-epoch resume,
a corrupt shard skipped and counted on its rank only, the epoch cut to the shortest rank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from omni_core.data.collator import fixed_groups
from omni_core.data.dali import dali_available
from omni_core.data.loader import split_entries
from omni_core.data.shards import ShardWriter, read_shard
from omni_core.data.stream import StreamingLoader, StreamPosition


def pairs(samples):
    return list(fixed_groups(samples, 2))


@pytest.fixture(scope="module")
def sharded(dataset, tmp_path_factory) -> Path:
    """The shared dataset with its train split rewritten into six shards of four samples."""
    out = tmp_path_factory.mktemp("sharded")
    for f in dataset.iterdir():
        if not f.name.startswith("train-"):
            shutil.copy(f, out / f.name)
    records = [r for e in split_entries(dataset, "train") for r in read_shard(dataset / e["path"])]
    entries = []
    for i in range(0, len(records), 4):
        name = f"train-{i // 4:06d}.tar"
        with ShardWriter(out / name) as w:
            for key, members in records[i:i + 4]:
                w.write(key, members)
        entries.append({"path": name, "num_samples": len(records[i:i + 4])})
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"] = {"num_samples": len(records), "shards": entries}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def keys_of(loader: StreamingLoader, pos: StreamPosition | None = None) -> list[list[str]]:
    return [[s.key for s in g] for g, _ in loader.steps(pos or loader.start(0))]


def test_ranks_and_workers_are_disjoint_and_cover_the_epoch(sharded):
    all_keys = {k for e in split_entries(sharded, "train") for k, _ in read_shard(sharded / e["path"])}
    seen = []
    for rank in range(2):
        loader = StreamingLoader(sharded, "train", pairs, rank=rank, world_size=2, workers=3, chunk=3,
                                 backend="pil", seed=5)
        shards = [set(sh for sh, _ in loader.worker_order(1, k)) for k in range(3)]
        assert all(len(s) == 1 for s in shards) and len(set().union(*shards)) == 3  # disjoint workers
        seen.append([k for g in keys_of(loader, loader.start(1)) for k in g])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_keys)
    # the order is a function of (seed, epoch)
    again = StreamingLoader(sharded, "train", pairs, rank=0, world_size=2, workers=3, chunk=3, backend="pil", seed=5)
    assert [k for g in keys_of(again, again.start(1)) for k in g] == seen[0]
    assert again.worker_order(2, 0) != again.worker_order(1, 0)


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="DALI not installed"))])
def test_resume_mid_epoch_continues_exactly(sharded, backend):
    def make():
        return StreamingLoader(sharded, "train", pairs, rank=1, world_size=2, workers=2, chunk=5,
                               backend=backend, seed=1, train_crop=True)

    whole = list(make().steps(make().start(0)))
    assert len(whole) >= 5
    for cut in (1, 3, len(whole) - 1):  # inside a chunk, across a worker switch, before the end
        resumed = list(make().steps(whole[cut - 1][1]))
        assert [[s.key for s in g] for g, _ in resumed] == [[s.key for s in g] for g, _ in whole[cut:]]
        first_a, first_b = whole[cut][0][0], resumed[0][0][0]
        assert first_a.image.equal(first_b.image) and first_a.audio.equal(first_b.audio)


def test_corrupt_shard_is_skipped_and_counted_on_its_rank(sharded, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sharded, data)
    probe = StreamingLoader(data, "train", pairs, rank=1, world_size=2, backend="pil", seed=2)
    victim = data / probe.entries[probe.rank_shards(0)[0]]["path"]
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated mid-archive
    counts = []
    for rank in range(2):
        loader = StreamingLoader(data, "train", pairs, rank=rank, world_size=2, backend="pil", seed=2)
        if rank == 1:
            with pytest.warns(UserWarning, match="remaining samples are skipped"):
                steps = keys_of(loader)
        else:
            steps = keys_of(loader)
        counts.append((len(loader.skipped), sum(map(len, steps))))
    assert counts[0] == (0, 12)  # rank 0 untouched
    lost, kept = counts[1]
    assert lost >= 3 and lost + kept == 12  # rank 1 skipped the damaged shard's samples, read the rest


def test_epoch_is_cut_to_the_shortest_rank(sharded):
    calls = []

    def peer_has_two_steps(have: bool) -> bool:
        calls.append(have)
        return have and len(calls) <= 2

    loader = StreamingLoader(sharded, "train", pairs, world_size=1, backend="pil", sync=peer_has_two_steps)
    assert len(keys_of(loader)) == 2 and calls == [True, True, True]


def test_too_few_shards_is_a_clear_error(dataset):
    with pytest.raises(ValueError, match="fewer than"):
        StreamingLoader(dataset, "train", pairs, rank=0, world_size=2, workers=2, backend="pil")
