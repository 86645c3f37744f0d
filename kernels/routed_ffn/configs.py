"""
Routed FFN, tile configs, autotuning and the launch helper
==========================================================

Tile configs are ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``. Every one is
compiled ahead of time by :func:`aot_configs` for the architectures it is meant for and
checked by ``benchmarks/kernel_report.py`` (no spills, HMMA on sm_80, HGMMA on sm_90).

* A100 (sm_80, 164 KB shared memory): 128x128 tiles with BK = 32 over 3-4 stages.
* H100 (sm_90, 228 KB): the warpgroup MMA wants wide tiles and deep K slices: 128x256x64
  over 3 stages (the Triton Hopper tutorials' GEMM shape) and 128x128x64 over 4 for the
  one-accumulator GEMMs; where two fp32 accumulators share the registers (GEMM-1 with its
  gate and its GeGLU + LN-statistics epilogue, the paired dw_in/dw_gate) the largest tiles
  that stay spill-free. On sm_90 autotuning chooses among the Hopper and the A100 configs;
  on sm_80 among the A100 ones only (the Hopper tiles need more shared memory than it has).
* fp32 runs the IEEE FMA dot (no TF32, to meet fp32 accuracy): short K slices, both archs.

``GROUP_M`` (the raster of ``fwd.raster``) is 8 row tiles, the Triton matmul tutorial's value.
"""

from __future__ import annotations

import torch
import triton
from omni_core.kernels import layer_norm as ln_kernels
from omni_core.kernels._aot import AotConfig
from omni_core.kernels.layer_norm import interpreting
from omni_core.kernels.routed_ffn.bwd import hidden_bwd_kernel, wgrad_kernel
from omni_core.kernels.routed_ffn.fwd import ffn_in_kernel, grouped_mm_kernel

Config = tuple[int, int, int, int, int]
GROUP_M = 8

GEMM_A100: list[Config] = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)]
GEMM_H100: list[Config] = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4)]
# GEMM-1 holds two fp32 accumulators (U and the gate G) and its epilogue the GeGLU and the
# LN statistics: 128x128 spills on both archs, so its tiles hold half as many outputs.
GEMM1_A100: list[Config] = [(128, 64, 32, 8, 3), (64, 64, 64, 4, 3)]
GEMM1_H100: list[Config] = [(128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 8, 3)]
# The paired weight gradient (dw_in and dw_gate, two accumulators, a plain epilogue).
WGRAD2_A100: list[Config] = [(128, 64, 32, 4, 3), (64, 64, 64, 4, 3)]
WGRAD2_H100: list[Config] = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3)]
# dx = dU w_in^T + dG w_gate^T streams two A and two B tiles a stage: the one-product H100
# tiles would need 262-295 KB of shared memory (H100: 228 KB), so its stages hold less.
PAIR_H100: list[Config] = [(128, 128, 64, 8, 3), (128, 256, 32, 8, 3)]
FP32: list[Config] = [(64, 64, 16, 4, 3), (64, 128, 16, 8, 2)]
# (A100 configs, H100 configs) of each GEMM kind.
KINDS = {"one": (GEMM_A100, GEMM_H100), "pair": (GEMM_A100, PAIR_H100), "gemm1": (GEMM1_A100, GEMM1_H100),
         "wgrad2": (WGRAD2_A100, WGRAD2_H100)}
# Under the interpreter each program costs per op, not per element, so tiles are big; they stay
# smaller than the test shapes so the K loop, several row tiles and ragged edges all run.
INTERPRET_BLOCKS = (32, 64, 32)


def _capability() -> int:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90  # the traffic model (benchmarks/traffic.py) models an H100


def candidates(kind: str, dtype: torch.dtype) -> list[Config]:
    """The configs autotuning may choose for a GEMM kind (a key of ``KINDS``)."""
    if dtype == torch.float32:
        return FP32
    a100, h100 = KINDS[kind]
    return h100 + a100 if _capability() >= 90 else a100


def tuned(kernel: triton.JITFunction, kind: str, key: list[str]):
    """Autotune ``kernel`` over every config of its kind, pruned to the dtype and the GPU."""
    a100, h100 = KINDS[kind]
    every = {c: triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1], "BLOCK_K": c[2]},
                              num_warps=c[3], num_stages=c[4])
             for c in dict.fromkeys(h100 + a100 + FP32)}

    def prune(configs: list[triton.Config], named_args: dict, **_kwargs) -> list[triton.Config]:
        wanted = [every[c] for c in candidates(kind, named_args[kernel.arg_names[0]].dtype)]
        return [c for c in configs if any(c is w for w in wanted)]

    prune_by = {"early_config_prune": prune}
    return triton.autotune(configs=list(every.values()), key=key, prune_configs_by=prune_by)(kernel)


