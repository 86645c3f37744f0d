"""Synthetic image–audio–text triplets: coloured shapes drawn with PIL, captions spoken by espeak-ng.

Layout written under --out:
  train-000000.tar ...   WebDataset shards, per sample {key}.jpg {key}.flac {key}.txt {key}.json
  eval-000000.tar ...
  manifest.json          shards, sample counts, seed, image size, sample rate, held-out pairs
  tokenizer.json         BPE trained on the train captions (see tokenizer.py)

Everything is a pure function of the seed: captions are planned in the parent process and each sample
is rendered from its own RNG, so the output bytes do not depend on --workers.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from omni_core.data.audio import SAMPLE_RATE, encode_flac, resample
from omni_core.data.shards import ShardWriter
from omni_core.data.tokenizer import TOKENIZER_FILE, train_tokenizer

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
# position name -> (phrase, centre as a fraction of the image side)
POSITIONS = {
    "left": ("on the left", (0.2, 0.5)),
    "right": ("on the right", (0.8, 0.5)),
    "top": ("at the top", (0.5, 0.2)),
    "bottom": ("at the bottom", (0.5, 0.8)),
    "center": ("in the center", (0.5, 0.5)),
}
# One pair per colour and per shape, so every word still occurs in training, only the pairing is new.
HELD_OUT_PAIRS = (
    ("red", "star"),
    ("green", "triangle"),
    ("blue", "hexagon"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "diamond"),
)
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-029", "en-gb-scotland", "en-us+f2", "en-gb-x-rp")
SPEEDS = (170, 185, 200, 215, 230)
SPLITS = ("train", "eval")
FORMAT = "omni-synth-v1"
_SUPERSAMPLE = 4  # draw large then downsample: PIL's polygons are not antialiased


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    position: str


@dataclass(frozen=True)
class Plan:
    """Everything needed to render one sample, fixed before any worker starts."""

    key: str
    split: str
    items: tuple[Item, ...]
    voice: str
    speed: int
    render_seed: int
    image_size: int

    @property
    def caption(self) -> str:
        return caption_of(self.items)


def caption_of(items: tuple[Item, ...]) -> str:
    def phrase(i: Item) -> str:
        article = "an" if i.colour[0] in "aeiou" else "a"
        return f"{article} {i.colour} {i.shape} {POSITIONS[i.position][0]}"

    return " and ".join(phrase(i) for i in items)


def is_held_out(items: tuple[Item, ...]) -> bool:
    return any((i.colour, i.shape) in HELD_OUT_PAIRS for i in items)


def _draw_items(rng: random.Random, n_shapes: int) -> tuple[Item, ...]:
    positions = rng.sample(sorted(POSITIONS), n_shapes)
    return tuple(Item(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), p) for p in positions)


def _random_items(rng: random.Random) -> tuple[Item, ...]:
    return _draw_items(rng, 1 if rng.random() < 0.4 else 2)


def plan_captions(n_train: int, n_eval: int, seed: int) -> dict[str, list[tuple[Item, ...]]]:
    """Eval: unique captions, even indices contain a held-out pair. Train: no held-out pair, no eval caption."""
    rng = random.Random(f"captions-{seed}")
    eval_items: list[tuple[Item, ...]] = []
    seen: set[str] = set()
    attempts = 0
    while len(eval_items) < n_eval:
        attempts += 1
        if attempts > 100 * (n_eval + 10):
            raise ValueError(f"cannot draw {n_eval} unique eval captions; ask for fewer")
        items = _random_items(rng)
        want_novel = len(eval_items) % 2 == 0
        if is_held_out(items) != want_novel or caption_of(items) in seen:
            continue
        seen.add(caption_of(items))
        eval_items.append(items)
    train_items = []
    while len(train_items) < n_train:
        items = _random_items(rng)
        if not is_held_out(items) and caption_of(items) not in seen:
            train_items.append(items)
    return {"train": train_items, "eval": eval_items}


def make_plans(n_train: int, n_eval: int, seed: int, image_size: int) -> dict[str, list[Plan]]:
    captions = plan_captions(n_train, n_eval, seed)
    plans: dict[str, list[Plan]] = {}
    for split, item_lists in captions.items():
        rng = random.Random(f"render-{seed}-{split}")
        plans[split] = [
            Plan(f"{split}-{i:07d}", split, items, rng.choice(VOICES), rng.choice(SPEEDS),
                 rng.getrandbits(63), image_size)
            for i, items in enumerate(item_lists)
        ]
    return plans


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices (the circle is drawn as an ellipse instead)."""
    def ring(n: int, radii: tuple[float, ...], start: float) -> list[tuple[float, float]]:
        angles = start + np.arange(n) * 2 * np.pi / n
        return [(cx + radii[k % len(radii)] * np.cos(a), cy + radii[k % len(radii)] * np.sin(a))
                for k, a in enumerate(angles)]

    if shape == "square":
        return ring(4, (r * 1.2,), np.pi / 4)
    if shape == "diamond":
        return ring(4, (r * 1.15,), 0.0)
    if shape == "triangle":
        return ring(3, (r * 1.2,), -np.pi / 2)
    if shape == "star":
        return ring(10, (r * 1.25, r * 0.5), -np.pi / 2)
    if shape == "hexagon":
        return ring(6, (r * 1.1,), 0.0)
    raise ValueError(f"unknown shape {shape!r}")


