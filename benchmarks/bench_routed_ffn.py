"""Routed FFN benchmarks: the Triton grouped GEMMs against torch baselines.

GPU (``--gpu``, or pytest: skipped without CUDA, never passed without it): TFLOP/s of the
forward and of forward + backward, ONE-PEACE's GeGLU + sub-LN FFN, three modalities, for

* ``triton``    — ``kernels/routed_ffn.py`` (one launch per GEMM for all modalities);
* ``loop``      — per-modality loop of cuBLAS GEMMs with torch GELU and LayerNorm
  (``routed_ffn_reference``: gather, one GEMM chain per modality, scatter);
* ``grouped_mm``— sort once, then ``torch.nn.functional.grouped_mm`` for the three GEMMs
  with torch GELU and LayerNorm, where that op exists (bf16 only);
* ``dense``     — one FFN over all tokens (no routing): the upper bound.

Shapes: ONE-PEACE 4B (D 1536, F 6144) at 8k–64k tokens, and a tiny model (D 192, F 512).
FLOPs count the three GEMMs only: forward ``6 T D F``, backward twice that. Next to the
measured TFLOP/s of ``triton`` the table prints the traffic model's prediction for the same
shapes on this GPU (``benchmarks/traffic.py``: the kernels counted under the interpreter in a
child process, carried to each shape, H100 or A100 roofline), so a first GPU run checks the model.

CPU (``--cpu``, the default without CUDA): the reference path (group tokens, one FFN per
modality) against the naive "run every modality's FFN on every token and mask",
side by side in one process, in ms and their ratio.

    python benchmarks/bench_routed_ffn.py --cpu [--repeats N]
    python benchmarks/bench_routed_ffn.py --gpu [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omni_core.ops import routed_ffn_reference

M = 3
GPU_SHAPES = [(t, 1536, 6144) for t in (8192, 16384, 32768, 65536)] + [(16384, 192, 512)]
CPU_SHAPES = [(4096, 192, 512), (2048, 384, 1536)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_problem(T: int, D: int, Fh: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random ONE-PEACE-style FFN weights; tokens split about 1:2:1 over the modalities."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    modality = torch.multinomial(torch.tensor([1.0, 2.0, 1.0]), T, replacement=True, generator=g)
    return {
        "x": rnd(T, D), "modality": modality.to(device),
        "w_in": rnd(M, D, Fh, scale=D**-0.5), "w_out": rnd(M, Fh, D, scale=Fh**-0.5),
        "w_gate": rnd(M, D, Fh, scale=D**-0.5),
        "ln_weight": 1.0 + rnd(M, Fh, scale=0.1), "ln_bias": rnd(M, Fh, scale=0.1),
    }


def ffn_flops(T: int, D: int, Fh: int) -> int:
    return 6 * T * D * Fh


# --------------------------------------------------------------------------------------------
# Implementations, all with the signature (x, modality, w_in, w_out, w_gate, ln_w, ln_b)
# --------------------------------------------------------------------------------------------


def _one_ffn(x, w_in, w_out, w_gate, ln_w, ln_b):
    h = F.gelu(x @ w_gate) * (x @ w_in)
    h = F.layer_norm(h, (h.shape[-1],), ln_w, ln_b, 1e-5)
    return h @ w_out


def impl_loop(x, modality, w_in, w_out, w_gate, ln_w, ln_b):
    return routed_ffn_reference(x, modality, w_in, w_out, w_gate=w_gate, ln_weight=ln_w, ln_bias=ln_b)


def impl_masked(x, modality, w_in, w_out, w_gate, ln_w, ln_b):
    """Naive: every modality's FFN on every token, keep the right one per token."""
    y = torch.zeros_like(x)
    for m in range(w_in.shape[0]):
        ym = _one_ffn(x, w_in[m], w_out[m], w_gate[m], ln_w[m], ln_b[m])
        y = torch.where((modality == m)[:, None], ym, y)
    return y


