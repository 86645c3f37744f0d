"""Packed step vs ONE-PEACE's padded multi-pass step, forward + backward, same process.

Two mixes: stage-1-like image–text (captions of 8–70 tokens, 257-token images: 256 px)
and stage-2-like audio–text (clips of 1–15 s: 50–750 frames). Both steps run the same
views with the same weights: the student's five views with gradients and the teacher's
three unmasked views without. tokens/s counts real (unpadded) tokens through the encoder.
``flop_ratio`` is the encoder's padded FLOPs over its packed FLOPs: the bound on the gain.

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


def step_flops(model: OmniModel, views: list[View], counts, padded: bool) -> float:
    """Encoder FLOPs of a step: the student's views forward + backward (3x), the
    teacher's (unmasked) views forward only."""
    lengths = view_lengths(views, counts)
    total = 0.0
    for view in views:
        seqs = lengths[view.name]
        if padded:
            slot_max = [max(seq[s] for seq in seqs) for s in range(len(seqs[0]))]
            seqs = [slot_max] * len(seqs)
        flops = encoder_flops(model, [sum(seq) for seq in seqs])
        total += (3 * flops if view.student else 0.0) + (flops if view.target is None else 0.0)
    return total


def step_tokens(views: list[View], counts) -> int:
    """Real tokens through the encoder in a step (student views + teacher views)."""
    lengths = view_lengths(views, counts)
    per_view = {v.name: sum(sum(seq) for seq in lengths[v.name]) for v in views}
    return sum(per_view[v.name] * (int(v.student) + int(v.target is None)) for v in views)


def run_once(step, model, inputs, views) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss, *_ = step(model, inputs, views)
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
    real_tokens = step_tokens(views, counts)
    packed_s, padded_s = time_steps(model, inputs, views, repeats)
    return {
        "mix": name,
        "sequences": sum(len(v.sequences) * (int(v.student) + int(v.target is None)) for v in views),
        "real_tokens": real_tokens,
        "packed_step_s": round(packed_s, 4),
        "padded_step_s": round(padded_s, 4),
        "packed_tokens_per_s": round(real_tokens / packed_s, 1),
        "padded_tokens_per_s": round(real_tokens / padded_s, 1),
        "speedup": round(padded_s / packed_s, 3),
        "flop_ratio": round(step_flops(model, views, counts, padded=True)
                            / step_flops(model, views, counts, padded=False), 3),
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
