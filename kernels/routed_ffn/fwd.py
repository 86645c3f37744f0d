"""
Routed FFN, forward kernels
===========================

Two launches for all modalities (see ``__init__.py`` for the op and the plan):

1. ``ffn_in_kernel``: ``U = x[perm] @ w_in[m] + b_in[m]`` and ``G = x[perm] @ w_gate[m]``, the
   GeGLU / GELU epilogue writing ``H``, and with sub-LN each tile's LayerNorm statistics
   (the tile's mean and centred sum of squares, Chan et al.'s pairwise form) into a small
   ``[T, tiles, 2]`` fp32 buffer — so no separate LayerNorm pass ever reads H.
2. ``grouped_mm_kernel`` (shared with the backward): ``y[perm] = LN(H) @ w_out[m] + b_out[m]``
   where, with sub-LN, the A operand is normalised as it is loaded (the prologue merges the
   row's tile statistics first); HN never exists in the forward.

Every GEMM program maps its flat id to (modality, row tile, column tile) with
:func:`raster`: modality after modality, and inside a modality GROUP_M row tiles sweep the
column tiles together, so the A rows and the weight columns a wave of programs needs are
shared in L2 (the Triton matmul tutorial's grouped ordering, here per modality).
"""

from __future__ import annotations

import triton
import triton.language as tl
from omni_core.kernels.layer_norm import to_storage

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))