def impl_dense(x, modality, w_in, w_out, w_gate, ln_w, ln_b):
    """One FFN for every token: the same FLOPs as routing with no routing cost."""
    return _one_ffn(x, w_in[0], w_out[0], w_gate[0], ln_w[0], ln_b[0])


def impl_triton(x, modality, w_in, w_out, w_gate, ln_w, ln_b):
    from omni_core.kernels.routed_ffn import routed_ffn_triton

    return routed_ffn_triton(x, modality, w_in, w_out, None, None, w_gate, ln_w, ln_b, 1e-5)


def impl_grouped_mm(x, modality, w_in, w_out, w_gate, ln_w, ln_b):
    """Sort once, three ``grouped_mm`` calls over the jagged groups, per-row LN weights."""
    perm = torch.sort(modality, stable=True).indices
    ends = torch.cumsum(torch.bincount(modality, minlength=w_in.shape[0]), 0).to(torch.int32)
    xs = x[perm]
    ms = modality[perm]
    u = F.grouped_mm(xs, w_in, offs=ends)
    g = F.grouped_mm(xs, w_gate, offs=ends)
    h = F.layer_norm(F.gelu(g) * u, (u.shape[-1],), None, None, 1e-5) * ln_w[ms] + ln_b[ms]
    y = torch.empty_like(x)
    y[perm] = F.grouped_mm(h, w_out, offs=ends)
    return y


def grouped_mm_available(dtype: torch.dtype) -> bool:
    return hasattr(F, "grouped_mm") and dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


def _gpu_time_ms(fn: Callable[[], object]) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def gpu_rows(dtype: torch.dtype) -> list[dict]:
    impls = {"triton": impl_triton, "loop": impl_loop, "dense": impl_dense}
    if grouped_mm_available(dtype):
        impls["grouped_mm"] = impl_grouped_mm
    rows = []
    for T, D, Fh in GPU_SHAPES:
        p = make_problem(T, D, Fh, dtype, "cuda")
        weights = [p[k] for k in ("w_in", "w_out", "w_gate", "ln_weight", "ln_bias")]
        for name, impl in impls.items():
            leaves = [p["x"].clone().requires_grad_()] + [w.clone().requires_grad_() for w in weights]
            args = (leaves[0], p["modality"], *leaves[1:])
            dy = torch.randn_like(p["x"])

            def fwd(impl=impl, args=args):
                with torch.no_grad():
                    impl(*args)

            def fwd_bwd(impl=impl, args=args, leaves=leaves, dy=dy):
                torch.autograd.grad(impl(*args), leaves, dy)

            try:
                t_f, t_fb = _gpu_time_ms(fwd), _gpu_time_ms(fwd_bwd)
            except RuntimeError as err:  # grouped_mm's layout/arch limits: say so, no number
                if name != "grouped_mm":
                    raise
                print(f"grouped_mm unavailable at T={T} D={D} F={Fh}: {err}")
                continue
            flops = ffn_flops(T, D, Fh)
            rows.append({"impl": name, "T": T, "D": D, "F": Fh, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                         "fwd_tflops": flops / t_f * 1e-9, "fwd_bwd_tflops": 3 * flops / t_fb * 1e-9})
    return rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_routed_ffn_throughput(dtype):
    rows = gpu_rows(dtype)
    _print_gpu(rows, dtype)
    # The kernel must agree with the reference on the benchmark shape it was timed on.
    p = make_problem(8192, 1536, 6144, dtype, "cuda")
    args = (p["x"], p["modality"], p["w_in"], p["w_out"], p["w_gate"], p["ln_weight"], p["ln_bias"])
    ref = impl_loop(*(a.float() if a.is_floating_point() else a for a in args))
    out = impl_triton(*args).float()
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2


