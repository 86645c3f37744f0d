"""Native CPU varlen attention vs the torch reference, forward + backward, same process.

    python benchmarks/bench_native_attention.py [--pairs 64] [--repeats 5] [--precision auto|fp32|bf16] [--json]
    .venv/bin/pytest benchmarks/bench_native_attention.py --benchmark-group-by=param:pack_name

Two ONE-PEACE-like packs at the tiny preset's attention shape (width 192: 3 heads of dim 64)
with ONE-PEACE's sequence lengths and its relative-position bias (text 1D buckets, image
BEiT 2D table, audio 1D log buckets, from the model's own LUT builder):

* ``stage1``: ``pairs`` captions (8-70 tokens + CLS), ``pairs`` images (257 tokens: 256 px)
  and ``pairs`` joint caption+image sequences, as one step's text, image and joint views;
* ``stage2``: ``pairs`` captions, ``pairs`` audio clips (50-750 frames + CLS) and the joint
  caption+audio sequences.

Both backends run the same pack through ``ops.varlen_attention`` (``OMNI_BACKEND`` forced per
run), alternating, and the median of ``repeats`` runs is reported with the useful FLOPs
(4·ΣL²·Dh·H forward, 2.5× that backward) and ``speedup`` = reference time / native time.
``--precision`` picks the q/k/v/table dtype: ``bf16`` feeds bf16 tensors (the native kernel
computes them in fp32; the reference in bf16), ``auto`` resolves by the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from omni_core import ops
from omni_core.model.omni import PRESETS, bias_lut
from omni_core.ops import native_attention
from omni_core.precision import PRECISIONS, resolve_precision

HEADS, HEAD_DIM = 3, 64
TEXT, IMAGE, AUDIO = 0, 1, 2
PACKS = ("stage1", "stage2")
# Positions: the tiny preset at ONE-PEACE's image size (257 tokens) and audio length.
LUT_CONFIG = replace(PRESETS["tiny"], image_size=256, audio_max_frames=750)


def pack_segments(name: str, pairs: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """Per sequence, its (modality, length) segments."""
    g = torch.Generator().manual_seed(seed)
    captions = [1 + int(n) for n in torch.randint(8, 71, (pairs,), generator=g)]
    if name == "stage1":
        other = [(IMAGE, 257)] * pairs
    elif name == "stage2":
        other = [(AUDIO, 1 + int(n)) for n in torch.randint(50, 751, (pairs,), generator=g)]
    else:
        raise ValueError(f"unknown pack {name!r}; choose one of {PACKS}")
    return ([[(TEXT, n)] for n in captions] + [[seg] for seg in other]
            + [[(TEXT, n), seg] for n, seg in zip(captions, other)])


def make_pack(name: str, pairs: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random q, k, v, output gradient and the bias inputs of one pack."""
    seqs = pack_segments(name, pairs, seed)
    g = torch.Generator().manual_seed(seed + 1)
    modality = torch.cat([torch.full((n,), m) for seq in seqs for m, n in seq])
    position = torch.cat([torch.arange(n, dtype=torch.int32) for seq in seqs for _, n in seq])
    lengths = [sum(n for _, n in seq) for seq in seqs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    lut = bias_lut(LUT_CONFIG)
    T = int(cu[-1])
    qkv = [torch.randn(T, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(4)]
    table = (torch.randn(int(lut.max()) + 1, HEADS, generator=g) * 0.5).to(dtype)
    return {"q": qkv[0], "k": qkv[1], "v": qkv[2], "dout": qkv[3], "cu": cu, "max_seqlen": max(lengths),
            "table": table, "lut": lut, "modality": modality, "position": position, "lengths": lengths}


def flops(pack: dict) -> float:
    """Useful FLOPs of forward + backward (QKᵀ, PV; five matmuls backward)."""
    return 3.5 * 4.0 * sum(n * n for n in pack["lengths"]) * HEAD_DIM * HEADS


@contextmanager
def backend(name: str):
    old = os.environ.get("OMNI_BACKEND")
    os.environ["OMNI_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMNI_BACKEND")
        else:
            os.environ["OMNI_BACKEND"] = old


def step(pack: dict) -> float:
    """One forward + backward of ``ops.varlen_attention`` on the pack; returns seconds."""
    q, k, v, table = (pack[n].detach().requires_grad_() for n in ("q", "k", "v", "table"))
    start = time.perf_counter()
    out = ops.varlen_attention(q, k, v, pack["cu"], pack["max_seqlen"], bias_table=table, bias_lut=pack["lut"],
                               modality=pack["modality"], position=pack["position"])
    out.backward(pack["dout"])
    return time.perf_counter() - start


def run_pack(name: str, pairs: int, repeats: int, dtype: torch.dtype) -> dict:
    pack = make_pack(name, pairs, dtype)
    times: dict[str, list[float]] = {"native": [], "reference": []}
    for b in times:  # warm-up: allocator, layout memo, BLAS
        with backend(b):
            step(pack)
    for _ in range(repeats):
        for b in times:
            with backend(b):
                times[b].append(step(pack))
    native_s, ref_s = statistics.median(times["native"]), statistics.median(times["reference"])
    work = flops(pack)
    return {"pack": name, "sequences": len(pack["lengths"]), "tokens": int(pack["cu"][-1]),
            "max_len": pack["max_seqlen"], "dtype": str(dtype).removeprefix("torch."),
            "native_s": round(native_s, 4), "reference_s": round(ref_s, 4),
            "native_gflops": round(work / native_s / 1e9, 1), "reference_gflops": round(work / ref_s / 1e9, 1),
            "speedup": round(ref_s / native_s, 3)}


def machine() -> dict:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernel": native_attention.capability(),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="native_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--packs", nargs="+", choices=PACKS, default=list(PACKS))
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    prec = resolve_precision(args.precision, "cpu")
    dtype = prec.dtype or torch.float32
    rows = [run_pack(name, args.pairs, args.repeats, dtype) for name in args.packs]
    if args.json:
        print(json.dumps({"machine": machine(), "precision": prec.description, "results": rows}, indent=2))
        return 0
    print(f"machine: {machine()}  precision: {prec.description}")
    print(f"{'pack':<8}{'seqs':>6}{'tokens':>8}{'native s':>10}{'ref s':>9}{'native GF/s':>13}{'ref GF/s':>10}"
          f"{'speedup':>9}")
    for r in rows:
        print(f"{r['pack']:<8}{r['sequences']:>6}{r['tokens']:>8}{r['native_s']:>10.3f}{r['reference_s']:>9.3f}"
              f"{r['native_gflops']:>13.1f}{r['reference_gflops']:>10.1f}{r['speedup']:>8.2f}x")
    return 0


# pytest-benchmark suite (``make bench``): 16 pairs per pack, so a run stays short.
@pytest.mark.parametrize("pack_name", PACKS, ids=[f"pack={p}" for p in PACKS])
@pytest.mark.parametrize("name", ["native", "reference"])
def test_fwd_bwd(benchmark, pack_name, name):
    pack = make_pack(pack_name, pairs=16)
    benchmark.extra_info["gflop"] = round(flops(pack) / 1e9, 3)
    with backend(name):
        benchmark.pedantic(step, args=(pack,), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    raise SystemExit(main())
