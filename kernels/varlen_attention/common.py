"""
Varlen attention, shared pieces
===============================

Constants, the one place the interpreter is detected, and the ``@triton.jit`` helpers that
the forward and backward kernels (and ``kernels/decode_attention.py``) share: sequence
bounds, causal masks, the bias gather, the online-softmax update, and the interpreter-safe
dot and cast.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The only interpreter switch of the attention kernels: under TRITON_INTERPRET=1 the kernels
# run on CPU tensors with fp32-upcast dots (UPCAST) and a single tile config.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 256
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _d_pad(head_dim: int) -> int:
    """Padded head dim: a power of two (tl.arange, tl.dot) and at least 16 (tl.dot's K)."""
    return max(16, triton.next_power_of_2(head_dim))


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


# Forms of ``bias_lut`` (the constexpr LUT_FORM of the kernels), told apart by its shape.
LUT_DENSE = 0  # [M, P, P]: (modality, query position, key position)
LUT_RELATIVE = 1  # [M, 2P-1]: (modality, key - query position + P - 1)
LUT_CLS_RELATIVE = 2  # [M, 2P+2]: relative between positions >= 1, three CLS entries for position 0


def lut_form(bias_lut: torch.Tensor) -> tuple[int, int]:
    """(LUT_FORM, P) of a LUT: 3-D is dense, 2-D of odd width relative, of even width the
    CLS-aware relative form."""
    if bias_lut.dim() == 3:
        return LUT_DENSE, bias_lut.shape[1]
    width = bias_lut.shape[1]
    return (LUT_RELATIVE, (width + 1) // 2) if width % 2 else (LUT_CLS_RELATIVE, (width - 2) // 2)


@triton.jit
def _bias_tile(Table, Lut, mod_q, pos_q, mod_k, pos_k, h, H, P, LUT_FORM: tl.constexpr):
    """Bias of a tile from broadcastable row/column ids; returns (entry, bias) with
    entry = -1 where no bias applies (other modality, LUT entry -1, or padding).

    The LUT is ``[M, P, P]`` indexed by (modality, query position, key position), the
    compact ``[M, 2P-1]`` indexed by (modality, key - query position + P - 1), or the
    CLS-aware compact ``[M, 2P+2]``: the relative column between positions >= 1 and, for
    position 0 (CLS), column 2P-1 (CLS query), 2P (CLS key) or 2P+1 (CLS-CLS), as BEiT's and
    ONE-PEACE's tables give CLS its own row, column and corner.
    Loads are masked to same-modality pairs, so a tile without one (text rows against image
    keys of a joint sequence) issues no LUT or table load. (A branch around the whole
    gather would skip the address math too, but it costs registers: the forward spilled.)"""
    # int32 offsets (the launcher checks the LUT and table sizes fit) keep register pressure low.
    if LUT_FORM == 0:
        offs = mod_q * P * P + pos_q * P + pos_k
    elif LUT_FORM == 1:
        offs = mod_q * (2 * P - 1) + (pos_k - pos_q + (P - 1))
    else:
        col = tl.where(pos_q == 0, tl.where(pos_k == 0, 2 * P + 1, 2 * P - 1),
                       tl.where(pos_k == 0, 2 * P, pos_k - pos_q + (P - 1)))
        offs = mod_q * (2 * P + 2) + col
    entry = tl.load(Lut + offs, mask=mod_q == mod_k, other=-1)
    bias = tl.load(Table + (entry * H + h), mask=entry >= 0, other=0.0)
    return entry, bias.to(tl.float32)


@triton.jit
def _scheduled_tile(Order, CuSched, B, SEARCH_STEPS, BLOCK: tl.constexpr):
    """(sequence, block) of this program in the flattened, longest-first schedule. Grid dim 0
    has ``T // BLOCK + B`` programs (T tokens, B sequences: no grid dimension is bounded by
    B, whose 65,536th sequence would not launch in dim 1). ``Order`` lists the sequences
    longest first and ``CuSched`` their token offsets in that order; sequence ``Order[i]``
    owns the programs from f(i) = CuSched[i] // BLOCK + i, at least as many as its blocks
    (f is strictly increasing), found by binary search; a spare program gets a block past
    its sequence's end and returns. Low program ids run first, so the long sequences start
    first and the short ones fill the tail."""
    p = tl.program_id(0)
    lo = B * 0  # invariant: f(lo) <= p < f(hi), f(B) = T // BLOCK + B
    hi = B
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        below = tl.load(CuSched + mid) // BLOCK + mid <= p
        lo, hi = tl.where(below, mid, lo), tl.where(below, hi, mid)
    return tl.load(Order + lo), p - (tl.load(CuSched + lo) // BLOCK + lo)


def schedule(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Device-side inputs of :func:`_scheduled_tile` for the sequences of ``cu_seqlens``
    (no host sync): (Order, CuSched, B, SEARCH_STEPS)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    order = torch.argsort(lengths, descending=True, stable=True)
    cu_sched = torch.zeros_like(cu_seqlens)
    torch.cumsum(lengths[order], 0, out=cu_sched[1:])
    B = lengths.numel()
    return order.to(torch.int32), cu_sched, B, B.bit_length()


def scheduled_programs(tokens: int, B: int, block: int) -> int:
    """Grid dim 0 of a scheduled launch: f(B) programs (see :func:`_scheduled_tile`)."""
    return tokens // block + B


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
def _load_ids(Modality, Position, offs, ok, missing):
    """Modality and position of the tokens ``offs`` of a sequence; tokens past its end get
    modality ``missing`` (rows -1, columns -2: they never match each other) and position 0."""
    mod = tl.load(Modality + offs, mask=ok, other=missing)
    pos = tl.load(Position + offs, mask=ok, other=0)
    return mod, pos


@triton.jit
def _load_lse(Lse, rows, row_ok):
    """Saved base-2 lse; rows without keys (-inf) become +inf so exp2(s - lse) is 0."""
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _online_softmax_update(s, v, m_i, l_i, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Fold one tile of base-2 scores ``s`` [M, N] (masked entries -inf) and its values ``v``
    [N, D] into the running max ``m_i``, sum ``l_i`` and output ``acc``. A row whose keys so far
    are all masked keeps m = -inf; shifting it by 0 instead keeps exp2 at 0 (not NaN) until its
    first allowed key."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, UPCAST), v, UPCAST, IEEE)
    return m_new, l_i, acc