def model_tflops(shapes: list[tuple[int, int, int]], gpu: str) -> dict[tuple[int, int, int], tuple[float, float]]:
    """The traffic model's (forward, forward + backward) TFLOP/s of the Triton kernels on
    ``gpu`` ("h100" or "a100") for each (T, D, F): ``traffic.py --ffn-shape`` in a child
    process (the interpreter needs TRITON_INTERPRET=1 from its start; it runs on CPU)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(Path(__file__).with_name("traffic.py")), "--json",
           *(f"--ffn-shape={T}x{D}x{Fh}" for T, D, Fh in shapes)]
    rows = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
    ms: dict[tuple[int, int, int], dict[str, float]] = {}
    for r in rows:
        T, D, Fh = (int(part[1:]) for part in r["case"].split("-"))
        ms.setdefault((T, D, Fh), {})[r["kernel"]] = r[f"{gpu}_ms"]
    return {shape: (ffn_flops(*shape) / t["routed_ffn_fwd"] * 1e-9,
                    3 * ffn_flops(*shape) / (t["routed_ffn_fwd"] + t["routed_ffn_bwd"]) * 1e-9)
            for shape, t in ms.items()}


def _print_gpu(rows: list[dict], dtype: torch.dtype) -> None:
    name = torch.cuda.get_device_name()
    gpu = "a100" if "A100" in name else "h100"
    model = model_tflops(sorted({(r["T"], r["D"], r["F"]) for r in rows}), gpu)
    print(f"\nrouted FFN (GeGLU + sub-LN, M={M}), {dtype}, {name}; model: the traffic model's {gpu.upper()} "
          "roofline of the triton kernels (a model, not a measurement)")
    print(f"{'impl':>11} {'T':>6} {'D':>5} {'F':>5} {'fwd ms':>8} {'fwd TF/s':>9} {'model':>7} "
          f"{'f+b ms':>8} {'f+b TF/s':>9} {'model':>7}")
    for r in rows:
        m_fwd, m_fb = model[(r["T"], r["D"], r["F"])] if r["impl"] == "triton" else (float("nan"),) * 2
        print(f"{r['impl']:>11} {r['T']:>6} {r['D']:>5} {r['F']:>5} {r['fwd_ms']:>8.3f} {r['fwd_tflops']:>9.1f} "
              f"{m_fwd:>7.1f} {r['fwd_bwd_ms']:>8.3f} {r['fwd_bwd_tflops']:>9.1f} {m_fb:>7.1f}")


# --------------------------------------------------------------------------------------------
# CPU: reference (grouped) against naive (every FFN on every token, masked)
# --------------------------------------------------------------------------------------------


def _cpu_time_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cpu_rows(repeats: int) -> list[dict]:
    rows = []
    for T, D, Fh in CPU_SHAPES:
        p = make_problem(T, D, Fh, torch.float32, "cpu")
        args = (p["x"], p["modality"], p["w_in"], p["w_out"], p["w_gate"], p["ln_weight"], p["ln_bias"])
        with torch.no_grad():
            ref, naive = impl_loop(*args), impl_masked(*args)
            err = float((ref - naive).norm() / ref.norm())
            t_ref = _cpu_time_ms(lambda args=args: impl_loop(*args), repeats)
            t_naive = _cpu_time_ms(lambda args=args: impl_masked(*args), repeats)
        rows.append({"T": T, "D": D, "F": Fh, "reference_ms": t_ref, "naive_ms": t_naive,
                     "naive_over_reference": t_naive / t_ref, "max_rel_diff": err})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU TFLOP/s table (needs CUDA)")
    parser.add_argument("--cpu", action="store_true", help="reference vs naive masked, on CPU")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU; none is present")
        _print_gpu(gpu_rows(DTYPES[args.dtype]), DTYPES[args.dtype])
    if args.cpu or not args.gpu:
        print(f"routed FFN on CPU, fp32, GeGLU + sub-LN, M={M}, {torch.get_num_threads()} threads, "
              f"median of {args.repeats}")
        print(f"{'T':>6} {'D':>5} {'F':>5} {'reference ms':>13} {'naive ms':>10} {'naive/ref':>10} {'rel diff':>9}")
        for r in cpu_rows(args.repeats):
            print(f"{r['T']:>6} {r['D']:>5} {r['F']:>5} {r['reference_ms']:>13.1f} {r['naive_ms']:>10.1f} "
                  f"{r['naive_over_reference']:>10.2f} {r['max_rel_diff']:>9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