ffn_in_tuned = tuned(ffn_in_kernel, "gemm1", ["D", "F", "GATED", "LN_STATS"])
grouped_mm_tuned = tuned(grouped_mm_kernel, "one", ["N", "K", "GATHER_A", "SCATTER_C", "PAIR2", "LN_A"])
grouped_mm_pair_tuned = tuned(grouped_mm_kernel, "pair", ["N", "K", "GATHER_A", "SCATTER_C", "PAIR2", "LN_A"])
wgrad_tuned = tuned(wgrad_kernel, "one", ["P", "N", "GATHER_A", "GATHER_B"])
wgrad_pair_tuned = tuned(wgrad_kernel, "wgrad2", ["P", "N", "GATHER_A", "GATHER_B"])


def launch(tuned_kernel, kind: str, grid, *args, **flags) -> dict[str, int]:
    """Launch with the interpreter's fixed tile (the traffic model: the first config a GPU
    would try), or autotuned when compiled; returns the BLOCK_* the launch used.

    ``grid(BLOCK_M, BLOCK_N)`` gives the grid for a tile shape.
    """
    kernel = tuned_kernel.fn
    if interpreting() or ln_kernels.INTERPRET_AS_COMPILED:
        bm, bn, bk = INTERPRET_BLOCKS
        warps = 4
        if ln_kernels.INTERPRET_AS_COMPILED:
            bm, bn, bk, warps, _ = candidates(kind, args[0].dtype)[0]
        blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        kernel[grid(bm, bn)](*args, **flags, INTERPRET=True, **blocks, num_warps=warps)
        return blocks
    tuned_kernel[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **flags, INTERPRET=False)
    return {k: tuned_kernel.best_config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}


