"""A split of the triplet dataset, decoded once into memory for training or evaluation.

Decoding goes through the loader chosen by ``backend`` (DALI when installed, else PIL +
soundfile); corrupt samples are skipped by the loader, named in ``skipped`` and counted
in the run's summary. Keeping decoded samples in memory makes the data order of every
epoch a pure function of (seed, epoch), which is what exact resumption needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omni_core.data.dali import make_loader
from omni_core.data.sample import Sample
from omni_core.data.tokenizer import load_tokenizer


@dataclass
class SplitData:
    samples: list[Sample]
    skipped: list[str]
    backend: str  # the decoder that produced them


def load_split(data: str | Path, split: str, image_size: int, backend: str = "auto") -> SplitData:
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory {path} does not exist (run `omni data synth --out {path}`)")
    tokenizer = load_tokenizer(path)
    # Decoded once and reused every epoch: a crop drawn once would only distort, so none.
    dataset = make_loader(path, split, image_size=image_size, tokenizer=tokenizer, backend=backend,
                          train_crop=False)
    samples = list(dataset)
    return SplitData(samples, [str(s) for s in dataset.skipped], type(dataset).__name__)
