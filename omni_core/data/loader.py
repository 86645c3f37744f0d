"""The plain CPU loader (PIL + soundfile) over the triplet shards.

Decodes each sample into a :class:`~omni_core.data.sample.Sample`: the image resized to the
model's size (bicubic) and normalised with the CLIP mean/std; the audio decoded, mixed to
mono, resampled to 16 kHz, cut to 15 s, repeated up to 1 s and normalised per clip; the
caption tokenised. A sample whose member is corrupt, truncated or missing, or whose caption
is empty, is skipped with a warning naming shard, key and member, and recorded in
``skipped``; a missing dataset or an unreadable shard is an error naming the path.

Order: with ``shuffle``, epoch e visits the shards in a permutation drawn from (seed, e) and the
samples of each shard in a permutation drawn from (seed, e, shard). ``epoch_order(e)`` lists that
order as (shard index, position) pairs without reading any shard, and ``iter_epoch(e, start=n)``
resumes after its first n entries (skipped samples keep their place), so a resumed run sees
exactly the samples an uninterrupted one would have.
"""

from __future__ import annotations

import io
import json
import math
import random
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omni_core.data.audio import SAMPLE_RATE, decode_audio, fit_length, normalise, resample
from omni_core.data.collator import fixed_groups
from omni_core.data.sample import Sample
from omni_core.data.shards import prefetch, read_shard
from omni_core.data.tokenizer import CaptionTokenizer, load_tokenizer

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
MEMBERS = ("jpg", "flac", "txt")


class SampleError(ValueError):
    """One member of a sample cannot be decoded (the sample is skipped, not the run)."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member}: {reason}")
        self.member = member


@dataclass(frozen=True)
class Skipped:
    """A skipped sample: which shard, key and member, and why."""

    shard: str
    key: str
    member: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}:{self.key}.{self.member}: {self.reason}"


def crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.9, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (as torchvision): area in `scale`, log-uniform aspect in `ratio`."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    return 0, 0, width, height


def decode_image(data: bytes, image_size: int, crop_rng: random.Random | None = None) -> torch.Tensor:
    """JPEG/PNG bytes → float32 [3, S, S], CLIP-normalised; with `crop_rng`, ONE-PEACE's train crop
    (RandomResizedCrop, scale 0.9–1.0, bicubic) first."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if crop_rng is not None:
            img = img.crop(crop_box(*img.size, crop_rng))
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - CLIP_MEAN) / CLIP_STD


def decode_clip(data: bytes) -> torch.Tensor:
    """Audio bytes → float32 [S] mono 16 kHz, at most 15 s, at least 1 s, normalised."""
    pcm, rate = decode_audio(data)
    return torch.from_numpy(normalise(fit_length(resample(pcm, rate, SAMPLE_RATE))))


def check_caption(members: dict[str, bytes], tokenizer: CaptionTokenizer) -> tuple[str, list[int]]:
    """The caption and its ids; raises SampleError for a missing member or an empty caption."""
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise SampleError(missing[0], "member missing")
    text = members["txt"].decode("utf-8", errors="replace").strip()
    if not text:
        raise SampleError("txt", "empty caption")
    ids = tokenizer.encode(text)
    if not ids:
        raise SampleError("txt", "caption encodes to no tokens")
    return text, ids


def decode_sample(key: str, members: dict[str, bytes], image_size: int, tokenizer: CaptionTokenizer,
                  crop_rng: random.Random | None = None) -> Sample:
    text, ids = check_caption(members, tokenizer)
    try:
        image = decode_image(members["jpg"], image_size, crop_rng)
    except (OSError, ValueError, SyntaxError) as err:
        raise SampleError("jpg", f"corrupt image ({err})") from err
    try:
        audio = decode_clip(members["flac"])
    except (RuntimeError, ValueError, OSError) as err:  # soundfile raises LibsndfileError (RuntimeError)
        raise SampleError("flac", f"corrupt or truncated audio ({err})") from err
    return Sample(key, image, audio, text, torch.tensor(ids, dtype=torch.long))


def read_manifest(path: str | Path) -> dict:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist (run `omni data synth --out {root}`)")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: {root} is not a dataset made by `omni data synth`")
    return json.loads(manifest_path.read_text())


def split_entries(path: str | Path, split: str) -> list[dict]:
    """The manifest's shard entries ({"path", "num_samples"}) of ``split``; every shard must exist."""
    root = Path(path)
    splits = read_manifest(root)["splits"]
    if split not in splits:
        raise ValueError(f"{root / 'manifest.json'} has no split {split!r} (it has {sorted(splits)})")
    entries = splits[split]["shards"]
    for entry in entries:
        if not (root / entry["path"]).is_file():
            raise FileNotFoundError(f"shard {root / entry['path']} listed in {root / 'manifest.json'} is missing")
    return entries


