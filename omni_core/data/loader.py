"""The plain CPU loader (PIL + soundfile) over the triplet shards.

Decodes each sample into a :class:`~omni_core.data.sample.Sample`: the image resized to the
model's size (bicubic) and normalised with the CLIP mean/std; the audio decoded, mixed to
mono, resampled to 16 kHz, cut to 15 s, repeated up to 1 s and normalised per clip; the
caption tokenised. A sample whose member is corrupt, truncated or missing, or whose caption
is empty, is skipped with a warning naming shard, key and member, and recorded in
``skipped``; a missing dataset or an unreadable shard is an error naming the path.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omni_core.data.audio import SAMPLE_RATE, decode_audio, fit_length, normalise, resample
from omni_core.data.sample import Sample
from omni_core.data.shards import ShardError, read_shard
from omni_core.data.tokenizer import CaptionTokenizer

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
MEMBERS = ("jpg", "flac", "txt")


class SampleError(ValueError):
    """One member of a sample cannot be decoded (the sample is skipped, not the run)."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}")
        self.member = member


def decode_image(data: bytes, image_size: int) -> torch.Tensor:
    """JPEG/PNG bytes → float32 [3, S, S], CLIP-normalised."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - CLIP_MEAN) / CLIP_STD


def decode_clip(data: bytes) -> torch.Tensor:
    """Audio bytes → float32 [S] mono 16 kHz, at most 15 s, at least 1 s, normalised."""
    pcm, rate = decode_audio(data)
    return torch.from_numpy(normalise(fit_length(resample(pcm, rate, SAMPLE_RATE))))


def decode_sample(key: str, members: dict[str, bytes], image_size: int, tokenizer: CaptionTokenizer) -> Sample:
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise SampleError(missing[0], "member missing")
    text = members["txt"].decode("utf-8", errors="replace").strip()
    if not text:
        raise SampleError("txt", "empty caption")
    ids = tokenizer.encode(text)
    if not ids:
        raise SampleError("txt", "caption encodes to no tokens")
    try:
        image = decode_image(members["jpg"], image_size)
    except (OSError, ValueError, SyntaxError) as err:
        raise SampleError("jpg", f"corrupt image ({err})") from err
    try:
        audio = decode_clip(members["flac"])
    except (RuntimeError, ValueError, OSError) as err:  # soundfile raises LibsndfileError (RuntimeError)
        raise SampleError("flac", f"corrupt or truncated audio ({err})") from err
    return Sample(key, image, audio, text, torch.tensor(ids, dtype=torch.long))


def split_shards(path: str | Path, split: str) -> list[Path]:
    """The shard files of ``split`` as the dataset's manifest lists them."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist (run `omni data synth --out {root}`)")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: {root} is not a dataset made by `omni data synth`")
    splits = json.loads(manifest_path.read_text())["splits"]
    if split not in splits:
        raise ValueError(f"{manifest_path} has no split {split!r} (it has {sorted(splits)})")
    shards = [root / s["path"] for s in splits[split]["shards"]]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {manifest_path} is missing")
    return shards


class ShardDataset:
    """Samples of one split, decoded on the fly; corrupt ones skipped and recorded.

    With ``shuffle``, epoch e visits the shards in an order drawn from (seed, e), so a
    resumed run can reproduce the order exactly (:meth:`epoch_order`).
    """

    def __init__(self, path: str | Path, split: str, image_size: int, tokenizer: CaptionTokenizer,
                 shuffle: bool = False, seed: int = 0) -> None:
        self.shards = split_shards(path, split)
        self.image_size, self.tokenizer = image_size, tokenizer
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.skipped: list[str] = []

    def epoch_order(self, epoch: int) -> list[Path]:
        if not self.shuffle:
            return list(self.shards)
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 1009 + epoch))
        return [self.shards[i] for i in order.tolist()]

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.epoch_order(self.epoch):
            try:
                for key, members in read_shard(shard):
                    try:
                        yield decode_sample(key, members, self.image_size, self.tokenizer)
                    except SampleError as err:
                        where = f"{shard.name}:{key}.{err.member}"
                        warnings.warn(f"skipping sample {where}: {err}", stacklevel=2)
                        self.skipped.append(f"{where}: {err}")
            except ShardError as err:
                raise ShardError(f"unreadable shard {shard}: {err}") from err
        self.epoch += 1

    def batches(self, batch_size: int) -> Iterator[list[Sample]]:
        batch: list[Sample] = []
        for sample in self:
            batch.append(sample)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def load_eval_split(path: str | Path, image_size: int, tokenizer: CaptionTokenizer) -> list[Sample]:
    return list(ShardDataset(path, "eval", image_size, tokenizer))
