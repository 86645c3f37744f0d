"""Varlen attention with a gathered relative-position bias, in Triton.

This implements :func:`omni_core.ops.varlen_attention` (see ``omni_core/ops/attention.py``
for the contract): packed ``q [Tq, H, Dh]`` split into sequences by ``cu_seqlens`` and
``k, v [Tk, Hk, Dh]`` split by ``cu_seqlens_k`` (the same pack for self-attention); query
sequence b attends only to key sequence b, optionally with the bottom-right causal mask
(row i sees key j iff ``j <= i + Lk - Lq``); query head h reads key head ``h // (H / Hk)``;
when a bias is given (self-attention only), the logit of query ``i`` and key ``j`` gets
``bias_table[bias_lut[m, pos[i], pos[j]], h]`` if both tokens carry modality ``m`` and
that LUT entry is ``>= 0``.

How it works
------------
* **Schedule.** Every program owns one (query block or key block, sequence, head). The
  grid is ``(cdiv(max_seqlen, BLOCK), B, H)``; a program whose block starts past the end of
  its sequence returns at once, and the inner loop runs only over the blocks of the same
  sequence, so no key block of another sequence is ever visited and no ``[T, T]`` mask exists.
  With ``causal`` the loops stop at (forward, dq) or start from (dk/dv) the diagonal block,
  so about half the blocks of a causal sequence are never visited.
* **Rows without keys** (an empty key sequence, causal rows with ``i + Lk - Lq < 0``) keep a
  running max of -inf; the kernel shifts them by 0 instead (exp2 stays 0, never NaN) and
  writes output 0 and lse -inf, as flash-attn. The backward reads lse -inf as +inf so their
  probabilities are 0.
* **Grouped-query heads.** The forward and dq programs read key head ``h // GROUP``. The
  dk/dv program owns one *key* head and loops over the GROUP query heads that share it,
  so the group's gradients are summed in registers, without atomics or a reduction pass.
* **Bias.** Gathered per tile: ``modality`` and ``position`` of the rows and columns index
  ``bias_lut``, whose entry indexes ``bias_table``. Neither ``[T, T]`` nor ``[H, L, L]`` is
  ever materialised.
* **Forward.** Online softmax in base 2 (``exp2`` is one instruction); the row
  log-sum-exp (base 2) is saved for the backward and returned (natural log) on request.
* **Backward.** ``delta = rowsum(dO * O)``, then two kernels that recompute the
  probabilities from the saved log-sum-exp: one per key block accumulates ``dk, dv`` over
  the query blocks, one per query block accumulates ``dq`` over the key blocks and the bias
  gradient. Neither needs atomics for ``dq, dk, dv``. When ``bias_table`` needs no gradient
  the bias-gradient code is compiled out (``BIAS_GRAD=False``) and no scratch is allocated.
* **Bias gradient, two modes.** ``fast`` (the default) adds each tile's ``dS`` into
  ``d bias_table`` with fp32 atomics: one pass, no scratch memory, but the summation order
  (and so the last bits of ``d bias_table``) changes from run to run. ``deterministic``
  reduces each tile over its distinct LUT entries, in increasing order, into a private
  partial row per query block (scratch ``[T // BLOCK_M + B + 1, NB, H]`` fp32), then sums
  the rows: bit-identical across runs, but a tile costs one pass per distinct entry it
  covers (a 1-D relative bias: up to BLOCK_M + BLOCK_N - 1; a 2-D image bias: hundreds).
  The default is ``fast`` because it costs nothing beyond the atomics, ``dq, dk, dv`` are
  deterministic in both modes, and the order noise in the small bias table is far below
  the fp16/bf16 rounding of the rest of the step. ``torch.use_deterministic_algorithms(True)``
  or ``OMNI_ATTN_BIAS_GRAD=deterministic`` selects ``deterministic``.
* **Head dims**: any multiple of 8 from 8 to 256, padded inside the kernel (masked loads and
  stores, no copies) to the next power of two, at least 16 (``tl.dot``'s minimum K). Why
  80 and 96 pad to 128 rather than split into 64+16 / 64+32 columns: a split needs two
  accumulators and two PV dots (plus two QK^T dots summed) per tile, which Triton compiles
  to two MMA chains with their own register tiles; the padded columns cost MMA issue slots
  (33-60% more tensor-core work on QK^T and PV) but no memory traffic, since the padding
  is masked at the load. The split trades those wasted MMA slots for more registers
  (which force smaller tiles without spills); which wins is a GPU measurement this
  project has not made yet (no GPU on the development machines), so the simpler padded
  kernel stays until ``benchmarks/bench_varlen_attention.py`` (which has D=80/96 rows) says
  otherwise.
* **Precision.** fp16/bf16 operands feed the tensor cores with fp32 accumulation; fp32
  uses IEEE fp32 dots on the CUDA cores (TF32 would miss fp32 accuracy), with small tiles.

The launcher checks only what it can without a host sync (ranks, dtypes, devices, head
dim, bias with cross-attention); the value checks (``cu_seqlens`` ends, LUT ranges) are
done by the callers :func:`omni_core.ops.varlen_attention` and :mod:`omni_core.compat`
before any launch.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from omni_core.kernels._aot import AotConfig

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 256
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # The interpreter's bf16 dot is wrong, so it multiplies in fp32 (the operands are
    # already rounded to the storage dtype, as on the GPU). fp32 inputs avoid TF32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even. Compiled code does that already; the
    interpreter truncates fp32 -> bf16 (about twice the error), so when interpreting the
    value is first rounded to a bf16-representable fp32 with integer ops."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _bias_tile(Table, Lut, mod_q, pos_q, mod_k, pos_k, h, H, P):
    """Bias of a tile from broadcastable row/column ids; returns (entry, bias) with
    entry = -1 where no bias applies (other modality, LUT entry -1, or padding)."""
    # int32 offsets (the launcher checks M*P*P and NB*H fit) keep register pressure low.
    entry = tl.load(Lut + (mod_q * P * P + pos_q * P + pos_k), mask=mod_q == mod_k, other=-1)
    bias = tl.load(Table + (entry * H + h), mask=entry >= 0, other=0.0)
    return entry, bias.to(tl.float32)


@triton.jit
def _seq_bounds(CuSeqQ, CuSeqK, b):
    """(query start, Lq, key start, Lk) of sequence b; starts as int64 for the base pointers."""
    q_start = tl.load(CuSeqQ + b)
    k_start = tl.load(CuSeqK + b)
    Lq = tl.load(CuSeqQ + b + 1) - q_start
    Lk = tl.load(CuSeqK + b + 1) - k_start
    return q_start.to(tl.int64), Lq, k_start.to(tl.int64), Lk


@triton.jit
def _key_end(q_block_end, Lq, Lk, CAUSAL: tl.constexpr):
    """One past the last key any query row below ``q_block_end`` may attend to: Lk, or
    with the bottom-right causal mask (row i sees key j iff j <= i + Lk - Lq) fewer."""
    if CAUSAL:
        return tl.maximum(tl.minimum(Lk, q_block_end + Lk - Lq), 0)
    else:
        return Lk


@triton.jit
def _allowed(rows, cols, Lq, Lk, CAUSAL: tl.constexpr):
    """[rows, cols] mask of (query, key) pairs that may attend (broadcast shapes)."""
    ok = (rows < Lq) & (cols < Lk)
    if CAUSAL:
        ok = ok & (cols <= rows + (Lk - Lq))
    return ok


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, CuSeqQ, CuSeqK, Table, Lut, Modality, Position,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    T, H, P, GROUP,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    qb = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, Lq, k_start, Lk = _seq_bounds(CuSeqQ, CuSeqK, b)
    if qb * BLOCK_M >= Lq:
        return  # this sequence has fewer query blocks than the longest one
    # Base pointers of this (sequence, head): the tile offsets below stay int32.
    hk = h // GROUP
    Q += q_start * stride_qt + h * stride_qh
    K += k_start * stride_kt + hk * stride_kh
    V += k_start * stride_vt + hk * stride_vh
    Out += q_start * stride_ot + h * stride_oh
    Lse += h.to(tl.int64) * T + q_start
    Modality += q_start  # the bias is self-attention only: key ids share these rows
    Position += q_start

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_BIAS:
        mod_m = tl.load(Modality + offs_m, mask=row_ok, other=-1)
        pos_m = tl.load(Position + offs_m, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, _key_end((qb + 1) * BLOCK_M, Lq, Lk, CAUSAL), BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        kT = tl.load(K + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, kT, UPCAST, IEEE) * qk_scale
        if HAS_BIAS:
            mod_n = tl.load(Modality + cols, mask=col_ok, other=-2)
            pos_n = tl.load(Position + cols, mask=col_ok, other=0)
            _, bias = _bias_tile(Table, Lut, mod_m[:, None], pos_m[:, None], mod_n[None, :],
                                 pos_n[None, :], h, H, P)
            s += bias * 1.4426950408889634
        s = tl.where(_allowed(offs_m[:, None], cols[None, :], Lq, Lk, CAUSAL), s, float("-inf"))
        # A row whose keys so far are all masked keeps m = -inf; shifting it by 0 instead
        # keeps exp2 at 0 (not NaN) until its first allowed key.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, UPCAST), v, UPCAST, IEEE)
        m_i = m_new

    # Rows without any allowed key (empty key sequence, causal rows before the first key)
    # output 0 with lse -inf, as flash-attn.
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(Out + offs_m[:, None] * stride_ot + offs_d[None, :],
             _cast(out, Out.dtype.element_ty, UPCAST), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + offs_m, tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("-inf")),
             mask=row_ok)


@triton.jit
def _load_lse(Lse, rows, row_ok):
    """Saved base-2 lse; rows without keys (-inf) become +inf so exp2(s - lse) is 0."""
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, CuSeqQ, CuSeqK, Table, Lut, Modality, Position,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, H, P, GROUP,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One key block of one key/value head: dv = sum P^T dO, dk = scale * sum dS^T q, over
    the query blocks of the sequence that can see it and over the GROUP query heads that
    share this key head (so grouped-query gradients are summed without atomics). Works on
    transposed tiles ([keys, queries]) so no transpose of P is needed. dk/dv share k/v
    strides (they are allocated like k and v)."""
    kb = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    q_start, Lq, k_start, Lk = _seq_bounds(CuSeqQ, CuSeqK, b)
    if kb * BLOCK_N >= Lk:
        return
    K += k_start * stride_kt + hk * stride_kh
    V += k_start * stride_vt + hk * stride_vh
    DK += k_start * stride_kt + hk * stride_kh
    DV += k_start * stride_vt + hk * stride_vh
    Q += q_start * stride_qt
    DO += q_start * stride_dot
    Lse += q_start
    Delta += q_start
    Modality += q_start
    Position += q_start

    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    col_ok = offs_n < Lk
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    if HAS_BIAS:
        mod_n = tl.load(Modality + offs_n, mask=col_ok, other=-2)
        pos_n = tl.load(Position + offs_n, mask=col_ok, other=0)
    # Causal: query row i sees key j iff i >= j - (Lk - Lq); earlier query blocks are skipped.
    first_row = 0
    if CAUSAL:
        first_row = tl.maximum(kb * BLOCK_N - (Lk - Lq), 0) // BLOCK_M * BLOCK_M

    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for start_m in range(first_row, Lq, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < Lq
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                         mask=q_mask, other=0.0)
            lse = _load_lse(Lse + h.to(tl.int64) * T, rows, row_ok)
            delta = tl.load(Delta + h.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
            sT = _dot(k, tl.trans(q), UPCAST, IEEE) * qk_scale  # [BLOCK_N, BLOCK_M]
            if HAS_BIAS:
                mod_m = tl.load(Modality + rows, mask=row_ok, other=-1)
                pos_m = tl.load(Position + rows, mask=row_ok, other=0)
                _, bias = _bias_tile(Table, Lut, mod_m[None, :], pos_m[None, :], mod_n[:, None],
                                     pos_n[:, None], h, H, P)
                sT += bias * 1.4426950408889634
            pT = tl.math.exp2(sT - lse[None, :])
            pT = tl.where(_allowed(rows[None, :], offs_n[:, None], Lq, Lk, CAUSAL), pT, 0.0)
            dv += _dot(_cast(pT, do.dtype, UPCAST), do, UPCAST, IEEE)
            dpT = _dot(v, tl.trans(do), UPCAST, IEEE)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(_cast(dsT, q.dtype, UPCAST), q, UPCAST, IEEE)

    dk *= sm_scale
    tl.store(DK + offs_n[:, None] * stride_kt + offs_d[None, :],
             _cast(dk, DK.dtype.element_ty, UPCAST), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_vt + offs_d[None, :],
             _cast(dv, DV.dtype.element_ty, UPCAST), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta, CuSeqQ, CuSeqK, Table, Lut, Modality, Position, DBias,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, H, P, GROUP, NB,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DETERMINISTIC: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One query block: dq = scale * sum_j dS k over the key blocks it may see, and (with
    BIAS_GRAD) the bias gradient dS summed per LUT entry. Fast mode: DBias is [NB, H]
    fp32, atomics. Deterministic mode: DBias is [rows, NB, H] fp32, one private row per
    query block (row = start // BLOCK_M + b + qb is unique per block), no atomics."""
    qb = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start, Lq, k_start, Lk = _seq_bounds(CuSeqQ, CuSeqK, b)
    if qb * BLOCK_M >= Lq:
        return
    hk = h // GROUP
    Q += q_start * stride_qt + h * stride_qh
    K += k_start * stride_kt + hk * stride_kh
    V += k_start * stride_vt + hk * stride_vh
    DO += q_start * stride_dot + h * stride_doh
    DQ += q_start * stride_qt + h * stride_qh
    Lse += h.to(tl.int64) * T + q_start
    Delta += h.to(tl.int64) * T + q_start
    Modality += q_start
    Position += q_start

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
    lse = _load_lse(Lse, offs_m, row_ok)
    delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
    if HAS_BIAS:
        mod_m = tl.load(Modality + offs_m, mask=row_ok, other=-1)
        pos_m = tl.load(Position + offs_m, mask=row_ok, other=0)
        if DETERMINISTIC:
            DBias += (q_start // BLOCK_M + b + qb) * NB * H

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, _key_end((qb + 1) * BLOCK_M, Lq, Lk, CAUSAL), BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        if HAS_BIAS:
            mod_n = tl.load(Modality + cols, mask=col_ok, other=-2)
            pos_n = tl.load(Position + cols, mask=col_ok, other=0)
            entry, bias = _bias_tile(Table, Lut, mod_m[:, None], pos_m[:, None], mod_n[None, :],
                                     pos_n[None, :], h, H, P)
            s += bias * 1.4426950408889634
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(_allowed(offs_m[:, None], cols[None, :], Lq, Lk, CAUSAL), p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype, UPCAST), k, UPCAST, IEEE)
        if BIAS_GRAD:
            if DETERMINISTIC:
                # Visit the tile's distinct entries in increasing order; padding and
                # unbiased pairs hold entry -1 (or NB) and are skipped.
                ent = tl.where(entry >= 0, entry, NB)
                e = tl.min(tl.min(ent, 1), 0)
                while e < NB:
                    hit = ent == e
                    part = tl.sum(tl.sum(tl.where(hit, ds, 0.0), 1), 0)
                    slot = DBias + e * H + h
                    tl.store(slot, tl.load(slot) + part)
                    tl.debug_barrier()  # the next tile's read-modify-write must see this store
                    ent = tl.where(hit, NB, ent)
                    e = tl.min(tl.min(ent, 1), 0)
            else:
                tl.atomic_add(DBias + entry.to(tl.int64) * H + h, ds, mask=entry >= 0, sem="relaxed")

    dq *= sm_scale
    tl.store(DQ + offs_m[:, None] * stride_qt + offs_d[None, :],
             _cast(dq, DQ.dtype.element_ty, UPCAST), mask=q_mask)


# ----------------------------------------------------------------------------- configs

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
FWD_CONFIGS = {
    ("half", 64): [(128, 64, 8, 2), (64, 64, 4, 2)],
    ("half", 128): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 128, 8, 2)],
    ("half", 256): [(64, 32, 8, 2)],
    ("fp32", 64): [(32, 32, 4, 1), (16, 32, 4, 1)],
    ("fp32", 128): [(16, 32, 4, 1)],
    ("fp32", 256): [(16, 16, 4, 1)],
}
DKDV_CONFIGS = {
    ("half", 64): [(64, 64, 4, 2)],
    ("half", 128): [(32, 64, 8, 2)],
    ("half", 256): [(32, 32, 8, 1)],
    ("fp32", 64): [(16, 64, 4, 1)],
    ("fp32", 128): [(16, 32, 8, 1)],
    ("fp32", 256): [(16, 16, 8, 1)],
}
DQ_CONFIGS = {
    ("half", 64): [(64, 64, 4, 2), (64, 32, 4, 2)],
    ("half", 128): [(64, 64, 8, 2), (128, 32, 8, 2)],
    ("half", 256): [(32, 32, 8, 1)],
    ("fp32", 64): [(32, 32, 4, 1), (16, 32, 4, 1)],
    ("fp32", 128): [(32, 32, 8, 1)],
    ("fp32", 256): [(16, 16, 4, 1)],
}
# The deterministic bias gradient's entry loop costs registers: its own spill-free list.
DQ_DETERMINISTIC_CONFIGS = {
    ("half", 64): [(64, 32, 4, 2)],
    ("half", 128): [(64, 64, 8, 2)],
    ("half", 256): [(32, 32, 8, 1)],
    ("fp32", 64): [(16, 32, 4, 1)],
    ("fp32", 128): [(32, 32, 8, 1)],
    ("fp32", 256): [(16, 16, 4, 1)],
}
# Under the interpreter: one config (autotuning needs a GPU timer), large blocks because
# the interpreter's cost is per block step.
INTERPRET_CONFIG = (64, 64, 4, 1)


def _d_pad(head_dim: int) -> int:
    """Padded head dim: a power of two (tl.arange, tl.dot) and at least 16 (tl.dot's K)."""
    return max(16, triton.next_power_of_2(head_dim))


def _tier(head_dim: int, dtype: str) -> tuple[str, int]:
    return ("fp32" if dtype == "fp32" else "half", max(64, _d_pad(head_dim)))


def _autotuned(fn, table: dict[tuple[str, int], list[tuple[int, int, int, int]]], **kwargs) -> dict:
    """One autotuner per (operand kind, head-dim tier); the interpreter gets its single config."""
    tuned = {}
    for tier, configs in table.items():
        if INTERPRET:
            configs = [INTERPRET_CONFIG]
        tuned[tier] = triton.autotune(
            [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bm, bn, w, st in configs], **kwargs)(fn)
    return tuned


_KEY = ["HEAD_DIM", "HAS_BIAS", "CAUSAL"]
_fwd = _autotuned(_fwd_kernel, FWD_CONFIGS, key=_KEY)
_bwd_dkdv = _autotuned(_bwd_dkdv_kernel, DKDV_CONFIGS, key=_KEY)
_bwd_dq = {
    False: _autotuned(_bwd_dq_kernel, DQ_CONFIGS, key=[*_KEY, "BIAS_GRAD"], reset_to_zero=["DBias"]),
    True: _autotuned(_bwd_dq_kernel, DQ_DETERMINISTIC_CONFIGS, key=_KEY, reset_to_zero=["DBias"]),
}


# ----------------------------------------------------------------------------- launchers


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
           cu_seqlens_k: torch.Tensor | None, bias: tuple[torch.Tensor | None, ...]) -> None:
    """Structural checks that need no host sync; raise before any launch."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, Dh], got shape {tuple(t.shape)}")
    shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if v.shape != k.shape or k.shape[2] != q.shape[2] or (cu_seqlens_k is None and k.shape[0] != q.shape[0]):
        raise ValueError(f"q, k, v shapes disagree: {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q, k, v shapes disagree: {shapes}: Hk={k.shape[1]} must divide H={q.shape[1]}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"varlen_attention_triton supports fp16, bf16, fp32 (all alike); got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    Dh = q.shape[2]
    if Dh % 8 or not 8 <= Dh <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {Dh} is not supported by the Triton kernel: it must be a multiple of 8 "
                         f"from 8 to {MAX_HEAD_DIM} (as flash-attn)")
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is not None and (cu.dtype != torch.int32 or cu.dim() != 1):
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_k is not None and cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens {tuple(cu_seqlens.shape)}, "
                         f"got {tuple(cu_seqlens_k.shape)}")
    given = [t for t in bias if t is not None]
    if given and cu_seqlens_k is not None:
        raise ValueError("the relative-position bias is a self-attention feature: it cannot be combined "
                         "with cu_seqlens_k (cross-attention)")
    if given and len(given) != 4:
        raise ValueError("the bias needs bias_table, bias_lut, modality and position together")
    if given and (given[1].numel() >= 2**31 or given[0].numel() >= 2**31):
        raise ValueError("bias_lut and bias_table must each hold fewer than 2**31 entries (int32 offsets)")
    extra = [cu_seqlens_k] if cu_seqlens_k is not None else []
    devices = {t.device for t in (q, k, v, cu_seqlens, *extra, *given)}
    if len(devices) > 1:
        raise ValueError(f"tensors are on different devices: {sorted(map(str, devices))}")
    device = q.device
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise ValueError(f"the Triton kernel needs CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel-written output (the tests swap in NaN-filled tensors so
    that an element the kernel fails to write shows up)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _bias_args(bias_table, bias_lut, modality, position, like: torch.Tensor):
    """Kernel bias arguments; dummies (never read) when there is no bias."""
    if bias_table is None:
        dummy_f = like.new_empty(1, dtype=torch.float32)
        dummy_i = like.new_empty(1, dtype=torch.int32)
        return dummy_f, dummy_i, dummy_i, dummy_i, 1, False
    return (bias_table.contiguous(), bias_lut.contiguous(), modality.to(torch.int32).contiguous(),
            position.contiguous(), bias_lut.shape[1], True)


def _launch_fwd(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, scale, causal, bias_table, bias_lut, modality,
                position):
    T, H, Dh = q.shape
    B = cu_seqlens.numel() - 1
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((H, T), torch.float32, q.device)
    if T == 0 or max_seqlen == 0:
        return out, lse
    table, lut, mod, pos, P, has_bias = _bias_args(bias_table, bias_lut, modality, position, q)

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), B, H)

    _fwd[_tier(Dh, DTYPES[q.dtype])][grid](
        q, k, v, out, lse, cu_seqlens, cu_seqlens_k, table, lut, mod, pos,
        scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        T, H, P, H // k.shape[1],
        HEAD_DIM=Dh, D_PAD=_d_pad(Dh), HAS_BIAS=has_bias, CAUSAL=causal,
        UPCAST=INTERPRET, IEEE=q.dtype == torch.float32,
    )
    return out, lse


def _launch_bwd(do, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, scale, causal,
                bias_table, bias_lut, modality, position, bias_grad, deterministic):
    T, H, Dh = q.shape
    B = cu_seqlens.numel() - 1
    do = do.contiguous()
    dq = _empty(q.shape, q.dtype, q.device)
    dk, dv = (_empty(k.shape, k.dtype, k.device) for _ in range(2))
    # delta_i = rowsum(dO_i * O_i): one elementwise pass, laid out [H, T] like the lse.
    delta = (do.float() * out.float()).sum(-1).transpose(0, 1).contiguous()
    table, lut, mod, pos, P, has_bias = _bias_args(bias_table, bias_lut, modality, position, q)
    bias_grad = has_bias and bias_grad
    NB = table.shape[0] if has_bias else 1
    tier = _tier(Dh, DTYPES[q.dtype])
    deterministic = bias_grad and deterministic
    if deterministic:
        # Row start // BLOCK_M + b + qb of each query block is below T // BLOCK_M + B + 1.
        configs = [INTERPRET_CONFIG] if INTERPRET else DQ_DETERMINISTIC_CONFIGS[tier]
        rows = T // min(c[0] for c in configs) + B + 1
        dbias_buf = torch.zeros((rows, NB, H), dtype=torch.float32, device=q.device)
    else:
        dbias_buf = torch.zeros((NB if bias_grad else 1, H), dtype=torch.float32, device=q.device)
    common = dict(HEAD_DIM=Dh, D_PAD=_d_pad(Dh), HAS_BIAS=has_bias, CAUSAL=causal, UPCAST=INTERPRET,
                  IEEE=q.dtype == torch.float32)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    group = H // k.shape[1]
    if k.shape[0] > 0 and max_seqlen_k > 0:
        _bwd_dkdv[tier][lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), B, k.shape[1])](
            q, k, v, do, dk, dv, lse, delta, cu_seqlens, cu_seqlens_k, table, lut, mod, pos,
            scale * LOG2E, scale, *strides, T, H, P, group, **common,
        )
    if T > 0 and max_seqlen > 0:
        _bwd_dq[deterministic][tier][lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), B, H)](
            q, k, v, do, dq, lse, delta, cu_seqlens, cu_seqlens_k, table, lut, mod, pos, dbias_buf,
            scale * LOG2E, scale, *strides, T, H, P, group, NB, BIAS_GRAD=bias_grad,
            DETERMINISTIC=deterministic, **common,
        )
    if not bias_grad:
        return dq, dk, dv, q.new_empty(0)
    dbias = dbias_buf.sum(0) if deterministic else dbias_buf
    return dq, dk, dv, dbias.to(bias_table.dtype)


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("omni_core::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen: int, max_seqlen_k: int, softmax_scale: float, causal: bool, bias_table: torch.Tensor | None,
    bias_lut: torch.Tensor | None, modality: torch.Tensor | None, position: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out [T, H, Dh], lse [H, T] fp32, base 2)."""
    return _launch_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens_k, max_seqlen,
                       softmax_scale, causal, bias_table, bias_lut, modality, position)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, softmax_scale, causal, bias_table, bias_lut,
      modality, position):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("omni_core::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, bias_table: torch.Tensor | None, bias_lut: torch.Tensor | None,
    modality: torch.Tensor | None, position: torch.Tensor | None, bias_grad: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv, d bias_table); d bias_table is empty without a bias or when
    ``bias_grad`` is off (bias_table needs no gradient: the bias-gradient work is skipped)."""
    return _launch_bwd(do, q.contiguous(), k.contiguous(), v.contiguous(), out, lse, cu_seqlens, cu_seqlens_k,
                       max_seqlen, max_seqlen_k, softmax_scale, causal, bias_table, bias_lut, modality, position,
                       bias_grad, deterministic)


@_varlen_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, softmax_scale, causal,
      bias_table, bias_lut, modality, position, bias_grad, deterministic):
    dbias = torch.empty_like(bias_table) if bias_table is not None and bias_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, scale, causal, bias_table, bias_lut, modality,
     position) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cu_seqlens_k, bias_table, bias_lut, modality, position)
    ctx.max_seqlen, ctx.max_seqlen_k, ctx.scale, ctx.causal = max_seqlen, max_seqlen_k, scale, causal
    ctx.deterministic = bias_grad_mode() == "deterministic"  # chosen at the forward call


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, cu_seqlens_k, bias_table, bias_lut, modality, position = ctx.saved_tensors
    bias_grad = bias_table is not None and ctx.needs_input_grad[9]
    dq, dk, dv, dbias = _varlen_attention_backward_op(
        dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, ctx.max_seqlen, ctx.max_seqlen_k, ctx.scale,
        ctx.causal, bias_table, bias_lut, modality, position, bias_grad, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, (dbias if bias_grad else None), None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


_MODE_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("bias_grad_mode", default=None)


@contextlib.contextmanager
def bias_grad_mode_override(mode: str) -> Iterator[None]:
    """Calls made inside use ``mode`` for their bias gradient (flash-attn's
    ``deterministic=True``); the mode is fixed at the forward call, not at backward."""
    if mode not in ("fast", "deterministic"):
        raise ValueError(f"bias gradient mode {mode!r}: expected 'fast' or 'deterministic'")
    token = _MODE_OVERRIDE.set(mode)
    try:
        yield
    finally:
        _MODE_OVERRIDE.reset(token)


def bias_grad_mode() -> str:
    """The mode set by :func:`bias_grad_mode_override`, else ``"deterministic"`` when
    ``torch.use_deterministic_algorithms(True)`` is on or ``OMNI_ATTN_BIAS_GRAD=deterministic``;
    otherwise ``"fast"`` (atomics, the default)."""
    if _MODE_OVERRIDE.get() is not None:
        return _MODE_OVERRIDE.get()
    forced = os.environ.get("OMNI_ATTN_BIAS_GRAD", "").strip().lower()
    if forced not in ("", "fast", "deterministic"):
        raise ValueError(f"OMNI_ATTN_BIAS_GRAD={forced!r}: expected 'fast' or 'deterministic'")
    if forced:
        return forced
    return "deterministic" if torch.are_deterministic_algorithms_enabled() else "fast"


def varlen_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None,
    bias_table: torch.Tensor | None,
    bias_lut: torch.Tensor | None,
    modality: torch.Tensor | None,
    position: torch.Tensor | None,
    *,
    causal: bool = False,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The "triton" backend of :func:`omni_core.ops.varlen_attention` (same arguments, the
    first ten positional). Differentiable in q, k, v and ``bias_table``; one op for
    torch.compile. With ``return_lse`` also the natural-log LSE ``[H, T]`` fp32 (not
    differentiable, as flash-attn's)."""
    _check(q, k, v, cu_seqlens, cu_seqlens_k, (bias_table, bias_lut, modality, position))
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    elif max_seqlen_k is None:
        raise ValueError("max_seqlen_k is required with cu_seqlens_k")
    out, lse = _varlen_attention_op(q, k, v, cu_seqlens, cu_seqlens_k, int(max_seqlen), int(max_seqlen_k), scale,
                                    bool(causal), bias_table, bias_lut, modality, position)
    return (out, lse * LN2) if return_lse else out


