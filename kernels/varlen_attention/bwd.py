"""
Varlen attention, backward kernels
==================================

A preprocess kernel computes ``delta = rowsum(dO * O)`` (fp32, ``[H, T]`` like the lse); the
gradients then recompute the probabilities from the saved base-2 log-sum-exp, on one of two
paths (``op.fused_backward`` picks: fused for long keys unless deterministic):

* **fused** (FlashAttention-2's): one program per key block accumulates ``dk,
  dv`` over the query blocks (and over the query heads of a grouped-query group) and adds
  each tile's ``dq`` into an fp32 scratch by atomics, and, when asked, the bias gradient
  into per-key-block private rows (``bias_grad.py``): 5 GEMMs per tile pair;
* **deterministic** (two kernels, no atomics at all): the same key-block kernel without the
  ``dq`` part, and one per query block that accumulates ``dq`` over the key blocks in order
  and the bias gradient into per-query-block rows: 7 GEMMs per tile pair, bit-repeatable.
"""

from __future__ import annotations

import triton
import triton.language as tl
from omni_core.kernels.varlen_attention.bias_grad import _accumulate_bias_grad, _claim_bias_grad_row
from omni_core.kernels.varlen_attention.common import (
    _allowed,
    _bias_tile,
    _cast,
    _dot,
    _key_end,
    _load_ids,
    _load_lse,
    _scheduled_tile,
    _seq_bounds,
)


