"""
Varlen attention, forward kernel
================================

One program per (query block, sequence, head), the (block, sequence) pairs flattened
longest first (``common._scheduled_tile``): online softmax in base 2 over the key
blocks of its own sequence (stopping at the diagonal block when causal), the bias gathered
per tile; writes the output and the base-2 row log-sum-exp that the backward reuses.
"""

from __future__ import annotations

import triton
import triton.language as tl
from omni_core.kernels.varlen_attention.common import (
    _allowed,
    _bias_tile,
    _cast,
    _dot,
    _key_end,
    _load_ids,
    _online_softmax_update,
    _scheduled_tile,
    _seq_bounds,
)


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, CuSeqQ, CuSeqK, Table, Lut, Modality, Position, Order, CuSched,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    T, H, P, GROUP, B, SEARCH_STEPS, SEQLEN_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, LUT_FORM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    b, qb = _scheduled_tile(Order, CuSched, B, SEARCH_STEPS, BLOCK_M)
    h = tl.program_id(1)
    q_start, Lq, k_start, Lk = _seq_bounds(CuSeqQ, CuSeqK, b)
    if qb * BLOCK_M >= Lq:
        return  # a spare program of the schedule
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
        mod_m, pos_m = _load_ids(Modality, Position, offs_m, row_ok, -1)

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
            mod_n, pos_n = _load_ids(Modality, Position, cols, col_ok, -2)
            _, bias = _bias_tile(Table, Lut, mod_m[:, None], pos_m[:, None], mod_n[None, :],
                                 pos_n[None, :], h, H, P, LUT_FORM)
            s += bias * 1.4426950408889634
        s = tl.where(_allowed(offs_m[:, None], cols[None, :], Lq, Lk, CAUSAL), s, float("-inf"))
        m_i, l_i, acc = _online_softmax_update(s, v, m_i, l_i, acc, UPCAST, IEEE)

    # Rows without any allowed key (empty key sequence, causal rows before the first key)
    # output 0 with lse -inf, as flash-attn.
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(Out + offs_m[:, None] * stride_ot + offs_d[None, :],
             _cast(out, Out.dtype.element_ty, UPCAST), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + offs_m, tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("-inf")),
             mask=row_ok)