varlen_attention_triton.modes = frozenset({"causal", "cross", "gqa", "lse"})


# ----------------------------------------------------------------------------- AOT report

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
    """Every autotune config x {fp16, bf16, fp32} x head dim: forward, dk/dv, and dq with
    each bias-gradient mode (``_det`` = deterministic), all with the bias on (its gather
    costs registers); plus the causal variants without a bias (the decoder case), labelled
    ``causal``."""
    configs: list[AotConfig] = []
    for dtype in ("fp16", "bf16", "fp32"):
        elem = 4 if dtype == "fp32" else 2
        for head_dim in AOT_HEAD_DIMS:
            kernels = (
                ("varlen_attention_fwd", _fwd_kernel, FWD_CONFIGS, {}, False),
                ("varlen_attention_bwd_dkdv", _bwd_dkdv_kernel, DKDV_CONFIGS, {}, True),
                ("varlen_attention_bwd_dq", _bwd_dq_kernel, DQ_CONFIGS, {"DETERMINISTIC": False}, True),
                ("varlen_attention_bwd_dq_det", _bwd_dq_kernel, DQ_DETERMINISTIC_CONFIGS,
                 {"DETERMINISTIC": True}, True),
            )
            for causal in (False, True):
                common = {"HEAD_DIM": head_dim, "D_PAD": _d_pad(head_dim), "HAS_BIAS": not causal,
                          "CAUSAL": causal, "UPCAST": False, "IEEE": dtype == "fp32"}
                for name, fn, tuned, extra_consts, backward in kernels:
                    if causal and name.endswith("_det"):
                        continue  # without a bias there is no bias gradient to make deterministic
                    extra = dict(extra_consts)
                    if fn is _bwd_dq_kernel:
                        extra["BIAS_GRAD"] = not causal
                    flops, nbytes = _reference_cost(head_dim, elem, backward, causal)
                    for bm, bn, warps, stages in tuned[_tier(head_dim, dtype)]:
                        consts = {**common, **extra, "BLOCK_M": bm, "BLOCK_N": bn}
                        configs.append(AotConfig(
                            kernel=name, fn=fn, signature=_signature(fn, dtype, consts), constexprs=consts,
                            num_warps=warps, num_stages=stages, dtype=dtype,
                            label=f"D={head_dim} BM={bm} BN={bn} w={warps} s={stages}"
                                  + (" causal" if causal else " bias"),
                            flops=flops, min_bytes=nbytes,
                            divisible_by_16=tuple(a for a in fn.arg_names if a.startswith("stride_")),
                        ))
    return configs


_FLOAT_ARGS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
_FP32_ARGS = {"Lse", "Delta", "Table", "DBias"}
_INT_PTR_ARGS = {"CuSeqQ", "CuSeqK", "Lut", "Modality", "Position"}
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
