"""Inference throughput: embeddings per second per modality, packed vs ONE-PEACE's padded way.

    omni bench inference [--data DIR] [--items 64] [--batch-size 32] [--repeats 3]
                         [--precision fp32 auto] [--json]

End to end, as a user embedding a folder would run it: decode the raw bytes (JPEG images,
FLAC speech clips, caption text → BPE ids), one forward over each batch, projection to the
L2-normalised embedding. Two ways of running the same model on the same items:

* ``packed`` — omni-core: each batch is one packed token stream (``model.embed`` → ``pack``
  → ``encode``, CLS rows → ``project``), no padding;
* ``padded`` — ONE-PEACE's hub: each batch padded to its longest member with a key-padding
  mask (the released encoder's padded pass, ``omni_core.recipes.one_peace_padded``), CLS →
  ``project``.

Items come from a dataset written by ``omni data synth`` (the demo's images, espeak-ng speech
and captions); without ``--data`` a small one is generated in a temporary directory. Both
ways alternate within each repeat; the median is reported, with ``speedup`` = packed
embeddings/s / padded embeddings/s and ``max_diff``, the largest difference between the two
ways' embeddings (they must agree). Each ``--precision`` is run in turn (``auto`` resolves to
bf16 autocast on a CPU with native bf16, else fp32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from omni_core.data.loader import decode_clip, decode_image, split_shards
from omni_core.data.shards import read_shard
from omni_core.data.tokenizer import CaptionTokenizer, load_tokenizer
from omni_core.model.omni import AUDIO, IMAGE, MODALITIES, TEXT, ModalInputs, OmniModel, SegmentRef
from omni_core.precision import PRECISIONS, resolve_precision
from omni_core.recipes.one_peace_padded import encoder_pass

MEMBER = {TEXT: "txt", IMAGE: "jpg", AUDIO: "flac"}
METHODS = ("packed", "padded")


def read_items(data: Path, count: int) -> dict[int, list[bytes]]:
    """The raw bytes of up to ``count`` captions, images and audio clips of the dataset."""
    items: dict[int, list[bytes]] = {m: [] for m in MEMBER}
    for split in ("train", "eval"):
        for shard in split_shards(data, split):
            for _, members in read_shard(shard):
                if len(items[TEXT]) == count:
                    return items
                for m, name in MEMBER.items():
                    items[m].append(members[name])
    if not items[TEXT]:
        raise ValueError(f"{data}: the dataset holds no samples")
    return items


def decoder(modality: int, model: OmniModel, tokenizer: CaptionTokenizer) -> Callable[[bytes], torch.Tensor]:
    if modality == TEXT:
        return lambda raw: torch.tensor(tokenizer.encode(raw.decode("utf-8")), dtype=torch.long)
    if modality == IMAGE:
        return lambda raw: decode_image(raw, model.cfg.image_size)
    return decode_clip


def inputs_of(modality: int, decoded: list[torch.Tensor]) -> ModalInputs:
    if modality == TEXT:
        return ModalInputs(text=decoded)
    if modality == IMAGE:
        return ModalInputs(image=torch.stack(decoded))
    return ModalInputs(audio=decoded)


def packed_embed(model: OmniModel, modality: int, decoded: list[torch.Tensor]) -> torch.Tensor:
    """One packed forward over the batch; the CLS row of each sequence → projection."""
    batch = model.pack(model.embed(inputs_of(modality, decoded)),
                       [[SegmentRef(modality, i)] for i in range(len(decoded))])
    features = model.encode(batch)
    return model.project(features[batch.cu_seqlens[:-1].long()], modality)


def padded_embed(model: OmniModel, modality: int, decoded: list[torch.Tensor]) -> torch.Tensor:
    """ONE-PEACE's hub: the batch padded to its longest member, padded keys masked."""
    embedded = model.embed(inputs_of(modality, decoded))
    refs = [[SegmentRef(modality, i)] for i in range(len(decoded))]
    segments, _ = encoder_pass(model, embedded, refs, model.bias_table())
    return model.project(torch.stack([row[0][0] for row in segments]), modality)


EMBED = {"packed": packed_embed, "padded": padded_embed}


@torch.no_grad()
def run_once(model: OmniModel, modality: int, raw: list[bytes], method: str, batch_size: int,
             decode: Callable[[bytes], torch.Tensor], precision) -> tuple[float, torch.Tensor]:
    """Seconds to decode and embed every item, and the embeddings."""
    start = time.perf_counter()
    out = []
    for first in range(0, len(raw), batch_size):
        decoded = [decode(r) for r in raw[first:first + batch_size]]
        with precision.autocast("cpu"):
            out.append(EMBED[method](model, modality, decoded).float())
    return time.perf_counter() - start, torch.cat(out)


def run(model: OmniModel, items: dict[int, list[bytes]], tokenizer: CaptionTokenizer, batch_size: int,
        repeats: int, precision_name: str) -> list[dict]:
    precision = resolve_precision(precision_name, "cpu")
    rows = []
    for modality, raw in items.items():
        decode = decoder(modality, model, tokenizer)
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        embeddings = {}
        for method in METHODS:  # warm-up: allocator, BLAS, layout memo
            run_once(model, modality, raw[:batch_size], method, batch_size, decode, precision)
        for _ in range(repeats):
            for method in METHODS:
                seconds, embeddings[method] = run_once(model, modality, raw, method, batch_size, decode, precision)
                times[method].append(seconds)
        packed, padded = (len(raw) / statistics.median(times[m]) for m in METHODS)
        rows.append({"modality": MODALITIES[modality], "precision": precision.name,
                     "precision_choice": precision.description, "items": len(raw),
                     "packed_per_s": round(packed, 3), "padded_per_s": round(padded, 3),
                     "speedup": round(packed / padded, 3),
                     "max_diff": float((embeddings["packed"] - embeddings["padded"]).abs().max())})
    return rows


def dataset(data: str | None, count: int, workdir: str) -> Path:
    if data is not None:
        return Path(data)
    from omni_core.data.synth import generate

    path = Path(workdir) / "triplets"
    generate(path, n_train=count, n_eval=0, seed=0, workers=2, shard_size=max(count, 1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni bench inference", description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="dataset written by `omni data synth` (default: generate a small one)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--items", type=int, default=64, help="items per modality")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.items < 1 or args.batch_size < 1 or args.repeats < 1:
        raise ValueError("--items, --batch-size and --repeats must be positive")
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as workdir:
        path = dataset(args.data, args.items, workdir)
        items = read_items(path, args.items)
        tokenizer = load_tokenizer(path)
        model = OmniModel.from_preset(args.preset).eval()
        rows = [row for name in dict.fromkeys(args.precision)
                for row in run(model, items, tokenizer, args.batch_size, args.repeats, name)]
    if args.json:
        print(json.dumps({"preset": args.preset, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "results": rows}, indent=2))
        return 0
    print(f"preset {args.preset}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()} CPU")
    print(f"{'modality':<10}{'precision':<11}{'items':>6}{'packed emb/s':>14}{'padded emb/s':>14}{'speedup':>9}"
          f"{'max diff':>10}")
    for r in rows:
        print(f"{r['modality']:<10}{r['precision']:<11}{r['items']:>6}{r['packed_per_s']:>14.1f}"
              f"{r['padded_per_s']:>14.1f}{r['speedup']:>8.2f}x{r['max_diff']:>10.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
