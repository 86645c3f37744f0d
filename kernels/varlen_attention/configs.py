"""
Varlen attention, tile configs and autotuning
=============================================

Tile configs per operand kind and head-dim tier, one autotuner per tier (the interpreter
gets a single config), and the configs the static report compiles ahead of time.
"""

from __future__ import annotations

import torch
import triton
from omni_core.kernels._aot import AotConfig
from omni_core.kernels.varlen_attention.bwd import (
    _bwd_delta_kernel,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _bwd_fused_kernel,
)
from omni_core.kernels.varlen_attention.common import INTERPRET, _d_pad
from omni_core.kernels.varlen_attention.fwd import _fwd_kernel

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on a GPU, by operand kind
# and padded head dim tier (D_PAD <= 64, 128, 256). Every fp16/bf16 entry compiles to
# tensor-core code (HMMA on sm_80, HGMMA on sm_90) without spills; see
# ``python benchmarks/kernel_report.py --static --kernel varlen``. The dk/dv kernel's dots
# have BLOCK_N rows, so it needs BLOCK_N >= 64 for warpgroup MMA, the dq kernel
# BLOCK_M >= 64. fp32 runs IEEE dots on the CUDA cores (TF32 would miss fp32 accuracy);
# its operands stay in registers, so only small tiles avoid spills. Head dim 256 (fp16/bf16):
# the dk/dv accumulators alone are 2 x BLOCK_N x 256 fp32, so its backward tiles are 32 x 32,
# which sm_90 runs as HMMA (warpgroup MMA needs 64 rows): the 64-row tiles spill there.
# The dk/dv kernel's group loop (GQA) costs registers, hence BLOCK_M = 32 at D_PAD 128.
# Deeper software pipelining (num_stages 3-4: more K/V tiles in flight in shared memory while
# one is multiplied, what Hopper's bandwidth-latency product asks for on long key loops) is
# listed only where the tile still compiles without spills on both sm_80
# and sm_90 with the bias on: the forward at D_PAD 64, dk/dv at 32-row tiles, dq at 64 x 64
# with 8 warps and D_PAD 128 (64 x 128 forward tiles at D_PAD 128 spill 8 B on sm_90, the
# D_PAD 64 dq tiles 116-260 B on sm_80).
FWD_CONFIGS = {
    ("half", 64): [(128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
    ("half", 128): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 128, 8, 2)],
    ("half", 256): [(64, 32, 8, 2)],
    ("fp32", 64): [(32, 32, 4, 1), (16, 32, 4, 1)],
    ("fp32", 128): [(16, 32, 4, 1)],
    ("fp32", 256): [(16, 16, 4, 1)],
}
DKDV_CONFIGS = {
    ("half", 64): [(64, 64, 4, 2), (32, 64, 8, 3)],
    ("half", 128): [(32, 64, 8, 2), (32, 64, 8, 3)],
    ("half", 256): [(32, 32, 8, 1)],
    ("fp32", 64): [(16, 64, 4, 1)],
    ("fp32", 128): [(16, 32, 8, 1)],
    ("fp32", 256): [(16, 16, 8, 1)],
}
DQ_CONFIGS = {
    ("half", 64): [(64, 64, 4, 2), (64, 32, 4, 2)],
    ("half", 128): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3)],
    ("half", 256): [(32, 32, 8, 1)],
    ("fp32", 64): [(32, 32, 4, 1), (16, 32, 4, 1)],
    ("fp32", 128): [(32, 32, 8, 1)],
    ("fp32", 256): [(16, 16, 4, 1)],
}
# The bias gradient's skewed [BLOCK_M, W] tiles and [W, W] merge (W = 2 max(BLOCK_M, BLOCK_N),
# bias_grad.py) cost registers: 64-row tiles spill (2.7 KB at 64x32 on sm_80), so its list
# keeps 32 rows, which sm_90 runs as HMMA (warpgroup MMA needs 64).
DQ_BIAS_GRAD_CONFIGS = {
    ("half", 64): [(32, 32, 4, 2)],  # 32 x 64 spills 60 B at D=16 on sm_80
    ("half", 128): [(32, 32, 8, 1)],  # 32 x 64 spills 64 B on sm_80 at D 72-128 since rows are self-zeroed
    ("half", 256): [(32, 32, 8, 1)],
    ("fp32", 64): [(16, 32, 4, 1)],
    ("fp32", 128): [(16, 32, 8, 1)],
    ("fp32", 256): [(16, 16, 4, 1)],
}
# The fused backward (bwd.py): the dk/dv kernel's accumulators plus a [BLOCK_M, D_PAD] fp32 dq
# tile for the atomics cost registers, so its tiles are smaller than the two kernels' (chosen
# with the static report, bias on, sm_80 and sm_90): 64-row query tiles spill on sm_80 (92-304 B
# at D_PAD 64), so query tiles are 16-32 rows while the key tiles (the rows of 4 of the 5 dots)
# stay at 64 where they fit, which sm_90 runs as warpgroup MMA. With the bias gradient, the
# skewed [BLOCK_N, W] tiles and [W, W] merge of bias_grad.py take more: 16-32 rows. fp32 (the
# accuracy path, IEEE dots on CUDA cores) found no spill-free tile at D 256 (164 B on sm_80), at
# D 32 causal (24 B on sm_80) nor, with the bias gradient, at D 64 (88 B on sm_90).
FUSED_CONFIGS = {
    ("half", 64): [(32, 64, 8, 2), (32, 64, 8, 3)],
    ("half", 128): [(16, 64, 8, 2), (32, 32, 8, 2), (32, 32, 8, 3)],
    ("half", 256): [(16, 32, 8, 1), (16, 32, 8, 2)],
    ("fp32", 64): [(16, 16, 4, 1)],
    ("fp32", 128): [(16, 16, 8, 1)],
    ("fp32", 256): [(16, 16, 8, 1)],
}
# Hopper only (tried on sm_90 only, compiled for sm_90 only by the report): 64 query rows, so
# all five dots run as warpgroup MMA (HGMMA) without spills; on sm_80 they spill 92-304 B, and
# at D_PAD 128 they spill on sm_90 too (100-388 B).
FUSED_HOPPER_CONFIGS = {
    ("half", 64): [(64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2)],
}
FUSED_BIAS_GRAD_CONFIGS = {
    ("half", 64): [(16, 32, 8, 2)],  # 32 x 32 spills 16 B at D 32 on sm_80
    ("half", 128): [(16, 32, 8, 1)],
    ("half", 256): [(32, 16, 8, 1)],
    ("fp32", 64): [(16, 32, 8, 1)],
    ("fp32", 128): [(16, 32, 8, 1)],
    ("fp32", 256): [(16, 16, 8, 1)],
}
# The delta preprocess kernel's token rows per program, by D_PAD > 128: [BLOCK_T, D_PAD] of
# dO and O in registers (4 warps), no dot.
DELTA_BLOCK_T = {False: 64, True: 32}
# Under the interpreter: one config (autotuning needs a GPU timer), large blocks because
# the interpreter's cost is per block step.
INTERPRET_CONFIG = (64, 64, 4, 1)