def split_shards(path: str | Path, split: str) -> list[Path]:
    """The shard files of ``split`` as the dataset's manifest lists them."""
    return [Path(path) / e["path"] for e in split_entries(path, split)]


class ShardDataset:
    """Samples of one split, decoded on the fly; corrupt ones skipped and recorded in ``skipped``.

    ``for s in ds`` runs epoch ``ds.epoch`` and then advances it; ``iter_epoch`` runs any epoch.
    ``image_size`` and ``tokenizer`` default to the dataset's own; ``num_threads`` > 1 decodes in a
    thread pool (same order); ``train_crop`` applies ONE-PEACE's RandomResizedCrop, drawn from
    (seed, epoch, key).
    """

    def __init__(self, path: str | Path, split: str, image_size: int | None = None,
                 tokenizer: CaptionTokenizer | None = None, shuffle: bool = False, seed: int = 0,
                 num_threads: int = 1, train_crop: bool = False) -> None:
        self.root = Path(path)
        self.entries = split_entries(self.root, split)
        self.shards = [self.root / e["path"] for e in self.entries]
        self.image_size = image_size or read_manifest(self.root)["image_size"]
        self.tokenizer = tokenizer or load_tokenizer(self.root)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.num_threads, self.train_crop = num_threads, train_crop
        self.skipped: list[Skipped] = []

    def __len__(self) -> int:
        return sum(e["num_samples"] for e in self.entries)

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, position in shard) in visiting order: a pure function of (seed, epoch)."""
        shard_ids = list(range(len(self.entries)))
        if self.shuffle:
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(shard_ids)
        order = []
        for s in shard_ids:
            positions = list(range(self.entries[s]["num_samples"]))
            if self.shuffle:
                random.Random(f"samples-{self.seed}-{epoch}-{s}").shuffle(positions)
            order.extend((s, p) for p in positions)
        return order

    def __iter__(self) -> Iterator[Sample]:
        yield from self.iter_epoch(self.epoch)
        self.epoch += 1

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Sample]:
        """Samples of ``epoch`` after the first ``start`` entries of ``epoch_order(epoch)``."""
        records = self.iter_records(epoch, start)
        if self.num_threads <= 1:
            decoded = (self.decode(*r, epoch=epoch) for r in records)
            yield from (s for s in decoded if s is not None)
            return
        # PIL and libsndfile release the GIL while decoding; map keeps the order
        records = prefetch(records)
        with ThreadPoolExecutor(self.num_threads) as pool:
            while chunk := list(islice(records, 16 * self.num_threads)):
                yield from (s for s in pool.map(lambda r: self.decode(*r, epoch=epoch), chunk) if s is not None)

    def iter_records(self, epoch: int, start: int = 0) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """Undecoded (shard index, key, members) in the order of ``epoch_order(epoch)[start:]``."""
        order = self.epoch_order(epoch)[start:]
        i = 0
        while i < len(order):
            shard = order[i][0]
            j = i
            while j < len(order) and order[j][0] == shard:
                j += 1
            records = self.read_records(shard)
            for _, pos in order[i:j]:
                yield (shard, *records[pos])
            i = j

    def read_records(self, shard: int) -> list[tuple[str, dict[str, bytes]]]:
        """The raw members of one whole shard (a few MB), checked against the manifest's count."""
        records = list(read_shard(self.shards[shard]))
        if len(records) != self.entries[shard]["num_samples"]:
            raise ValueError(f"shard {self.shards[shard]} holds {len(records)} samples but "
                             f"{self.root / 'manifest.json'} lists {self.entries[shard]['num_samples']}")
        return records

    def decode(self, shard: int, key: str, members: dict[str, bytes], epoch: int = 0) -> Sample | None:
        """The decoded sample, or None after warning and recording why it was skipped."""
        try:
            # the crop depends on (seed, epoch, key) only: reproducible whatever the thread schedule
            rng = random.Random(f"crop-{self.seed}-{epoch}-{key}") if self.train_crop else None
            return decode_sample(key, members, self.image_size, self.tokenizer, rng)
        except SampleError as err:
            self.skip(shard, key, err)
            return None

    def skip(self, shard: int, key: str, err: SampleError) -> None:
        """Record and warn about a bad sample."""
        skipped = Skipped(self.shards[shard].name, key, err.member, str(err).split(": ", 1)[1])
        self.skipped.append(skipped)
        warnings.warn(f"skipping sample {skipped}", stacklevel=3)

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[list[Sample]]:
        """Lists of ``batch_size`` samples from the current epoch."""
        return fixed_groups(self, batch_size, drop_last)


def load_eval_split(path: str | Path, image_size: int | None = None,
                    tokenizer: CaptionTokenizer | None = None) -> list[Sample]:
    """All eval samples in shard order."""
    return list(ShardDataset(path, "eval", image_size, tokenizer, shuffle=False))
