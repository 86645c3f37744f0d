"""Packed ONE-PEACE step vs the released padded multi-pass step, forward + backward, same process.

Two mixes: stage 1 (image–text: captions of 8–70 tokens, 257-token images at 256 px) and
stage 2 (audio–text: clips of 1–15 s at 50 frames/s). Both steps run the same recipe with
the same weights and masks: the packed step is one encoder pass with gradients, one without
and one decoder pass; the padded step is the released trainer's passes (stage 1: six encoder
passes and three decoder passes; stage 2: five and two), each padded to its longest member.
``flop_ratio`` is the padded step's FLOPs over the packed step's (encoder + decoder, backward
counted as twice the forward): the bound on what packing can gain. ``gflops`` counts the
packed step's useful FLOPs per second; ``gemm_peak_gflops`` is matmul in the step's precision
at the step's own largest GEMM shape ([tokens, D] × [D, F]), measured after every repeat (the
best of 5 calls; the median over repeats, so it sees the same machine load as the steps);
``efficiency`` is their ratio.

``--precision`` runs the steps under each precision in turn (``omni_core.precision``: ``auto``
is bf16 autocast on a CPU with native bf16, else fp32), all alternating within each repeat; a
bf16 row also reports ``speedup_vs_fp32``, the fp32 packed step's time over its own, when fp32
ran too.

    omni bench packing [--json] [--repeats N] [--precision fp32 auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from omni_core.data.sample import Sample
from omni_core.model.omni import OmniConfig, OmniModel
from omni_core.precision import PRECISIONS, Precision, resolve_precision
from omni_core.recipes.one_peace import OnePeaceRecipe, full_length
from omni_core.recipes.one_peace_padded import padded_forward

EOS = 3
MIXES = {
    # name: (stage, pairs per step, model overrides)
    "stage1-image-text": ("1", 8, dict(image_size=256)),
    "stage2-audio-text": ("2", 6, dict(audio_mel_downsample=1)),  # 50 frames/s as ONE-PEACE
}


def make_mix(name: str, seed: int = 0, pairs: int | None = None):
    stage, n, overrides = MIXES[name]
    n = pairs or n
    g = torch.Generator().manual_seed(seed)
    model = OmniModel.from_preset("tiny", **overrides)
    recipe = OnePeaceRecipe(stage, word_start=torch.rand(model.cfg.vocab_size, generator=g) < 0.7, eos_id=EOS)
    recipe.attach(model)
    samples = []
    for i in range(n):
        ids = torch.randint(5, model.cfg.vocab_size, (int(torch.randint(8, 71, (1,), generator=g)),), generator=g)
        recipe.word_start[ids[0]] = True
        ids = torch.cat([ids, torch.tensor([EOS])])
        seconds = float(torch.rand(1, generator=g)) * 14 + 1
        samples.append(Sample(f"s{i}", torch.randn(3, model.cfg.image_size, model.cfg.image_size, generator=g),
                              torch.randn(int(seconds * 16000), generator=g), "", ids))
    masks = recipe.draw_masks(model, samples, torch.Generator().manual_seed(seed + 1))
    return model, recipe, samples, masks


def pass_flops(cfg: OmniConfig, lengths: list[int]) -> float:
    """Forward FLOPs of a stack of ``cfg`` over sequences of these lengths."""
    per_token = 2 * (4 * cfg.dim**2 + (3 if cfg.geglu else 2) * cfg.dim * cfg.ffn_hidden)
    return cfg.depth * (per_token * sum(lengths) + 4 * cfg.dim * sum(L * L for L in lengths))


def step_layouts(model, recipe, samples, masks) -> list[tuple[OmniConfig, bool, list[list[int]]]]:
    """Every pass of the released step: (stack config, with gradient, per sample slot lengths)."""
    n, plan = len(samples), recipe.plan
    passes = []
    for view in plan.student + plan.frozen:
        refs = [recipe.sequences(view, i, masks[i]) for i in range(n)]
        lens = [[r.keep.numel() if r.keep is not None else full_length(model, samples[i], r.modality)
                 for r in refs[i]] for i in range(n)]
        passes.append((model.cfg, view in plan.student, lens))
        if view.startswith("m_"):
            full = [[full_length(model, samples[i], r.modality) for r in refs[i]] for i in range(n)]
            passes.append((model.dcl_decoder.cfg, True, full))
    return passes


def step_flops(passes, padded: bool) -> float:
    total = 0.0
    for cfg, grad, lens in passes:
        if padded:
            slot_max = [max(row[s] for row in lens) for s in range(len(lens[0]))]
            lens = [slot_max] * len(lens)
        total += pass_flops(cfg, [sum(row) for row in lens]) * (3 if grad else 1)
    return total


def packed_forward(recipe, model, samples, masks):
    return recipe.forward(model, samples, masks)


def run_once(forward, model, recipe, samples, masks, precision: Precision | None = None) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with (precision or resolve_precision("fp32")).autocast("cpu"):
        loss, _ = recipe.loss(model, forward(recipe, model, samples, masks), samples, masks)
    loss.backward()
    return time.perf_counter() - start


def gemm_peak(tokens: int, cfg: OmniConfig, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """GFLOP/s of the step's largest GEMM shape in ``dtype`` on this machine, now."""
    a, b = torch.randn(tokens, cfg.dim, dtype=dtype), torch.randn(cfg.dim, cfg.ffn_hidden, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * tokens * cfg.dim * cfg.ffn_hidden / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


FORWARDS = {"packed": packed_forward, "padded": padded_forward}


def run_mix(name: str, repeats: int, pairs: int | None = None, precisions: tuple[str, ...] = ("fp32",)) -> list[dict]:
    """One row per precision (names resolving to the same precision run once)."""
    torch.manual_seed(0)
    model, recipe, samples, masks = make_mix(name, pairs=pairs)
    model.train()
    passes = step_layouts(model, recipe, samples, masks)
    chosen = {p.name: p for p in (resolve_precision(n, "cpu") for n in precisions)}
    encoder_tokens = max(sum(map(sum, lens)) for cfg, _, lens in passes if cfg is model.cfg)
    times = {(p, f): [] for p in chosen for f in FORWARDS}
    peaks: dict[str, list[float]] = {p: [] for p in chosen}
    for prec in chosen.values():  # warm-up: allocators and caches
        for forward in FORWARDS.values():
            run_once(forward, model, recipe, samples, masks, prec)
    for _ in range(repeats):  # alternate, so load drifts hit every variant alike
        for p, prec in chosen.items():
            for f, forward in FORWARDS.items():
                times[p, f].append(run_once(forward, model, recipe, samples, masks, prec))
            peaks[p].append(gemm_peak(encoder_tokens, model.cfg, prec.dtype or torch.float32))
    real_tokens = sum(sum(map(sum, lens)) * (2 if grad else 1) for _, grad, lens in passes)
    useful = step_flops(passes, padded=False)
    rows = []
    for p, prec in chosen.items():
        packed_s, padded_s = (statistics.median(times[p, f]) for f in FORWARDS)
        peak = statistics.median(peaks[p])
        row = {
            "mix": name,
            "precision": p,
            "precision_choice": prec.description,
            "passes_padded": len(passes),
            "passes_packed": 3,
            "real_tokens": real_tokens,
            "packed_step_s": round(packed_s, 4),
            "padded_step_s": round(padded_s, 4),
            "packed_tokens_per_s": round(real_tokens / packed_s, 1),
            "padded_tokens_per_s": round(real_tokens / padded_s, 1),
            "speedup": round(padded_s / packed_s, 3),
            "flop_ratio": round(step_flops(passes, padded=True) / useful, 3),
            "gflops": round(useful / packed_s / 1e9, 2),
            "gemm_peak_gflops": round(peak, 2),
            "efficiency": round(useful / packed_s / 1e9 / peak, 3),
            "cpu": torch.backends.cpu.get_cpu_capability(),
        }
        if p != "fp32" and "fp32" in chosen:
            row["speedup_vs_fp32"] = round(statistics.median(times["fp32", "packed"]) / packed_s, 3)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni bench packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per mix")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per step (median)")
    parser.add_argument("--mix", choices=sorted(MIXES), action="append", help="run only these mixes")
    parser.add_argument("--pairs", type=int, help="pairs per step (default: the mix's own)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32", "auto"],
                        help="precisions to run, alternating (default: fp32 and auto)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError("--repeats must be positive")
    rows = [row for name in (args.mix or MIXES)
            for row in run_mix(name, args.repeats, args.pairs, tuple(args.precision))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'mix':<20}{'prec.':>6}{'passes':>8}{'tokens':>8}{'packed tok/s':>14}{'padded tok/s':>14}"
          f"{'speedup':>9}{'flop ratio':>12}{'GFLOP/s':>9}{'peak':>7}{'eff.':>7}{'vs fp32':>9}")
    for r in rows:
        vs = f"{r['speedup_vs_fp32']:>8.2f}x" if "speedup_vs_fp32" in r else f"{'':>9}"
        print(f"{r['mix']:<20}{r['precision']:>6}{r['passes_padded']:>5}->3{r['real_tokens']:>8}"
              f"{r['packed_tokens_per_s']:>14.0f}{r['padded_tokens_per_s']:>14.0f}{r['speedup']:>8.2f}x"
              f"{r['flop_ratio']:>11.2f}x{r['gflops']:>9.1f}{r['gemm_peak_gflops']:>7.0f}{r['efficiency']:>7.2f}{vs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