def bias_grad_block(table: dict[tuple[str, int], list[tuple[int, int, int, int]]], tier: tuple[str, int],
                    index: int) -> int:
    """The block size (``index`` 0: BLOCK_M, 1: BLOCK_N) that sets the grid of a bias-gradient
    launch: its scratch has one row per program, allocated before the autotuner picks a config,
    so every config of a tier must share it."""
    if INTERPRET:
        return INTERPRET_CONFIG[index]
    blocks = {config[index] for config in table[tier]}
    if len(blocks) != 1:
        raise RuntimeError(f"bias-gradient configs of {tier} disagree on the scheduled block: {sorted(blocks)}")
    return blocks.pop()


def seqlen_bucket(max_seqlen: int) -> int:
    """The autotune key's length bucket: ``max_seqlen`` rounded up to a power of two, from 16 to 2**16."""
    return min(max(16, triton.next_power_of_2(max(int(max_seqlen), 1))), 1 << 16)


def _tier(head_dim: int, dtype: str) -> tuple[str, int]:
    return ("fp32" if dtype == "fp32" else "half", max(64, _d_pad(head_dim)))


def _on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _hopper_last(portable: int):
    """Autotuner pruning: the first ``portable`` configs everywhere, the rest on sm_90+ only."""
    def prune(candidates, named_args, **_):
        return candidates if _on_hopper() else candidates[:portable]
    return prune


