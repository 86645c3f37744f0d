"""NVIDIA DALI decoding over the same shards, and `make_loader`, the one entry point for all backends.

Python reads the tars (stdlib, cheap) and checks captions; DALI decodes in its own threads: JPEGs on
the GPU (`device="mixed"`) when DALI sees one, on the CPU otherwise (a `device_id=None` pipeline), with
ONE-PEACE's preprocessing (train: RandomResizedCrop scale 0.9–1.0, bicubic; eval: bicubic resize; CLIP
mean/std), and audio decoded, downmixed, resampled to 16 kHz, cut to 15 s and normalised per clip.

A DALI batch with a bad member fails as a whole and leaves the pipeline unusable, so on failure the
pipeline is rebuilt (milliseconds) and that batch is decoded one sample at a time: the bad sample is
skipped and recorded like in the PIL path. Train crops come from the pipeline's RNG seeded by
(seed, epoch); a rebuild after a bad sample restarts that RNG, so crops are reproducible only for
clean data (the sample order always is).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from omni_core.data.audio import MAX_SECONDS, MIN_SECONDS, SAMPLE_RATE, fit_length, normalise
from omni_core.data.collator import fixed_groups
from omni_core.data.loader import CLIP_MEAN, CLIP_STD, SampleError, ShardDataset, check_caption
from omni_core.data.sample import Sample
from omni_core.data.shards import prefetch
from omni_core.data.tokenizer import CaptionTokenizer

BACKENDS = ("auto", "dali", "pil")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_sees_gpu() -> bool:
    from nvidia.dali.backend import GetCUDADeviceCount

    try:
        return GetCUDADeviceCount() > 0
    except RuntimeError:  # no driver
        return False


def build_pipeline(image_size: int, train: bool, gpu: bool, batch_size: int, num_threads: int, seed: int):
    """A DALI pipeline fed by the external sources "jpg" and "flac"; outputs (image CHW float, audio)."""
    from nvidia.dali import fn, pipeline_def, types

    # one GPU per local rank under torchrun (LOCAL_RANK); the CPU-only pipeline has no device
    device_id = int(os.environ.get("LOCAL_RANK", "0")) if gpu else None

    # not pipelined: each run() consumes exactly the batch just fed, so a failure pins the batch
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
    def pipeline():
        jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
        flac = fn.external_source(name="flac", dtype=types.UINT8, ndim=1)
        image = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if train:
            image = fn.random_resized_crop(image, size=[image_size, image_size], random_area=[0.9, 1.0],
                                           interp_type=types.INTERP_CUBIC)
        else:
            image = fn.resize(image, size=[image_size, image_size], interp_type=types.INTERP_CUBIC)
        image = fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                         mean=(CLIP_MEAN.flatten() * 255).tolist(),
                                         std=(CLIP_STD.flatten() * 255).tolist())
        audio, _ = fn.decoders.audio(flac, sample_rate=SAMPLE_RATE, downmix=True, dtype=types.FLOAT)
        audio = fn.slice(audio, start=[0], shape=[int(MAX_SECONDS * SAMPLE_RATE)], axes=[0],
                         out_of_bounds_policy="trim_to_shape")
        audio = fn.normalize(audio, axes=[0], epsilon=1e-7)
        return image, audio

    pipe = pipeline()
    pipe.build()
    return pipe


def _failed_member(err: Exception) -> str:
    text = str(err)
    if "decoders.image" in text:
        return "jpg"
    if "decoders.audio" in text:
        return "flac"
    return "jpg+flac"


class DaliDataset:
    """The ShardDataset interface (order, epochs, `skipped`, `batches`) with DALI doing the decoding."""

    def __init__(self, path: str | Path, split: str, image_size: int | None = None,
                 tokenizer: CaptionTokenizer | None = None, shuffle: bool = False, seed: int = 0,
                 num_threads: int = 2, gpu: bool | None = None, dali_batch: int = 32,
                 train_crop: bool | None = None) -> None:
        self.source = ShardDataset(path, split, image_size, tokenizer, shuffle, seed)
        self.image_size, self.tokenizer = self.source.image_size, self.source.tokenizer
        self.train = split == "train" if train_crop is None else train_crop
        self.gpu = dali_sees_gpu() if gpu is None else gpu
        self.num_threads, self.dali_batch, self.seed = num_threads, dali_batch, seed
        self.epoch = 0

    @property
    def skipped(self):
        return self.source.skipped

    def __len__(self) -> int:
        return len(self.source)

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        return self.source.epoch_order(epoch)

    def __iter__(self) -> Iterator[Sample]:
        yield from self.iter_epoch(self.epoch)
        self.epoch += 1

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Sample]:
        pipe_seed = zlib.crc32(f"{self.seed}-{epoch}".encode()) & 0x7FFFFFFF
        self._pipe_args = (self.image_size, self.train, self.gpu, self.dali_batch, self.num_threads, pipe_seed)
        self._pipe = build_pipeline(*self._pipe_args)
        records = prefetch(self.source.iter_records(epoch, start))
        while chunk := list(islice(records, self.dali_batch)):
            yield from self._decode_chunk(chunk)

    def _decode_chunk(self, chunk: list[tuple[int, str, dict[str, bytes]]]) -> Iterator[Sample]:
        good = []
        for shard, key, members in chunk:
            try:
                good.append((shard, key, members, *check_caption(members, self.tokenizer)))
            except SampleError as err:
                self.source.skip(shard, key, err)
        if not good:
            return
        try:
            yield from self._run(good)
        except RuntimeError:
            self._pipe = build_pipeline(*self._pipe_args)
            for item in good:  # find the bad ones
                try:
                    yield from self._run([item])
                except RuntimeError as err:
                    self._pipe = build_pipeline(*self._pipe_args)
                    member = _failed_member(err)
                    self.source.skip(item[0], item[1], SampleError(member, "DALI could not decode it"))

    def _run(self, items: list[tuple]) -> list[Sample]:
        self._pipe.feed_input("jpg", [np.frombuffer(it[2]["jpg"], np.uint8) for it in items])
        self._pipe.feed_input("flac", [np.frombuffer(it[2]["flac"], np.uint8) for it in items])
        images, audios = self._pipe.run()
        if self.gpu:
            images = images.as_cpu()
        out = []
        for i, (_, key, _, text, ids) in enumerate(items):
            audio = np.array(audios[i])
            if len(audio) < MIN_SECONDS * SAMPLE_RATE:  # rare: DALI has no tile op; as audio.fit_length
                audio = normalise(fit_length(audio))
            out.append(Sample(key, torch.from_numpy(np.array(images[i])), torch.from_numpy(audio), text,
                              torch.tensor(ids, dtype=torch.long)))
        return out

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[list[Sample]]:
        """Lists of ``batch_size`` samples from the current epoch."""
        return fixed_groups(self, batch_size, drop_last)


def make_loader(path: str | Path, split: str, image_size: int | None = None,
                tokenizer: CaptionTokenizer | None = None, shuffle: bool = False, seed: int = 0,
                num_threads: int = 2, backend: str = "auto",
                train_crop: bool | None = None) -> ShardDataset | DaliDataset:
    """DALI (GPU decoding when it sees a GPU, else CPU) when installed, else PIL + soundfile.

    ``train_crop`` (default: on for the train split) applies ONE-PEACE's RandomResizedCrop;
    a caller that decodes once and reuses the samples every epoch turns it off, since a crop
    drawn once is a fixed distortion rather than an augmentation.

    Both yield `Sample`s in the order of `epoch_order`, expose `skipped`, `batches(n)` and
    `iter_epoch(epoch, start)`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; choose one of {BACKENDS}")
    if backend == "dali" and not dali_available():
        raise ImportError("backend='dali' but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    crop = split == "train" if train_crop is None else train_crop
    if backend == "pil" or (backend == "auto" and not dali_available()):
        return ShardDataset(path, split, image_size, tokenizer, shuffle, seed, num_threads=num_threads,
                            train_crop=crop)
    return DaliDataset(path, split, image_size, tokenizer, shuffle, seed, num_threads=num_threads,
                       train_crop=crop)