def render_image(plan: Plan, rng: random.Random) -> bytes:
    side = plan.image_size * _SUPERSAMPLE
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for item in plan.items:
        fx, fy = POSITIONS[item.position][1]
        cx = (fx + rng.uniform(-0.02, 0.02)) * side
        cy = (fy + rng.uniform(-0.02, 0.02)) * side
        r = rng.uniform(0.08, 0.10) * side  # neighbouring positions are 0.3 apart: shapes never overlap
        fill = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLOURS[item.colour])
        if item.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(item.shape, cx, cy, r), fill=fill)
    img = img.resize((plan.image_size, plan.image_size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng to a 16 kHz float waveform."""
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    # espeak streams a WAV with placeholder sizes; libsndfile reads it up to the end of the data
    pcm, rate = sf.read(io.BytesIO(out), dtype="float32", always_2d=True)
    return resample(pcm.mean(axis=1), rate, SAMPLE_RATE)


def render(plan: Plan) -> dict[str, bytes]:
    rng = random.Random(plan.render_seed)
    meta = {
        "key": plan.key,
        "split": plan.split,
        "caption": plan.caption,
        "items": [asdict(i) for i in plan.items],
        "held_out": is_held_out(plan.items),
        "voice": plan.voice,
        "speed": plan.speed,
        "sample_rate": SAMPLE_RATE,
    }
    return {
        "jpg": render_image(plan, rng),
        "flac": encode_flac(speak(plan.caption, plan.voice, plan.speed)),
        "txt": plan.caption.encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _check_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: run `make system-deps` or `apt-get install espeak-ng`")


def write_split(out: Path, plans: list[Plan], shard_size: int, pool: mp.pool.Pool) -> list[dict]:
    """Render in the pool, write shards in plan order from this process (so bytes are order-stable)."""
    shards: list[dict] = []
    writer: ShardWriter | None = None
    for i, members in enumerate(pool.imap(render, plans, chunksize=8)):
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            name = f"{plans[i].split}-{len(shards):06d}.tar"
            writer = ShardWriter(out / name)
            shards.append({"path": name, "num_samples": 0})
        writer.write(plans[i].key, members)
        shards[-1]["num_samples"] += 1
    if writer is not None:
        writer.close()
    return shards


def generate(out: str | Path, n_train: int, n_eval: int, seed: int = 0, workers: int = 2,
             image_size: int = 64, shard_size: int = 500) -> dict:
    """Write the dataset and return its manifest."""
    _check_espeak()
    if shard_size < 1 or image_size < 8:
        raise ValueError("shard_size must be >= 1 and image_size >= 8")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plans = make_plans(n_train, n_eval, seed, image_size)
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        splits = {s: {"num_samples": len(plans[s]), "shards": write_split(out, plans[s], shard_size, pool)}
                  for s in SPLITS}
    train_tokenizer([p.caption for p in plans["train"]]).save(out / TOKENIZER_FILE)
    manifest = {
        "format": FORMAT,
        "seed": seed,
        "image_size": image_size,
        "sample_rate": SAMPLE_RATE,
        "shard_size": shard_size,
        "members": ["jpg", "flac", "txt", "json"],
        "splits": splits,
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "colours": sorted(COLOURS),
        "shapes": list(SHAPES),
        "positions": sorted(POSITIONS),
        "voices": list(VOICES),
        "speeds": list(SPEEDS),
        "tokenizer": TOKENIZER_FILE,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omni data synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train", type=int, default=4000, help="number of train samples")
    ap.add_argument("--eval", type=int, default=500, help="number of eval samples (unique captions)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="rendering processes")
    ap.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--shard-size", type=int, default=500, help="samples per tar shard")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    m = generate(args.out, args.train, args.eval, args.seed, args.workers, args.image_size, args.shard_size)
    n_shards = sum(len(s["shards"]) for s in m["splits"].values())
    print(f"wrote {args.train} train + {args.eval} eval samples in {n_shards} shards to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
