"""Data-parallel scaling: training samples/s of the ``tiny`` preset at 1 and 2 ranks (or more).

Each measurement starts ``torchrun --nproc-per-node R`` on this file (the launch a user runs);
every rank wraps the model with ``--dist`` (DDP by default), and runs ONE-PEACE's joint-stage recipe on
its own synthetic image–text–audio triplets (``--pairs`` per rank and step) with cross-rank
contrastive negatives; an AdamW step follows every backward. On CPU each rank gets
``--threads-per-rank`` threads (default 1: a rank stands for one device, as a GPU would), so the
ratio shows what a second device buys after the gradient all-reduce; on a shared machine the
other processes' load shows in it too. After warm-up
steps, the slowest rank's wall time over the timed steps gives ``samples_per_s`` (global).

    omni bench scaling [--json] [--ranks 1 2] [--steps N] [--pairs P] [--dist ddp|fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from omni_core.data.sample import Sample
from omni_core.model.omni import OmniModel
from omni_core.recipes.one_peace import OnePeaceRecipe
from omni_core.train import dist

EOS = 3


def synthetic_triplets(model: OmniModel, n: int, seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    size, vocab = model.cfg.image_size, model.cfg.vocab_size
    out = []
    for i in range(n):
        ids = torch.cat([torch.randint(5, vocab, (int(torch.randint(8, 30, (1,), generator=g)),), generator=g),
                         torch.tensor([EOS])])
        seconds = 1 + 3 * float(torch.rand(1, generator=g))
        out.append(Sample(f"s{i}", torch.randn(3, size, size, generator=g),
                          torch.randn(int(seconds * 16000), generator=g), "", ids))
    return out


def worker(mode: str, pairs: int, warmup: int, steps: int, out: str) -> None:
    dist.init_distributed()
    torch.manual_seed(0)
    model = OmniModel.from_preset("tiny")
    recipe = OnePeaceRecipe("joint", word_start=torch.ones(model.cfg.vocab_size, dtype=torch.bool), eos_id=EOS)
    recipe.attach(model)
    recipe.prepare(model, reset_logit_scale=False)
    runner = dist.wrap_model(model, mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples = synthetic_triplets(model, pairs, seed=1000 + dist.rank())
    for i in range(warmup + steps):
        if i == warmup:
            torch.distributed.barrier()
            start = time.perf_counter()
        loss, _ = runner(recipe.step, samples, torch.Generator().manual_seed(i))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed = torch.tensor([time.perf_counter() - start])
    torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    if dist.rank() == 0:
        Path(out).write_text(json.dumps({"seconds": elapsed.item()}))
    dist.shutdown()


def run(ranks: int, mode: str, pairs: int, warmup: int, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               __file__, "--worker", mode, str(pairs), str(warmup), str(steps), out]
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun with {ranks} ranks failed:\n{proc.stderr[-3000:]}")
        seconds = json.loads(Path(out).read_text())["seconds"]
    samples = ranks * pairs * steps
    return {"ranks": ranks, "dist": mode, "threads_per_rank": threads, "pairs_per_rank": pairs, "steps": steps,
            "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # one rank, started by torchrun (see run)
        mode, pairs, warmup, steps, out = argv[1:]
        worker(mode, int(pairs), int(warmup), int(steps), out)
        return 0
    p = argparse.ArgumentParser(prog="omni bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dist", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--pairs", type=int, default=4, help="triplets per rank and step")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads-per-rank", type=int, default=1)
    a = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows = [run(r, a.dist, a.pairs, a.warmup, a.steps, a.threads_per_rank) for r in a.ranks]
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup_vs_first"] = round(r["samples_per_s"] / base, 3)
    if a.json:
        print(json.dumps({"preset": "tiny", "device": "cpu" if not torch.cuda.is_available() else "cuda",
                          "cores": cores, "results": rows}, indent=2))
        return 0
    print(f"tiny preset, {a.dist}, {a.threads_per_rank} thread(s) per rank, {cores} cores")
    print(f"{'ranks':>6}{'threads/rank':>14}{'samples/s':>12}{'vs first':>10}")
    for r in rows:
        print(f"{r['ranks']:>6}{r['threads_per_rank']:>14}{r['samples_per_s']:>12.2f}{r['speedup_vs_first']:>9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
