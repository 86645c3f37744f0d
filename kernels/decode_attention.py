"""Decode attention over a KV cache in Triton: split-KV ("flash-decoding").

This implements :func:`omni_core.ops.attention_with_kvcache` (contract in
``omni_core/ops/kvcache.py``) once the new keys and values are in the cache: ``q [B, Lq,
H, Dh]`` against the first ``Lk = cache_seqlens[b] + Ln`` rows of ``k_cache, v_cache
[B, S, Hk, Dh]``, bottom-right causal when asked, grouped-query heads.

How it works
------------
* **Why split.** A decode step has few queries (Lq is 1 or a few) against a long cache: one
  program per (batch, head) would leave most of a GPU idle while each walks thousands of
  keys. The keys of each batch element are cut into ``NUM_SPLITS`` chunks, one program per
  chunk, each producing a partial output and its log-sum-exp; a second small kernel merges
  the chunks (``out = sum_s w_s o_s / sum_s w_s`` with ``w_s = 2^(lse_s - max lse)``).
* **Grouped-query rows.** A program owns one *key* head and stacks the ``G = H / Hk`` query
  heads that share it, times the Lq queries, as the rows of one tile (row ``r = i * G + g``),
  so a key tile is loaded once for the whole group and the dot has at least 16 rows.
* **Chunks follow each sequence's length**, not the cache capacity: chunk ``s`` of batch
  element b covers ``[s * C, (s + 1) * C)`` with ``C = ceil(Lk_b / NUM_SPLITS)`` rounded up to
  a key block, so short sequences in a batch of long ones cost nothing extra, and no host
  read of ``cache_seqlens`` is needed. The causal bound cuts a chunk at the last key the
  tile's last query may see.
* **Empty chunks / rows** (a chunk past Lk, a row with no allowed key) keep lse -inf and
  weight 0 in the merge; a row with no key at all outputs 0 and lse -inf.
* **Precision.** fp16/bf16 dots accumulate in fp32; partial outputs are fp32; fp32 inputs
  use IEEE dots. Interpreter quirks (bf16 dot, bf16 rounding) are handled as in
  ``kernels/varlen_attention/``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from omni_core.kernels._aot import AotConfig
from omni_core.kernels.varlen_attention.common import (
    DTYPES,
    INTERPRET,
    LOG2E,
    MAX_HEAD_DIM,
    _cast,
    _d_pad,
    _dot,
    _online_softmax_update,
)


@triton.jit
def _split_kernel(
    Q, K, V, OutPart, LsePart, CacheSeqlens,
    qk_scale,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    B, H, Lq, NEW, GROUP, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One (key chunk, batch element x key head, row block): partial softmax numerators
    (fp32) and base-2 lse of its rows over its chunk. OutPart [splits, B, H, Lq, D_PAD],
    LsePart [splits, B, H, Lq]."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    mb = tl.program_id(2)
    Hk = H // GROUP
    b = bh // Hk
    hk = bh % Hk
    Lk = tl.load(CacheSeqlens + b) + NEW

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq * GROUP
    i = rows // GROUP  # query position
    h = hk * GROUP + rows % GROUP  # query head
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + i[:, None] * stride_ql + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    K += b.to(tl.int64) * stride_kb + hk * stride_kh
    V += b.to(tl.int64) * stride_vb + hk * stride_vh

    chunk = tl.cdiv(tl.cdiv(Lk, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, Lk)
    if CAUSAL:
        last_i = tl.minimum((mb * BLOCK_M + BLOCK_M - 1) // GROUP, Lq - 1)
        hi = tl.minimum(hi, last_i + 1 + Lk - Lq)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        kT = tl.load(K + cols[None, :].to(tl.int64) * stride_ks + offs_d[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(V + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, kT, UPCAST, IEEE) * qk_scale
        ok = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= i[:, None] + (Lk - Lq))
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_update(s, v, m_i, l_i, acc, UPCAST, IEEE)

    has_key = l_i > 0.0
    part = ((split * B + b) * H + h).to(tl.int64) * Lq + i  # (split, b, h, i) row of the partials
    tl.store(OutPart + part[:, None] * D_PAD + offs_d[None, :], acc / tl.where(has_key, l_i, 1.0)[:, None],
             mask=row_ok[:, None])
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
    tl.store(LsePart + part, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ob, stride_ol, stride_oh,
    B, H, Lq, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (b, h, i) row: merge the chunks' partials. Lse [B, H, Lq] natural log."""
    row = tl.program_id(0)  # (b * H + h) * Lq + i
    i = row % Lq
    bh = row // Lq
    b = bh // H
    h = bh % H
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    stride_split = B * H * Lq
    lse = tl.load(LsePart + splits.to(tl.int64) * stride_split + row, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_use)  # 0 for empty chunks
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, D_PAD)
    parts = tl.load(OutPart + (splits[:, None].to(tl.int64) * stride_split + row) * D_PAD + offs_d[None, :],
                    mask=split_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + i * stride_ol + h * stride_oh + offs_d,
             _cast(out, Out.dtype.element_ty, UPCAST), mask=offs_d < HEAD_DIM)
    log2_total = m_use + tl.math.log2(tl.where(total > 0.0, total, 1.0))
    lse_out = tl.where(total > 0.0, log2_total * 0.6931471805599453, float("-inf"))  # natural log
    tl.store(Lse + row, lse_out)