@triton.jit
def _bwd_delta_kernel(
    Out, DO, Delta, stride_ot, stride_oh, stride_dot, stride_doh, T,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32, for BLOCK_T tokens of head h: the
    softmax backward's per-row shift (dS = P * (dP - delta)). Reads dO and O once and writes
    4 bytes per row, where torch's ``(dO.float() * O.float()).sum(-1)`` made fp32 copies."""
    tb = tl.program_id(0)
    h = tl.program_id(1)
    rows = (tb * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    row_ok = rows < T
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + h.to(tl.int64) * T + rows, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, CuSeqQ, CuSeqK, Table, Lut, Modality, Position, Order, CuSched,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, H, P, GROUP, B, SEARCH_STEPS, SEQLEN_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, LUT_FORM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One key block of one key/value head: dv = sum P^T dO, dk = scale * sum dS^T q, over
    the query blocks of the sequence that can see it and over the GROUP query heads that
    share this key head (so grouped-query gradients are summed without atomics). Works on
    transposed tiles ([keys, queries]) so no transpose of P is needed. dk/dv share k/v
    strides (they are allocated like k and v)."""
    b, kb = _scheduled_tile(Order, CuSched, B, SEARCH_STEPS, BLOCK_N)  # over the key sequences
    hk = tl.program_id(1)
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
        mod_n, pos_n = _load_ids(Modality, Position, offs_n, col_ok, -2)
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
                mod_m, pos_m = _load_ids(Modality, Position, rows, row_ok, -1)
                _, bias = _bias_tile(Table, Lut, mod_m[None, :], pos_m[None, :], mod_n[:, None],
                                     pos_n[:, None], h, H, P, LUT_FORM)
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
    Q, K, V, DO, DQ, Lse, Delta, CuSeqQ, CuSeqK, Table, Lut, Modality, Position, Order, CuSched, DBias,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, H, P, GROUP, NB, B, SEARCH_STEPS, SEQLEN_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, LUT_FORM: tl.constexpr, BIAS_GRAD: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One query block: dq = scale * sum_j dS k over the key blocks it may see, and (with
    BIAS_GRAD) the bias gradient: dS summed per LUT entry into this program's private row of
    DBias [programs, NB, H] fp32, no atomics (see ``bias_grad.py``)."""
    b, qb = _scheduled_tile(Order, CuSched, B, SEARCH_STEPS, BLOCK_M)
    h = tl.program_id(1)
    if BIAS_GRAD:
        DBias = _claim_bias_grad_row(DBias, h, 1, NB, H)
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
        mod_m, pos_m = _load_ids(Modality, Position, offs_m, row_ok, -1)

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, _key_end((qb + 1) * BLOCK_M, Lq, Lk, CAUSAL), BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Lk
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        if HAS_BIAS:
            mod_n, pos_n = _load_ids(Modality, Position, cols, col_ok, -2)
            entry, bias = _bias_tile(Table, Lut, mod_m[:, None], pos_m[:, None], mod_n[None, :],
                                     pos_n[None, :], h, H, P, LUT_FORM)
            s += bias * 1.4426950408889634
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(_allowed(offs_m[:, None], cols[None, :], Lq, Lk, CAUSAL), p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype, UPCAST), k, UPCAST, IEEE)
        if BIAS_GRAD:
            _accumulate_bias_grad(DBias, entry, ds, h, H, BLOCK_M, BLOCK_N)

    dq *= sm_scale
    tl.store(DQ + offs_m[:, None] * stride_qt + offs_d[None, :],
             _cast(dq, DQ.dtype.element_ty, UPCAST), mask=q_mask)


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, DO, DQAcc, DK, DV, Lse, Delta, CuSeqQ, CuSeqK, Table, Lut, Modality, Position, Order, CuSched, DBias,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    T, H, P, GROUP, NB, B, SEARCH_STEPS, SEQLEN_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, LUT_FORM: tl.constexpr, BIAS_GRAD: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """FlashAttention-2's backward in one kernel: one key block of one key/value head, as
    ``_bwd_dkdv_kernel``, also computes each tile's ``dq`` part ``scale * dS k`` and adds it
    into the fp32 scratch ``DQAcc`` (q's strides) by atomics: 5 GEMMs per tile pair where the
    two kernels take 7, and q, k, v, dO are read and the bias gathered once per tile pair, not
    twice. The atomic order varies between runs on a GPU, so ``dq`` is not bit-repeatable
    (``dk``, ``dv`` and the bias gradient are): the launcher takes the two-kernel path when
    asked to be deterministic.

    With BIAS_GRAD the bias gradient is reduced as in the dq kernel (``bias_grad.py``), into
    this program's private row of ``DBias`` (one per key block; the programs of the other key
    heads of the block write other head columns), so it still needs no atomic. Why here and not
    in a separate dq kernel: the fused tile already holds dS and the LUT entries; a dq kernel
    would recompute S and dP (2 of its 3 GEMMs) and read q, k, v, dO and the bias again for
    this sum (the traffic model: 7.24 MB, 0.87 GFLOP for the two-kernel backward of the
    stage-1 pack with ONE-PEACE's LUTs, fused with the gradient here 6.77 MB, 0.62 GFLOP)."""
    b, kb = _scheduled_tile(Order, CuSched, B, SEARCH_STEPS, BLOCK_N)  # over the key sequences
    hk = tl.program_id(1)
    if BIAS_GRAD:
        DBias = _claim_bias_grad_row(DBias, hk * GROUP, GROUP, NB, H)
    q_start, Lq, k_start, Lk = _seq_bounds(CuSeqQ, CuSeqK, b)
    if kb * BLOCK_N >= Lk:
        return
    K += k_start * stride_kt + hk * stride_kh
    V += k_start * stride_vt + hk * stride_vh
    DK += k_start * stride_kt + hk * stride_kh
    DV += k_start * stride_vt + hk * stride_vh
    Q += q_start * stride_qt
    DQAcc += q_start * stride_qt
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
        mod_n, pos_n = _load_ids(Modality, Position, offs_n, col_ok, -2)
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
            q_offs = h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]
            q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
            do = tl.load(DO + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                         mask=q_mask, other=0.0)
            lse = _load_lse(Lse + h.to(tl.int64) * T, rows, row_ok)
            delta = tl.load(Delta + h.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
            sT = _dot(k, tl.trans(q), UPCAST, IEEE) * qk_scale  # [BLOCK_N, BLOCK_M]
            if HAS_BIAS:
                mod_m, pos_m = _load_ids(Modality, Position, rows, row_ok, -1)
                entry, bias = _bias_tile(Table, Lut, mod_m[None, :], pos_m[None, :], mod_n[:, None],
                                         pos_n[:, None], h, H, P, LUT_FORM)
                sT += bias * 1.4426950408889634
            pT = tl.math.exp2(sT - lse[None, :])
            pT = tl.where(_allowed(rows[None, :], offs_n[:, None], Lq, Lk, CAUSAL), pT, 0.0)
            dv += _dot(_cast(pT, do.dtype, UPCAST), do, UPCAST, IEEE)
            dpT = _dot(v, tl.trans(do), UPCAST, IEEE)
            dsT = pT * (dpT - delta[None, :])
            ds_op = _cast(dsT, q.dtype, UPCAST)
            dk += _dot(ds_op, q, UPCAST, IEEE)
            dq = _dot(tl.trans(ds_op), k, UPCAST, IEEE) * sm_scale  # [BLOCK_M, D_PAD]
            tl.atomic_add(DQAcc + q_offs, dq, mask=q_mask, sem="relaxed")
            if BIAS_GRAD:
                # The transposed tile has the same diagonals (mirrored): the reduction is exact
                # for any LUT, so it is called with the roles of the block sizes swapped.
                _accumulate_bias_grad(DBias, entry, dsT, h, H, BLOCK_N, BLOCK_M)

    dk *= sm_scale
    tl.store(DK + offs_n[:, None] * stride_kt + offs_d[None, :],
             _cast(dk, DK.dtype.element_ty, UPCAST), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_vt + offs_d[None, :],
             _cast(dv, DV.dtype.element_ty, UPCAST), mask=kv_mask)
