"""``omni demo`` (``make demo``): the main job.

1. generate the image–text–audio triplet dataset (if ``data/demo`` is missing);
2. pre-train the tiny preset on it for a 10-minute training budget (``--recipe``:
   ``contrastive``, the default, image–text + audio–text InfoNCE in one packed pass — the
   recipe that reached the highest emergent image↔audio retrieval in 10 CPU minutes;
   ``two-stage`` is ONE-PEACE's objective and schedule, stage 1 image–text then stage 2
   audio–text with all but the audio tower frozen; ``joint`` is ONE-PEACE's objective over all
   three modalities at once), evaluating retrieval every ``--eval-every`` training seconds;
3. evaluate retrieval in all six directions (image↔audio is never trained: emergent) and
   zero-shot shape/colour classification of images and audio;
4. print the tables, write ``runs/demo/eval.json`` and ``runs/demo/demo.png`` (loss curves,
   eval R@1 over training time, final R@1).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

from omni_core.data import synth
from omni_core.eval.retrieval import directions, evaluate, format_classify, format_table
from omni_core.precision import add_precision_argument
from omni_core.train.trainer import EVAL_CURVE, METRICS, TrainArgs, train

DEMO_RECIPES = ("joint", "two-stage", "contrastive")
# Images are rendered at 128 px and trained at 96 px (6x6 patches) with 3600-token steps (about as
# many triplets per step as 64 px at 2800): at 64 px the shapes are invisible to the 16-px patches
# and image<->text plateaus at R@1 0.45; this setting reaches 0.70-0.77 (README, measured).
RENDER_SIZE, IMAGE_SIZE, TOKEN_BUDGET = 128, 96, 3600
STAGE1_SHARE = 0.6  # two-stage: the share of the budget stage 1 gets
# With the trainer's 30 warmup steps the peak learning rate arrives while the towers are still
# random: learning starts late, and in one of three runs the text tower collapsed (every caption the
# same embedding: both losses sat at ln(batch) for 100+ steps). 150 warmup steps lifted image->audio
# R@1 from 0.47 to 0.68 in the same 10 minutes (README, measured).
WARMUP_STEPS = 150


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def plot(runs: list[Path], out: Path, result: dict, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_curve, ax_bar) = plt.subplots(1, 3, figsize=(18, 4.8))
    offset = 0.0
    for k, run in enumerate(runs):
        rows = _rows(run / METRICS)
        keys = [c for c in rows[0] if c.startswith(("itc", "atc", "dcl", "loss_"))] if rows else []
        for key in keys:
            ax_loss.plot([offset + float(r["elapsed_s"]) for r in rows], [float(r[key]) for r in rows],
                         label=f"{key}" + (f" (stage {k + 1})" if len(runs) > 1 else ""), linewidth=0.8)
        curve = _rows(run / EVAL_CURVE)
        for name, colour in (("image->text", "#4477aa"), ("audio->text", "#228833"), ("image->audio", "#ee6677"),
                             ("audio->image", "#aa3377")):
            ax_curve.plot([offset + float(r["elapsed_s"]) for r in curve], [float(r[name]) for r in curve],
                          color=colour, marker="o", markersize=3, label=name if k == 0 else None)
        offset += float(rows[-1]["elapsed_s"]) if rows else 0.0
        if len(runs) > 1 and k < len(runs) - 1:
            ax_curve.axvline(offset, color="grey", linestyle=":", label="stage 1 → 2")
    ax_loss.set(xlabel="training seconds", ylabel="loss", title="pre-training losses")
    ax_loss.legend(fontsize=6, ncol=2)
    ax_curve.set(xlabel="training seconds", ylabel="eval R@1", ylim=(0, 1), title="eval R@1 during training")
    ax_curve.legend(fontsize=7)
    names = list(directions(result))
    r1 = [result[n]["R@1"] for n in names]
    bars = ax_bar.bar(range(len(names)), r1, color=["#4477aa"] * 4 + ["#ee6677"] * 2)
    ax_bar.bar_label(bars, fmt="%.2f")
    ax_bar.axhline(result[names[0]]["chance"], color="grey", linestyle="--", label="chance")
    ax_bar.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_bar.set(ylim=(0, 1), ylabel="R@1", title="final retrieval (red: never trained)")
    ax_bar.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_recipe(recipe: str, data: Path, run: Path, minutes: float, seed: int, eval_every: float,
               hard_negatives: bool, image_size: int, token_budget: int, precision: str,
               warmup_steps: int = WARMUP_STEPS) -> list[Path]:
    """Train with a demo recipe; returns the run directories in order (the last is final)."""
    common = dict(data=str(data), seed=seed, eval_every_s=eval_every, hard_negatives=hard_negatives,
                  overrides={"image_size": image_size}, token_budget=token_budget, precision=precision,
                  warmup_steps=warmup_steps)
    if recipe == "two-stage":
        first, second = run / "stage1", run
        run.mkdir(parents=True)
        train(TrainArgs(out=str(first), minutes=minutes * STAGE1_SHARE, recipe="one-peace", stage="1", **common))
        train(TrainArgs(out=str(second), minutes=minutes * (1 - STAGE1_SHARE), recipe="one-peace", stage="2",
                        init=str(first), **common))
        return [first, second]
    if recipe == "joint":
        train(TrainArgs(out=str(run), minutes=minutes, recipe="one-peace", stage="joint", **common))
    else:
        train(TrainArgs(out=str(run), minutes=minutes, recipe="contrastive", **common))
    return [run]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=f"data/demo{RENDER_SIZE}")
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--recipe", choices=DEMO_RECIPES, default="contrastive",
                   help="contrastive (default: highest emergent image->audio R@1 measured in 10 minutes), "
                        "two-stage (ONE-PEACE's schedule) or joint (ONE-PEACE's objective, all modalities at once)")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget")
    p.add_argument("--eval-every", type=float, default=60.0, help="training seconds between eval points")
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render-size", type=int, default=RENDER_SIZE, help="pixels per side of the generated images")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="pixels per image side the model sees")
    p.add_argument("--token-budget", type=int, default=TOKEN_BUDGET, help="tokens per packed training step")
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="linear warmup steps (each stage)")
    p.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=False,
                   help="compose steps from samples sharing object phrases (measured worse: off by default)")
    # auto: bf16 autocast where the CPU has native bf16 (fp32 elsewhere). With the adapters' fp32 stems it
    # ran 1280 steps against ~1000 in fp32 and reached image->audio R@1 0.70, inside fp32's 0.62-0.74 over
    # three seeds (README); before that policy bf16 learned much slower.
    add_precision_argument(p, default="auto")
    a = p.parse_args(argv)
    data, run = Path(a.data), Path(a.run)
    start = time.perf_counter()
    if not (data / "manifest.json").exists():
        print(f"[1/3] generating {a.train_samples} + {a.eval_samples} triplets into {data}")
        synth.main(["--out", str(data), "--train", str(a.train_samples), "--eval", str(a.eval_samples),
                    "--seed", str(a.seed), "--image-size", str(a.render_size)])
    else:
        print(f"[1/3] dataset found at {data}")
    rendered = json.loads((data / "manifest.json").read_text())["image_size"]
    if rendered < a.image_size:
        raise ValueError(f"{data} holds {rendered}-pixel images, smaller than the {a.image_size} the demo trains "
                         f"on: pass --image-size {rendered} or another --data directory")
    if run.exists():
        shutil.rmtree(run)  # a fresh run each time; `omni pretrain --resume` is for continuing one
    print(f"[2/3] pre-training the tiny preset for {a.minutes:g} minutes, recipe {a.recipe}")
    runs = run_recipe(a.recipe, data, run, a.minutes, a.seed, a.eval_every, a.hard_negatives, a.image_size,
                      a.token_budget, a.precision, a.warmup_steps)
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    steps = sum(s["steps"] for s in summaries)
    print(f"      {steps} steps, {sum(s['tokens'] for s in summaries):,} tokens, "
          f"{sum(s['train_seconds'] for s in summaries):.0f} s, skipped {summaries[-1]['skipped_samples']} "
          f"corrupt samples; precision: {summaries[-1]['precision_reason']}")
    print("[3/3] evaluating retrieval and zero-shot classification on the eval split")
    result = evaluate(run, data, classify=True)
    result["recipe"] = a.recipe
    result["hard_negatives"] = a.hard_negatives
    result["train"] = [{k: v for k, v in s.items() if k != "skipped"} for s in summaries]
    (run / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(directions(result)))
    print(format_classify(result["classify"]))
    title = (f"omni demo --recipe {a.recipe}{' --hard-negatives' if a.hard_negatives else ''}: "
             f"{a.minutes:g} training minutes, tiny preset at {a.image_size} px, seed {a.seed}")
    print(f"wrote {run / 'eval.json'} and {plot(runs, run, result, title)}; total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