# ----------------------------------------------------------------------------- configs

# (BLOCK_N, num_warps, num_stages) by operand kind and padded head-dim tier; BLOCK_M is set
# by the number of stacked rows (G * Lq, at least 16, at most 64). With 16 rows the dots
# are HMMA (mma.sync) on sm_90 too: warpgroup MMA (HGMMA) needs 64 rows per warpgroup, and
# padding a decode tile to 64 rows would quadruple its MMA work for nothing, since a decode
# step is bound by reading the cache; 64-row tiles (G * Lq > 32) get HGMMA. fp32 tiles stay
# at 16 rows and small key blocks (IEEE dots on the CUDA cores keep operands in registers);
# fp32 at D 128/256 needs 8 warps to spread them: with 4 warps (BLOCK_N 16) ptxas spilled 16
# bytes on sm_80 at D 128, and (16, 8, 1) spilled on sm_90 at D 256; (32, 8, 1) spills on neither.
SPLIT_CONFIGS = {
    ("half", 64): (64, 4, 2),
    ("half", 128): (64, 4, 2),
    ("half", 256): (32, 8, 2),
    ("fp32", 64): (32, 4, 1),
    ("fp32", 128): (32, 8, 1),
    ("fp32", 256): (32, 8, 1),
}
INTERPRET_BLOCK_N = 64
MAX_SPLITS = 64
TARGET_PROGRAMS = 264  # about two waves on a 132-SM H100


def _tier(head_dim: int, dtype: torch.dtype) -> tuple[str, int]:
    return ("fp32" if dtype == torch.float32 else "half", max(64, _d_pad(head_dim)))


def _block_m(rows: int, dtype: torch.dtype) -> int:
    """Stacked query rows per tile: at least 16 (tl.dot), at most 64, and 16 for fp32, whose
    IEEE dots keep their operands in registers (64-row fp32 tiles spill)."""
    return min(16 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(rows)))