@triton.jit
def gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def mma(a, b, acc, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    if INTERPRET:  # the interpreter's bf16 dot is wrong: multiply the rounded values in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def raster(pid, Offsets, M, n_cols, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """Flat program id -> (modality, first row, end row, column tile).

    Modality m owns ``cdiv(rows_m, BLOCK_M) * n_cols`` consecutive ids; inside them, groups
    of GROUP_M row tiles walk the column tiles together (row tile fastest), so consecutive
    programs reuse A rows and weight columns. Ids past the last tile get an empty range.
    """
    zero = tl.load(Offsets) * 0
    grp, start, end, col, seen = zero, zero, zero, zero, zero
    for g in range(M):
        lo = tl.load(Offsets + g)
        hi = tl.load(Offsets + g + 1)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        local = pid - seen
        hit = (local >= 0) & (local < tiles * n_cols)
        width = GROUP_M * n_cols
        first = (local // width) * GROUP_M
        size = tl.maximum(tl.minimum(tiles - first, GROUP_M), 1)
        tile = first + (local % width) % size
        grp = tl.where(hit, g, grp)
        col = tl.where(hit, (local % width) // size, col)
        start = tl.where(hit, lo + tile * BLOCK_M, start)
        end = tl.where(hit, tl.minimum(hi, lo + (tile + 1) * BLOCK_M), end)
        seen += tiles * n_cols
    return grp, start, end, col


@triton.jit
def tile_rows(Perm, Offsets, M, n_cols, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (modality, grouped rows, row mask, perm[rows], column tile, live).

    Rows past the tile end are clamped to its first row and masked only at the store, so the
    K loop loads without a row mask (masked rows gather token 0); ``live`` is False for the
    spare programs of the grid.
    """
    m, start, end, col = raster(tl.program_id(0), Offsets, M, n_cols, BLOCK_M, GROUP_M)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    rows = tl.where(rmask, rows, start).to(tl.int64)
    tok = tl.load(Perm + rows, mask=rmask, other=0).to(tl.int64)
    return m, rows, rmask, tok, col, start < end


@triton.jit
def ffn_in_kernel(
    X, Perm, Offsets, W_in, W_gate, B_in, U, G, H, Stats, M, D, F, stats_tiles,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, LN_STATS: tl.constexpr,
    INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    n_cols = tl.cdiv(F, BLOCK_N)
    m, rows, rmask, tok, pid_n, live = tile_rows(Perm, Offsets, M, n_cols, BLOCK_M, GROUP_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = X + tok[:, None] * D + ks[None, :]  # gather through perm: no permuted copy of x
    w_ptrs = m.to(tl.int64) * D * F + ks[:, None] * F + (cols % F)[None, :]
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, tl.where(live, D, 0), BLOCK_K):
        kmask = ks < D - k0
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        acc_u = mma(a, tl.load(W_in + w_ptrs, mask=kmask[:, None], other=0.0), acc_u, INTERPRET, PREC)
        if GATED:
            acc_g = mma(a, tl.load(W_gate + w_ptrs, mask=kmask[:, None], other=0.0), acc_g, INTERPRET, PREC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * F
    if HAS_BIAS:
        acc_u += tl.load(B_in + m * F + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dtype = H.dtype.element_ty
    # The activation reads the rounded U/G, exactly what the backward will recompute it from.
    u = to_storage(acc_u, dtype)
    offs = rows[:, None] * F + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    tl.store(U + offs, u, mask=omask)
    if GATED:
        g = to_storage(acc_g, dtype)
        tl.store(G + offs, g, mask=omask)
        h = to_storage(gelu(g.to(tl.float32)) * u.to(tl.float32), dtype)
    else:
        h = to_storage(gelu(u.to(tl.float32)), dtype)
    tl.store(H + offs, h, mask=omask)
    if LN_STATS:
        # This tile's share of the row's LayerNorm statistics, from the rounded h the LN
        # reads: its mean and centred sum of squares (merged without cancellation later).
        hf = tl.where(cmask[None, :], h.to(tl.float32), 0.0)
        n = tl.minimum(F - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
        mean_t = tl.sum(hf, axis=1) / n
        dev = tl.where(cmask[None, :], hf - mean_t[:, None], 0.0)
        slot = Stats + (rows * stats_tiles + pid_n) * 2
        tl.store(slot, mean_t, mask=rmask)
        tl.store(slot + 1, tl.sum(dev * dev, axis=1), mask=rmask)


@triton.jit
def row_stats(Stats, rows, K, stats_tiles, stats_block, eps):
    """Merge rows' per-tile (mean, centred sum of squares) into (mean, rstd) (Chan et al.):
    ``M2 = sum_t m2_t + n_t (mean_t - mean)^2``, no cancellation. Slots are read 16 at a time
    so the merge holds few registers next to a GEMM accumulator."""
    tiles = tl.cdiv(K, stats_block)
    t = tl.arange(0, 16)
    total = tl.zeros((rows.shape[0],), tl.float32)
    for t0 in range(0, tiles, 16):
        n = tl.minimum(K - (t0 + t) * stats_block, stats_block).to(tl.float32)
        ok = (t0 + t) < tiles
        mean_t = tl.load(Stats + (rows[:, None] * stats_tiles + t0 + t[None, :]) * 2, mask=ok[None, :], other=0.0)
        total += tl.sum(tl.where(ok[None, :], mean_t * n[None, :], 0.0), axis=1)
    mean = total / K
    m2 = tl.zeros((rows.shape[0],), tl.float32)
    for t0 in range(0, tiles, 16):
        n = tl.minimum(K - (t0 + t) * stats_block, stats_block).to(tl.float32)
        ok = (t0 + t) < tiles
        slot = Stats + (rows[:, None] * stats_tiles + t0 + t[None, :]) * 2
        mean_t = tl.load(slot, mask=ok[None, :], other=0.0)
        m2_t = tl.load(slot + 1, mask=ok[None, :], other=0.0)
        dev = mean_t - mean[:, None]
        m2 += tl.sum(tl.where(ok[None, :], m2_t + n[None, :] * dev * dev, 0.0), axis=1)
    return mean, 1.0 / tl.sqrt(m2 / K + eps)


@triton.jit
def grouped_mm_kernel(
    A, A2, Perm, Offsets, B, B2, Bias, C, Stats, LnW, LnB, Mean, Rstd, M, N, K,
    stats_tiles, stats_block, eps,
    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, PAIR2: tl.constexpr, HAS_BIAS: tl.constexpr,
    TRANS_B: tl.constexpr, LN_A: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``C[c_row] = A'[a_row] @ B[m] (+ A2[a_row] @ B2[m]) (+ Bias[m])`` for grouped row r of
    modality m; ``a_row``/``c_row`` is ``perm[r]`` when gathering/scattering, else r. With
    ``LN_A``, ``A' = LN(A)`` with modality m's weight/bias, normalised in the loads from the
    statistics ``ffn_in_kernel`` left in Stats (the column-0 programs save mean and rstd for
    the backward). B[m] is a contiguous ``[K, N]`` weight, or with ``TRANS_B`` a ``[N, K]``
    one read transposed (no transposed copy)."""
    n_cols = tl.cdiv(N, BLOCK_N)
    m, rows, rmask, tok, pid_n, live = tile_rows(Perm, Offsets, M, n_cols, BLOCK_M, GROUP_M)
    a_rows = tok if GATHER_A else rows
    c_rows = tok if SCATTER_C else rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_offs = a_rows[:, None] * K + ks[None, :]
    if TRANS_B:
        b_offs = m.to(tl.int64) * N * K + ks[:, None] + (cols % N)[None, :] * K
    else:
        b_offs = m.to(tl.int64) * N * K + ks[:, None] * N + (cols % N)[None, :]
    if LN_A:
        mean, rstd = row_stats(Stats, rows, K, stats_tiles, stats_block, eps)
        if pid_n == 0:
            tl.store(Mean + rows, mean, mask=rmask)
            tl.store(Rstd + rows, rstd, mask=rmask)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, tl.where(live, K, 0), BLOCK_K):
        kmask = ks < K - k0
        a = tl.load(A + a_offs, mask=kmask[None, :], other=0.0)
        if LN_A:  # HN rounded to the storage dtype, as the same-precision torch chain rounds it
            w = tl.load(LnW + m * K + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
            hn = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_LN_BIAS:
                hn += tl.load(LnB + m * K + k0 + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
            a = to_storage(hn, A.dtype.element_ty)
        acc = mma(a, tl.load(B + b_offs, mask=kmask[:, None], other=0.0), acc, INTERPRET, PREC)
        if PAIR2:
            acc = mma(tl.load(A2 + a_offs, mask=kmask[None, :], other=0.0),
                      tl.load(B2 + b_offs, mask=kmask[:, None], other=0.0), acc, INTERPRET, PREC)
        a_offs += BLOCK_K
        b_offs += BLOCK_K if TRANS_B else BLOCK_K * N
    if HAS_BIAS:
        acc += tl.load(Bias + m * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(C + c_rows[:, None] * N + cols[None, :], to_storage(acc, C.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])
