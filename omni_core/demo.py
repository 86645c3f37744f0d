"""``omni demo`` (``make demo``): the main job.

1. generate the image–text–audio triplet dataset (if ``data/demo`` is missing);
2. pre-train the tiny preset on it for a 10-minute budget (image–text and audio–text only);
3. evaluate retrieval in all six directions, including the never-trained image↔audio;
4. print the table, write ``runs/demo/eval.json`` and ``runs/demo/demo.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

from omni_core.data import synth
from omni_core.eval.retrieval import directions, evaluate, format_table
from omni_core.train.trainer import METRICS, TrainArgs, train


def plot(run: Path, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (run / METRICS).open() as f:
        rows = list(csv.DictReader(f))
    fig, (ax_loss, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [int(r["step"]) for r in rows]
    for key, label in (("loss_image_text", "image–text"), ("loss_audio_text", "audio–text")):
        ax_loss.plot(steps, [float(r[key]) for r in rows], label=label)
    ax_loss.set(xlabel="step", ylabel="InfoNCE loss", title="pre-training loss")
    ax_loss.legend()
    names = list(directions(result))
    r1 = [result[n]["R@1"] for n in names]
    bars = ax_bar.bar(range(len(names)), r1, color=["#4477aa"] * 4 + ["#ee6677"] * 2)
    ax_bar.bar_label(bars, fmt="%.2f")
    ax_bar.axhline(result[names[0]]["chance"], color="grey", linestyle="--", label="chance")
    ax_bar.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_bar.set(ylim=(0, 1), ylabel="R@1", title="retrieval on the eval split (red: never trained)")
    ax_bar.legend()
    fig.tight_layout()
    path = run / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget")
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data, run = Path(a.data), Path(a.run)
    start = time.perf_counter()
    if not (data / "manifest.json").exists():
        print(f"[1/3] generating {a.train_samples} + {a.eval_samples} triplets into {data}")
        synth.main(["--out", str(data), "--train", str(a.train_samples), "--eval", str(a.eval_samples),
                    "--seed", str(a.seed)])
    else:
        print(f"[1/3] dataset found at {data}")
    if run.exists():
        shutil.rmtree(run)  # a fresh run each time; `omni pretrain --resume` is for continuing one
    print(f"[2/3] pre-training the tiny preset for {a.minutes:g} minutes")
    summary = train(TrainArgs(data=str(data), out=str(run), minutes=a.minutes, seed=a.seed))
    print(f"      {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['train_seconds']:.0f} s, "
          f"skipped {summary['skipped_samples']} corrupt samples")
    print("[3/3] evaluating retrieval on the eval split")
    result = evaluate(run, data)
    result["train"] = {k: v for k, v in summary.items() if k != "skipped"}
    (run / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(directions(result)))
    print(f"wrote {run / 'eval.json'} and {plot(run, result)}; total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
