"""``omni embed``: L2-normalised embeddings for a folder of images or audio files, or a
text file (one caption per line), from a run of ``omni pretrain``.

    omni embed --run runs/demo --images photos/ --out photos.npy
    omni embed --run runs/demo --audio clips/ --out clips.npy
    omni embed --run runs/demo --text captions.txt --out captions.npy

Writes the ``[N, E]`` float32 array and ``<out>.names.txt`` (the file or line of each row).
``--precision auto|fp32|bf16`` picks the forward's autocast (:mod:`omni_core.precision`; the
choice is printed on stderr).
Every file that cannot be decoded is skipped and named on stderr (also when none could be
decoded). Audio is prepared as ONE-PEACE's hub prepares it (see ``OmniModel.embed_audio``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from omni_core.data.audio import SAMPLE_RATE, decode_audio, resample
from omni_core.data.loader import decode_image
from omni_core.data.tokenizer import load_tokenizer
from omni_core.model.omni import AUDIO, IMAGE, TEXT, OmniModel
from omni_core.precision import add_precision_argument, resolve_precision
from omni_core.train.trainer import load_trained

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3"}


@torch.no_grad()
def embed_items(model: OmniModel, modality: int, items: list, batch_size: int = 64) -> torch.Tensor:
    """Embeddings of decoded items of one modality (token ids, image tensors or raw 16 kHz
    waveforms), through the model's feature-extraction API, one packed pass per chunk."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        if modality == TEXT:
            out.append(model.embed_texts(chunk))
        elif modality == IMAGE:
            out.append(model.embed_images(torch.stack(chunk)))
        else:
            out.append(model.embed_audio(chunk))
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


def decode_raw_clip(data: bytes) -> torch.Tensor:
    """Audio bytes → mono 16 kHz float32 waveform, not yet normalised or cropped:
    ``embed_audio`` prepares it as ONE-PEACE's hub does (normalise the whole clip, crop, tile)."""
    pcm, rate = decode_audio(data)
    return torch.from_numpy(resample(pcm, rate, SAMPLE_RATE))


def decode_folder(folder: Path, exts: set[str], decode) -> tuple[list[str], list, list[str]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    names, items, skipped = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in exts):
        try:
            items.append(decode(path.read_bytes()))
            names.append(path.name)
        except (OSError, ValueError, RuntimeError, SyntaxError) as err:
            skipped.append(f"{path}: {err}")
    return names, items, skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory written by omni pretrain")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images")
    src.add_argument("--audio", type=Path, help="folder of audio files")
    src.add_argument("--text", type=Path, help="text file, one caption per line")
    p.add_argument("--data", help="dataset holding tokenizer.json (default: the run's dataset)")
    p.add_argument("--out", required=True, type=Path, help="output .npy file")
    add_precision_argument(p)
    a = p.parse_args(argv)
    model, meta = load_trained(a.run)
    device = next(model.parameters()).device
    precision = resolve_precision(a.precision, device)
    print(f"precision: {precision.description}", file=sys.stderr)
    skipped: list[str] = []
    if a.images:
        names, items, skipped = decode_folder(a.images, IMAGE_EXTS, lambda b: decode_image(b, model.cfg.image_size))
        modality = IMAGE
    elif a.audio:
        names, items, skipped = decode_folder(a.audio, AUDIO_EXTS, decode_raw_clip)
        modality = AUDIO
    else:
        data = a.data or meta.get("args", {}).get("data")
        if not data:
            raise ValueError(f"{a.run} names no dataset with a tokenizer; pass --data (a converted ONE-PEACE "
                             f"model needs ONE-PEACE's GPT-2 BPE ids: use OmniModel.embed_texts)")
        tokenizer = load_tokenizer(data)
        names = [line.strip() for line in a.text.read_text().splitlines() if line.strip()]
        items = [torch.tensor(tokenizer.encode(line), dtype=torch.long) for line in names]
        modality = TEXT
    for line in skipped:  # named before anything else can fail, also when none decoded
        print(f"skipped {line}", file=sys.stderr)
    if not items:
        raise ValueError(f"nothing to embed in {a.images or a.audio or a.text}"
                         + (f": all {len(skipped)} files were skipped (listed above)" if skipped else ""))
    with precision.autocast(device):
        emb = embed_items(model, modality, items)
    # bf16 autocast normalises in bf16 (norms 1 +- 4e-3): the file holds unit float32 rows
    emb = torch.nn.functional.normalize(emb.float(), dim=-1).numpy()
    np.save(a.out, emb)
    a.out.with_suffix(".names.txt").write_text("\n".join(names) + "\n")
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {a.out} ({len(skipped)} files skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