def _autotuned(fn, table: dict[tuple[str, int], list[tuple[int, int, int, int]]],
               hopper: dict[tuple[str, int], list[tuple[int, int, int, int]]] | None = None, **kwargs) -> dict:
    """One autotuner per (operand kind, head-dim tier); the interpreter gets its single config.
    ``hopper`` configs are appended and pruned at launch time unless the device is sm_90+ (asked
    then, not at import, so importing never initialises CUDA)."""
    tuned = {}
    for tier, configs in table.items():
        extra = [] if INTERPRET else (hopper or {}).get(tier, [])
        if INTERPRET:
            configs = [INTERPRET_CONFIG]

        tuned[tier] = triton.autotune(
            [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bm, bn, w, st in [*configs, *extra]],
            prune_configs_by={"early_config_prune": _hopper_last(len(configs))} if extra else None, **kwargs)(fn)
    return tuned


# SEQLEN_BUCKET (the longest sequence's length, next power of two, see ``seqlen_bucket``) is in
# the key as N_CTX is in Triton's fused-attention tutorial: packs of short and of long
# sequences get their own tile choice, without re-tuning for every length.
_KEY = ["HEAD_DIM", "HAS_BIAS", "LUT_FORM", "CAUSAL", "SEQLEN_BUCKET"]
_fwd = _autotuned(_fwd_kernel, FWD_CONFIGS, key=_KEY)
_bwd_dkdv = _autotuned(_bwd_dkdv_kernel, DKDV_CONFIGS, key=_KEY)
# Keyed by whether the dq kernel also accumulates the bias gradient.
_bwd_dq = {
    False: _autotuned(_bwd_dq_kernel, DQ_CONFIGS, key=_KEY),
    True: _autotuned(_bwd_dq_kernel, DQ_BIAS_GRAD_CONFIGS, key=_KEY),  # it zeroes its DBias rows itself
}
# The fused backward accumulates into zeroed scratches, which every autotuning trial must find zeroed.
_bwd_fused = {
    False: _autotuned(_bwd_fused_kernel, FUSED_CONFIGS, FUSED_HOPPER_CONFIGS, key=_KEY, reset_to_zero=["DQAcc"]),
    True: _autotuned(_bwd_fused_kernel, FUSED_BIAS_GRAD_CONFIGS, key=_KEY, reset_to_zero=["DQAcc"]),
}



# Reference problem for FLOP / byte counts: a ONE-PEACE-like pack, 24 heads; the causal
# rows count the pairs a causal mask keeps (about half).
_REF_LENGTHS = [257] * 16 + [40] * 32 + [500] * 4
_REF_HEADS = 24
AOT_HEAD_DIMS = (16, 32, 64, 72, 80, 96, 128, 256)


def _reference_cost(head_dim: int, elem: int, backward: bool, causal: bool) -> tuple[int, int]:
    """FLOPs (2 per multiply-add) and minimum bytes moved (each operand read once, each
    result written once) of the reference problem."""
    T = sum(_REF_LENGTHS)
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in _REF_LENGTHS)
    fwd_flops = 4 * pairs * head_dim * _REF_HEADS  # QK^T and PV
    io = T * _REF_HEADS * head_dim * elem
    if not backward:
        return fwd_flops, 4 * io + T * _REF_HEADS * 4  # q k v in, out + lse out
    # recompute QK^T, plus dV, dP, dQ, dK: 5 matmuls over the pairs
    return 5 * fwd_flops // 2, 8 * io + 2 * T * _REF_HEADS * 4  # q k v o do in, dq dk dv out, lse delta