def hidden_blocks(F: int, compiled: bool = False) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps) of the hidden backward: 8 elements a thread per live
    array compiled (no spills); under the interpreter bigger row tiles and 32-column slices,
    so a test row of a few dozen units still runs several slices with a ragged last one."""
    if interpreting() and not compiled:
        return 16, 32, 4
    block_n = min(512, triton.next_power_of_2(F))
    return 2048 // block_n, block_n, 8


def prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Ahead-of-time configs for benchmarks/kernel_report.py: every autotune config x dtype x the
# architectures it is for, every specialisation the forward and backward launch, 4B shapes.
# ---------------------------------------------------------------------------------------------

_AOT_T, _AOT_D, _AOT_F = 32768, 1536, 6144
_GEMM_PTRS = ["A", "A2", "B", "B2", "Bias", "C", "LnW", "LnB"]
_GEMM_INTS = ["M", "N", "K", "stats_tiles", "stats_block"]


def _arch_configs(kind: str, dtype: str) -> list[tuple[Config, tuple[int, ...]]]:
    if dtype == "fp32":
        return [(c, (80, 90)) for c in FP32]
    a100, h100 = KINDS[kind]
    return [(c, (80, 90)) for c in a100] + [(c, (90,)) for c in h100]


def aot_configs() -> list[AotConfig]:
    T, D, F = _AOT_T, _AOT_D, _AOT_F
    configs = []
    for dtype, elem in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        ptr = f"*{dtype}"
        gemm = 2 * T * D * F
        no_ln = {"LN_A": False, "HAS_LN_BIAS": False}
        # (label, fn, kind, pointer args, fp32 pointer args, ints, float args, flags, FLOPs, bytes)
        variants = [
            ("ffn_in_geglu", ffn_in_kernel, "gemm1", ["X", "W_in", "W_gate", "B_in", "U", "G", "H"], ["Stats"],
             ["M", "D", "F", "stats_tiles"], [], {"GATED": True, "HAS_BIAS": False, "LN_STATS": True},
             2 * gemm, elem * (T * D + 2 * D * F + 3 * T * F)),
            ("ffn_in_gelu", ffn_in_kernel, "gemm1", ["X", "W_in", "W_gate", "B_in", "U", "G", "H"], ["Stats"],
             ["M", "D", "F", "stats_tiles"], [], {"GATED": False, "HAS_BIAS": True, "LN_STATS": False},
             gemm, elem * (T * D + D * F + 2 * T * F)),
            ("ffn_out_ln", grouped_mm_kernel, "one", _GEMM_PTRS, ["Stats", "Mean", "Rstd"], _GEMM_INTS, ["eps"],
             {"GATHER_A": False, "SCATTER_C": True, "PAIR2": False, "HAS_BIAS": True, "TRANS_B": False,
              "LN_A": True, "HAS_LN_BIAS": True},
             gemm, elem * (T * F + F * D + T * D)),
            ("bwd_dhn", grouped_mm_kernel, "one", _GEMM_PTRS, ["Stats", "Mean", "Rstd"], _GEMM_INTS, ["eps"],
             {"GATHER_A": True, "SCATTER_C": False, "PAIR2": False, "HAS_BIAS": False, "TRANS_B": True, **no_ln},
             gemm, elem * (T * D + F * D + T * F)),
            ("bwd_dx", grouped_mm_kernel, "pair", _GEMM_PTRS, ["Stats", "Mean", "Rstd"], _GEMM_INTS, ["eps"],
             {"GATHER_A": False, "SCATTER_C": True, "PAIR2": True, "HAS_BIAS": False, "TRANS_B": True, **no_ln},
             2 * gemm, elem * (2 * T * F + 2 * F * D + T * D)),
            ("bwd_dw_out", wgrad_kernel, "one", ["A", "B", "B2", "DW", "DW2", "DB"], [], ["P", "N"], [],
             {"GATHER_A": False, "GATHER_B": True, "PAIR": False, "HAS_DB": True},
             gemm, elem * (T * F + T * D + F * D)),
            ("bwd_dw_in_gate", wgrad_kernel, "wgrad2", ["A", "B", "B2", "DW", "DW2", "DB"], [], ["P", "N"], [],
             {"GATHER_A": True, "GATHER_B": False, "PAIR": True, "HAS_DB": True},
             2 * gemm, elem * (T * D + 2 * T * F + 2 * D * F)),
        ]
        for label, fn, kind, ptrs, fp32_ptrs, ints, floats, flags, flops, nbytes in variants:
            for (bm, bn, bk, warps, stages), targets in _arch_configs(kind, dtype):
                constexprs = {**flags, "INTERPRET": False, "PREC": "ieee" if dtype == "fp32" else "tf32",
                              "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                if "GROUP_M" in fn.arg_names:
                    constexprs["GROUP_M"] = GROUP_M
                signature = {**dict.fromkeys(ptrs, ptr), **dict.fromkeys(fp32_ptrs, "*fp32"), "Perm": "*i32",
                             "Offsets": "*i32", **dict.fromkeys(ints, "i32"), **dict.fromkeys(floats, "fp32"),
                             **dict.fromkeys(constexprs, "constexpr")}
                signature = {name: signature[name] for name in fn.arg_names}
                configs.append(AotConfig(
                    kernel=f"routed_ffn_{label}", fn=fn, signature=signature, constexprs=constexprs,
                    num_warps=warps, num_stages=stages, dtype=dtype, flops=flops, min_bytes=nbytes,
                    label=f"BLOCK_M={bm} BLOCK_N={bn} BLOCK_K={bk} warps={warps} stages={stages}",
                    divisible_by_16=tuple(n for n in ints if n in ("D", "F", "N", "K", "P")),
                    extra={"targets": targets},
                ))
        for f in (F, 512):
            block_rows, block_n, warps = hidden_blocks(f, compiled=True)
            flags = {"GATED": True, "HAS_LN": True, "HAS_LN_BIAS": True, "BLOCK_ROWS": block_rows, "BLOCK_N": block_n}
            signature = {**dict.fromkeys(["U", "G", "DHN", "HN", "DU", "DG", "LnW", "LnB"], ptr),
                         **dict.fromkeys(["Mean", "Rstd", "RowC1", "RowC2", "PartW", "PartB"], "*fp32"),
                         "Offsets": "*i32", "M": "i32", "F": "i32", "rows_per_prog": "i32",
                         **dict.fromkeys(flags, "constexpr")}
            configs.append(AotConfig(
                kernel="routed_ffn_bwd_hidden", fn=hidden_bwd_kernel, signature=signature,
                constexprs=flags, num_warps=warps, num_stages=1, dtype=dtype,
                flops=30 * T * f, min_bytes=elem * 6 * T * f,
                label=f"F={f} BLOCK_ROWS={block_rows} BLOCK_N={block_n} warps={warps}",
                divisible_by_16=("F",),
            ))
    return configs
