"""Packed step vs ONE-PEACE's padded multi-pass step, forward + backward, same process.

Two mixes: stage-1-like image–text (captions of 8–70 tokens, 257-token images: 256 px)
and stage-2-like audio–text (clips of 1–15 s: 50–750 frames). Both steps run the same
views with the same weights; tokens/s counts real (unpadded) tokens. ``flop_ratio`` is
the encoder's padded FLOPs over its packed FLOPs: the bound on the gain.

    omni bench packing [--json] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from omni_core.model.omni import AUDIO, IMAGE, TEXT, ModalInputs, OmniModel
from omni_core.train.steps import packed_step, padded_step
from omni_core.train.views import View, step_views

MIXES = {
    # name: (paired modality, pairs per step, model overrides)
    "stage1-image-text": (IMAGE, 8, dict(image_size=256)),
    "stage2-audio-text": (AUDIO, 6, dict(image_size=64, audio_mel_downsample=1)),  # 50 frames/s
}


def make_mix(name: str, seed: int = 0, pairs: int | None = None) -> tuple[OmniModel, ModalInputs, list[View]]:
    other, n, overrides = MIXES[name]
    n = pairs or n
    g = torch.Generator().manual_seed(seed)
    model = OmniModel.from_preset("tiny", **overrides)
    text = [torch.randint(0, model.cfg.vocab_size, (int(torch.randint(8, 71, (1,), generator=g)),), generator=g)
            for _ in range(n)]
    inputs = ModalInputs(text=text)
    if other == IMAGE:
        inputs.image = torch.randn(n, 3, model.cfg.image_size, model.cfg.image_size, generator=g)
    else:
        seconds = torch.rand(n, generator=g) * 14 + 1
        inputs.audio = [torch.randn(int(s * 16000), generator=g) for s in seconds]
    counts = {TEXT: [t.numel() + 1 for t in text],
              IMAGE: [(model.cfg.image_size // 16) ** 2 + 1] * n,
              AUDIO: [model.audio.num_frames(a.numel()) + 1 for a in inputs.audio]}
    return model, inputs, step_views(other, n, counts, seed=seed)


def view_lengths(views: list[View], counts: dict[int, list[int]]) -> dict[str, list[list[int]]]:
    """Per view, per sequence: the token count of each segment."""
    return {v.name: [[len(r.keep) if r.keep is not None else counts[r.modality][r.index] for r in seq]
                     for seq in v.sequences] for v in views}


def encoder_flops(model: OmniModel, seq_lengths: list[int]) -> float:
    """Forward FLOPs of the shared stack for sequences of these lengths."""
    cfg = model.cfg
    per_token = 2 * (4 * cfg.dim**2 + (3 if cfg.geglu else 2) * cfg.dim * cfg.ffn_hidden)
    attention = 4 * cfg.dim * sum(L * L for L in seq_lengths)
    return cfg.depth * (per_token * sum(seq_lengths) + attention)


def flop_ratio(model: OmniModel, views: list[View], counts) -> float:
    lengths = view_lengths(views, counts)
    packed = [sum(seq) for v in lengths.values() for seq in v]
    padded = []
    for v in lengths.values():
        slot_max = [max(seq[s] for seq in v) for s in range(len(v[0]))]
        padded += [sum(slot_max)] * len(v)
    return encoder_flops(model, padded) / encoder_flops(model, packed)


def run_once(step, model, inputs, views) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, _ = step(model, inputs, views)
    loss.backward()
    return time.perf_counter() - start


def time_steps(model, inputs, views, repeats: int) -> tuple[float, float]:
    """Median seconds of (packed, padded); runs alternate so load drifts hit both alike."""
    run_once(packed_step, model, inputs, views)  # warm-up: allocators and caches
    run_once(padded_step, model, inputs, views)
    packed, padded = [], []
    for _ in range(repeats):
        packed.append(run_once(packed_step, model, inputs, views))
        padded.append(run_once(padded_step, model, inputs, views))
    return statistics.median(packed), statistics.median(padded)


def run_mix(name: str, repeats: int, pairs: int | None = None) -> dict:
    torch.manual_seed(0)
    model, inputs, views = make_mix(name, pairs=pairs)
    counts = {TEXT: [t.numel() + 1 for t in inputs.text],
              IMAGE: [(model.cfg.image_size // 16) ** 2 + 1] * (0 if inputs.image is None else len(inputs.image)),
              AUDIO: [model.audio.num_frames(a.numel()) + 1 for a in inputs.audio]}
    lengths = view_lengths(views, counts)
    real_tokens = sum(sum(seq) for v in lengths.values() for seq in v)
    packed_s, padded_s = time_steps(model, inputs, views, repeats)
    return {
        "mix": name,
        "sequences": sum(len(v.sequences) for v in views),
        "real_tokens": real_tokens,
        "packed_step_s": round(packed_s, 4),
        "padded_step_s": round(padded_s, 4),
        "packed_tokens_per_s": round(real_tokens / packed_s, 1),
        "padded_tokens_per_s": round(real_tokens / padded_s, 1),
        "speedup": round(padded_s / packed_s, 3),
        "flop_ratio": round(flop_ratio(model, views, counts), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni bench packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per mix")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per step (median)")
    parser.add_argument("--mix", choices=sorted(MIXES), action="append", help="run only these mixes")
    parser.add_argument("--pairs", type=int, help="pairs per step (default: the mix's own)")
    args = parser.parse_args(argv)
    rows = [run_mix(name, args.repeats, args.pairs) for name in (args.mix or MIXES)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'mix':<20}{'seqs':>6}{'tokens':>8}{'packed tok/s':>14}{'padded tok/s':>14}"
          f"{'speedup':>9}{'flop ratio':>12}")
    for r in rows:
        print(f"{r['mix']:<20}{r['sequences']:>6}{r['real_tokens']:>8}{r['packed_tokens_per_s']:>14.0f}"
              f"{r['padded_tokens_per_s']:>14.0f}{r['speedup']:>8.2f}x{r['flop_ratio']:>11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