def num_splits_for(B: int, Hk: int, row_blocks: int, S: int, block_n: int) -> int:
    """Enough chunks for about two waves of programs, each chunk at least 4 key blocks."""
    programs = B * Hk * row_blocks
    by_work = max(1, S // (4 * block_n))
    return max(1, min(MAX_SPLITS, by_work, math.ceil(TARGET_PROGRAMS / programs)))


def _check(q, k_cache, v_cache, cache_seqlens) -> None:
    """Structural checks (no host sync), before any launch."""
    if q.dtype not in DTYPES:
        raise TypeError(f"decode attention supports fp16, bf16, fp32; got {q.dtype}")
    Dh = q.shape[3]
    if Dh % 8 or not 8 <= Dh <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {Dh} is not supported by the Triton kernel: it must be a multiple of 8 "
                         f"from 8 to {MAX_HEAD_DIM}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")
    device = q.device
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise ValueError(f"the Triton kernel needs CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel-written tensor (tests swap in NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, new: int, softmax_scale: float | None, causal: bool,
                            return_lse: bool, num_splits: int = 0):
    """The "triton" backend of :func:`omni_core.ops.attention_with_kvcache` (the new rows are
    already in the caches; ``new`` says how many). ``num_splits=0`` picks the split count."""
    _check(q, k_cache, v_cache, cache_seqlens)
    B, Lq, H, Dh = q.shape
    S, Hk = k_cache.shape[1], k_cache.shape[2]
    G = H // Hk
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(Dh)
    block_n, warps, stages = SPLIT_CONFIGS[_tier(Dh, q.dtype)]
    if INTERPRET:
        block_n, warps, stages = INTERPRET_BLOCK_N, 4, 1
    block_m = _block_m(G * Lq, q.dtype)
    row_blocks = triton.cdiv(G * Lq, block_m)
    splits = num_splits or num_splits_for(B, Hk, row_blocks, S, block_n)
    D_PAD = _d_pad(Dh)
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((B, H, Lq), torch.float32, q.device)
    if B * Lq * H == 0:
        return (out, lse) if return_lse else out
    out_part = _empty((splits, B, H, Lq, D_PAD), torch.float32, q.device)
    lse_part = _empty((splits, B, H, Lq), torch.float32, q.device)
    q_c = q if q.stride(3) == 1 else q.contiguous()
    flags = dict(UPCAST=INTERPRET, IEEE=q.dtype == torch.float32)
    _split_kernel[(splits, B * Hk, row_blocks)](
        q_c, k_cache, v_cache, out_part, lse_part, cache_seqlens, scale * LOG2E,
        *q_c.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        B, H, Lq, new, G, splits,
        HEAD_DIM=Dh, D_PAD=D_PAD, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, num_warps=warps,
        num_stages=stages, **flags,
    )
    _merge_kernel[(B * H * Lq,)](
        out_part, lse_part, out, lse, *out.stride()[:3], B, H, Lq, splits,
        HEAD_DIM=Dh, D_PAD=D_PAD, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), UPCAST=INTERPRET,
    )
    return (out, lse) if return_lse else out


decode_attention_triton.check = _check


# ----------------------------------------------------------------------------- AOT report


def _reference_cost(head_dim: int, elem: int) -> tuple[int, int]:
    """A decode step: B=8, H=32 query heads over Hk=8 key heads, one query, 8192 cached keys.
    FLOPs 4*B*H*S*Dh; bytes: the cache read once per key head (dominant), q and out."""
    B, H, Hk, S = 8, 32, 8, 8192
    return 4 * B * H * S * head_dim, 2 * B * S * Hk * head_dim * elem + 2 * B * H * head_dim * elem


def aot_configs() -> list[AotConfig]:
    """The split kernel per dtype x head dim, for GQA decode (G=4, Lq=1: BLOCK_M=16) and a
    wider row tile (64 rows: G*Lq up to 64, e.g. speculative decoding), causal."""
    configs = []
    for dtype, name in DTYPES.items():
        elem = 4 if name == "fp32" else 2
        for head_dim in (64, 80, 128, 256):
            block_n, warps, stages = SPLIT_CONFIGS[_tier(head_dim, dtype)]
            flops, nbytes = _reference_cost(head_dim, elem)
            for block_m in (16,) if name == "fp32" else (16, 64):
                consts = {"HEAD_DIM": head_dim, "D_PAD": _d_pad(head_dim), "BLOCK_M": block_m, "BLOCK_N": block_n,
                          "CAUSAL": True, "UPCAST": False, "IEEE": name == "fp32"}
                configs.append(AotConfig(
                    kernel="decode_attention_split", fn=_split_kernel,
                    signature=_signature(_split_kernel, name, consts), constexprs=consts, num_warps=warps,
                    num_stages=stages, dtype=name,
                    label=f"D={head_dim} BM={block_m} BN={block_n} w={warps} s={stages}", flops=flops,
                    min_bytes=nbytes,
                    divisible_by_16=tuple(a for a in _split_kernel.arg_names if a.startswith("stride_")),
                ))
    return configs


def _signature(fn, dtype: str, consts: dict) -> dict[str, str]:
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in ("Q", "K", "V", "Out"):
            sig[arg] = f"*{dtype}"
        elif arg in ("OutPart", "LsePart", "Lse"):
            sig[arg] = "*fp32"
        elif arg == "CacheSeqlens":
            sig[arg] = "*i32"
        elif arg == "qk_scale":
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    return sig