def aot_configs() -> list[AotConfig]:
    """Every autotune config x {fp16, bf16, fp32} x head dim: forward, dk/dv, dq, the fused
    backward, and dq and the fused backward with the bias gradient (``_bias_grad``), all with
    the bias on (compact relative LUT; its gather costs registers); plus the causal variants
    without a bias (the decoder case), labelled ``causal``."""
    configs: list[AotConfig] = []
    for dtype in ("fp16", "bf16", "fp32"):
        elem = 4 if dtype == "fp32" else 2
        for head_dim in AOT_HEAD_DIMS:
            no_grad, grad = {"BIAS_GRAD": False}, {"BIAS_GRAD": True}
            kernels = (  # (name, kernel, configs, constexprs, backward, targets)
                ("varlen_attention_fwd", _fwd_kernel, FWD_CONFIGS, {}, False, (80, 90)),
                ("varlen_attention_bwd_dkdv", _bwd_dkdv_kernel, DKDV_CONFIGS, {}, True, (80, 90)),
                ("varlen_attention_bwd_dq", _bwd_dq_kernel, DQ_CONFIGS, no_grad, True, (80, 90)),
                ("varlen_attention_bwd_dq_bias_grad", _bwd_dq_kernel, DQ_BIAS_GRAD_CONFIGS, grad, True, (80, 90)),
                ("varlen_attention_bwd_fused", _bwd_fused_kernel, FUSED_CONFIGS, no_grad, True, (80, 90)),
                ("varlen_attention_bwd_fused", _bwd_fused_kernel, FUSED_HOPPER_CONFIGS, no_grad, True, (90,)),
                ("varlen_attention_bwd_fused_bias_grad", _bwd_fused_kernel, FUSED_BIAS_GRAD_CONFIGS, grad, True,
                 (80, 90)),
            )
            for causal in (False, True):
                common = {"HEAD_DIM": head_dim, "D_PAD": _d_pad(head_dim), "HAS_BIAS": not causal,
                          "LUT_FORM": not causal, "CAUSAL": causal, "UPCAST": False, "IEEE": dtype == "fp32"}
                for name, fn, tuned, extra, backward, targets in kernels:
                    if causal and name.endswith("_bias_grad"):
                        continue  # without a bias there is no bias gradient
                    flops, nbytes = _reference_cost(head_dim, elem, backward, causal)
                    for bm, bn, warps, stages in tuned.get(_tier(head_dim, dtype), []):
                        consts = {**common, **extra, "BLOCK_M": bm, "BLOCK_N": bn}
                        configs.append(AotConfig(
                            kernel=name, fn=fn, signature=_signature(fn, dtype, consts), constexprs=consts,
                            num_warps=warps, num_stages=stages, dtype=dtype,
                            label=f"D={head_dim} BM={bm} BN={bn} w={warps} s={stages}"
                                  + (" causal" if causal else " bias") + (" sm_90 only" if targets == (90,) else ""),
                            flops=flops, min_bytes=nbytes,
                            divisible_by_16=tuple(a for a in fn.arg_names if a.startswith("stride_")),
                            extra={"targets": targets},
                        ))
        for head_dim in AOT_HEAD_DIMS:  # the delta preprocess: one config, no causal/bias variants
            block_t = DELTA_BLOCK_T[_d_pad(head_dim) > 128]
            consts = {"HEAD_DIM": head_dim, "D_PAD": _d_pad(head_dim), "BLOCK_T": block_t}
            rows = sum(_REF_LENGTHS) * _REF_HEADS
            configs.append(AotConfig(
                kernel="varlen_attention_bwd_delta", fn=_bwd_delta_kernel,
                signature=_signature(_bwd_delta_kernel, dtype, consts), constexprs=consts, num_warps=4,
                num_stages=1, dtype=dtype, label=f"D={head_dim} BT={block_t} w=4", flops=2 * rows * head_dim,
                min_bytes=rows * (2 * head_dim * elem + 4),
                divisible_by_16=tuple(a for a in _bwd_delta_kernel.arg_names if a.startswith("stride_")),
            ))
    return configs


_FLOAT_ARGS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
_FP32_ARGS = {"Lse", "Delta", "Table", "DBias", "DQAcc"}
_INT_PTR_ARGS = {"CuSeqQ", "CuSeqK", "Lut", "Modality", "Position", "Order", "CuSched"}
_FP32_SCALARS = {"qk_scale", "sm_scale"}


def _signature(fn, dtype: str, consts: dict) -> dict[str, str]:
    """Triton signature of ``fn`` for ``dtype`` storage (the table is fp32 here)."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _FLOAT_ARGS:
            sig[name] = f"*{dtype}"
        elif name in _FP32_ARGS:
            sig[name] = "*fp32"
        elif name in _INT_PTR_ARGS:
            sig[name] = "*i32"
        elif name in _FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig
