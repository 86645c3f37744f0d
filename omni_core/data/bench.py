"""Data benchmark: loader throughput of DALI (CPU pipeline) and PIL + soundfile, and packing efficiency.

Both loaders decode the same train shards with the same number of threads; DALI does the train
preprocessing (random resized crop + bicubic resize), the PIL path only resizes when sizes differ.
Without --data, a dataset of --synth train samples is generated in a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from omni_core.data.collator import PackingCollator, triplet_tokens
from omni_core.data.dali import dali_available, make_loader
from omni_core.data.synth import generate


def throughput(path: Path, backend: str, threads: int, image_size: int | None, repeats: int) -> tuple[float, list]:
    """Best samples/s over `repeats` full passes (the first pass also warms the page cache)."""
    best, samples = 0.0, []
    for _ in range(repeats):
        loader = make_loader(path, "train", image_size=image_size, num_threads=threads, backend=backend)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = list(loader)
        best = max(best, len(samples) / (time.perf_counter() - start))
    return best, samples


def run(path: Path, threads: int, image_size: int | None, budget: int, repeats: int) -> dict:
    result = {"dali_cpu_samples_per_s": None}
    if dali_available():
        result["dali_cpu_samples_per_s"], _ = throughput(path, "dali", threads, image_size, repeats)
    result["fallback_samples_per_s"], samples = throughput(path, "pil", threads, image_size, repeats)
    collator = PackingCollator(budget, triplet_tokens)
    groups = list(collator(samples))
    result.update(packing_efficiency=collator.efficiency, packing_budget=budget, packing_groups=len(groups),
                  samples=len(samples), threads=threads)
    if result["dali_cpu_samples_per_s"]:
        result["dali_speedup"] = result["dali_cpu_samples_per_s"] / result["fallback_samples_per_s"]
    return result


def table(result: dict) -> str:
    rows = [("DALI CPU loader", result["dali_cpu_samples_per_s"], "samples/s"),
            ("PIL + soundfile loader", result["fallback_samples_per_s"], "samples/s"),
            ("DALI / fallback", result.get("dali_speedup"), "x"),
            (f"packing efficiency @ {result['packing_budget']} tokens", result["packing_efficiency"], "")]
    lines = [f"{result['samples']} train samples, {result['threads']} threads"]
    for name, value, unit in rows:
        shown = "n/a (DALI not installed)" if value is None else f"{value:.3f} {unit}".rstrip()
        lines.append(f"{name:<36} {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omni bench data", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="dataset directory (default: synthesise one)")
    ap.add_argument("--synth", type=int, default=1000, help="train samples to synthesise without --data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=None, help="default: the dataset's")
    ap.add_argument("--budget", type=int, default=4096, help="packing budget in tokens")
    ap.add_argument("--repeats", type=int, default=2, help="passes per loader, the best is kept")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data
        if path is None:
            path = Path(tmp)
            generate(path, n_train=args.synth, n_eval=8, seed=0, workers=args.threads)
        result = run(path, args.threads, args.image_size, args.budget, args.repeats)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
