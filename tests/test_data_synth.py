import json
import tarfile
from pathlib import Path

from omni_core.data.shards import read_shard
from omni_core.data.synth import HELD_OUT_PAIRS, caption_of, generate, is_held_out, plan_captions
from omni_core.data.tokenizer import MAX_TEXT_TOKENS, load_tokenizer


def _records(root: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [r for s in manifest["splits"][split]["shards"] for r in read_shard(root / s["path"])]


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, n_train=10, n_eval=4, seed=3, workers=1, shard_size=4)
    generate(b, n_train=10, n_eval=4, seed=3, workers=2, shard_size=4)
    generate(c, n_train=10, n_eval=4, seed=4, workers=2, shard_size=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert [r[1]["txt"] for r in _records(a, "train")] != [r[1]["txt"] for r in _records(c, "train")]


def test_manifest_and_shards(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["sample_rate"] == 16000 and manifest["image_size"] == 64
    for split, n in (("train", 24), ("eval", 8)):
        entries = manifest["splits"][split]["shards"]
        assert sum(e["num_samples"] for e in entries) == manifest["splits"][split]["num_samples"] == n
        for e in entries:
            with tarfile.open(dataset / e["path"]) as tar:
                assert len(tar.getnames()) == 4 * e["num_samples"]
        for key, members in _records(dataset, split):
            assert sorted(members) == ["flac", "jpg", "json", "txt"]
            meta = json.loads(members["json"])
            assert meta["key"] == key and meta["caption"] == members["txt"].decode()


def test_eval_unique_and_held_out_pairs_never_in_train():
    plans = plan_captions(n_train=2000, n_eval=300, seed=1)
    eval_caps = [caption_of(i) for i in plans["eval"]]
    assert len(set(eval_caps)) == len(eval_caps)
    assert sum(is_held_out(i) for i in plans["eval"]) == 150
    train_pairs = {(i.colour, i.shape) for items in plans["train"] for i in items}
    assert not train_pairs & set(HELD_OUT_PAIRS)
    assert len(train_pairs) == 36 - len(HELD_OUT_PAIRS)  # every other pair does occur
    assert not set(eval_caps) & {caption_of(i) for i in plans["train"]}


def test_written_captions_respect_the_split_rules(dataset):
    train = [json.loads(m["json"]) for _, m in _records(dataset, "train")]
    evals = [json.loads(m["json"]) for _, m in _records(dataset, "eval")]
    assert not any(m["held_out"] for m in train)
    assert any(m["held_out"] for m in evals)
    assert len({m["caption"] for m in evals}) == len(evals)


def test_tokenizer_roundtrip_and_limit(dataset):
    tok = load_tokenizer(dataset)
    text = "a red circle on the left and a blue square at the top"
    ids = tok.encode(text.upper())
    assert tok.decode(ids) == text
    assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
    assert len(tok.encode(" ".join([text] * 20))) == MAX_TEXT_TOKENS + 1  # 70 BPE ids + EOS
    assert 261 < tok.vocab_size <= 512 and max(ids) < tok.vocab_size
    assert tok.pad_id == 0 and tok.eos_id == 3
