import io
import shutil
import warnings

import pytest
import torch

from omni_core.data.loader import CLIP_MEAN, CLIP_STD, ShardDataset, load_eval_split
from omni_core.data.shards import ShardError, ShardWriter, read_shard
from omni_core.data.tokenizer import load_tokenizer


def test_sample_shapes_and_normalisation(dataset):
    samples = load_eval_split(dataset)
    eos = load_tokenizer(dataset).eos_id
    assert [s.key for s in samples] == [f"eval-{i:07d}" for i in range(8)]
    for s in samples:
        assert s.image.shape == (3, 64, 64) and s.image.dtype == torch.float32
        assert s.audio.dtype == torch.float32 and s.audio.dim() == 1 and s.audio.numel() >= 16000
        assert abs(s.audio.mean().item()) < 1e-4 and abs(s.audio.std().item() - 1) < 1e-3
        assert s.token_ids.dtype == torch.long and 0 < len(s.token_ids) <= 71 and int(s.token_ids[-1]) == eos
        pixels = s.image * CLIP_STD + CLIP_MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert s.text.startswith(("a ", "an "))


def test_resize_on_load(dataset):
    s = next(iter(ShardDataset(dataset, "eval", image_size=32)))
    assert s.image.shape == (3, 32, 32)


def test_epoch_order_is_deterministic_and_resumable(dataset):
    ds = ShardDataset(dataset, "train", shuffle=True, seed=7)
    order0 = ds.epoch_order(0)
    assert order0 == ShardDataset(dataset, "train", shuffle=True, seed=7).epoch_order(0)
    assert order0 != ds.epoch_order(1) and sorted(order0) == sorted(ds.epoch_order(1))
    keys = [s.key for s in ds]
    assert ds.epoch == 1 and len(keys) == len(set(keys)) == 24
    assert keys != sorted(keys)
    resumed = [s.key for s in ds.iter_epoch(0, start=10)]
    assert resumed == keys[10:]
    assert [len(b) for b in ds.batches(10)] == [10, 10, 4]


def _rewrite(src, dst, damage):
    with ShardWriter(dst) as w:
        for key, members in read_shard(src):
            w.write(key, damage(key, dict(members)))


def test_bad_members_are_skipped_warned_and_counted(dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    shard = root / "eval-000000.tar"
    original = shard.read_bytes()
    shard.unlink()

    def damage(key, m):
        if key == "eval-0000001":
            m["jpg"] = m["jpg"][: len(m["jpg"]) // 2]  # truncated JPEG
        if key == "eval-0000002":
            m["jpg"] = b"\xff\xd8 not a jpeg"
        if key == "eval-0000003":
            m["flac"] = m["flac"][: len(m["flac"]) * 2 // 3]  # truncated FLAC
        if key == "eval-0000004":
            m["txt"] = b"  "
        if key == "eval-0000005":
            del m["flac"]
        return m

    (tmp_path / "orig.tar").write_bytes(original)
    _rewrite(tmp_path / "orig.tar", shard, damage)
    ds = ShardDataset(root, "eval")
    with pytest.warns(UserWarning) as record:
        keys = [s.key for s in ds]
    assert keys == ["eval-0000000", "eval-0000006", "eval-0000007"]
    assert [(s.key, s.member) for s in ds.skipped] == [
        ("eval-0000001", "jpg"), ("eval-0000002", "jpg"), ("eval-0000003", "flac"),
        ("eval-0000004", "txt"), ("eval-0000005", "flac")]
    messages = [str(w.message) for w in record]
    assert any("eval-000000.tar:eval-0000003.flac" in m for m in messages)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ShardDataset(tmp_path / "nowhere", "train")


def test_non_tar_shard_names_the_file(dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    (root / "train-000001.tar").write_bytes(b"this is not a tar archive" * 100)
    ds = ShardDataset(root, "train")
    with warnings.catch_warnings(), pytest.raises(ShardError, match="train-000001.tar"):
        list(ds)


def test_writer_rejects_keys_with_dots(tmp_path):
    with ShardWriter(tmp_path / "x.tar") as w, pytest.raises(ValueError, match="a.b"):
        w.write("a.b", {"txt": io.BytesIO(b"x").read()})


def test_threaded_decoding_keeps_order_and_values(dataset):
    one = list(ShardDataset(dataset, "train", shuffle=True, seed=2))
    two = list(ShardDataset(dataset, "train", shuffle=True, seed=2, num_threads=2))
    assert [s.key for s in one] == [s.key for s in two]
    assert all(torch.equal(a.image, b.image) and torch.equal(a.audio, b.audio) for a, b in zip(one, two))


def test_train_crop_is_reproducible_per_epoch(dataset):
    def images(epoch, threads):
        ds = ShardDataset(dataset, "train", seed=5, num_threads=threads, train_crop=True)
        return [s.image for s in ds.iter_epoch(epoch)]

    first = images(0, 1)
    plain = [s.image for s in ShardDataset(dataset, "train")]
    assert first[0].shape == (3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(first, images(0, 2)))
    # a crop can be the whole image (area near 1, aspect near 1), so only most must differ
    assert sum(torch.equal(a, b) for a, b in zip(first, images(1, 1))) <= 4
    assert sum(torch.equal(a, b) for a, b in zip(first, plain)) <= 4
