"""
Routed FFN, backward kernels
============================

``dy`` arrives in packed order and is gathered / scattered through ``perm`` like the forward.
Launches (the GEMMs with the raster of ``fwd.py``):

1. ``dHN = dy[perm] @ w_out[m]^T`` — ``fwd.grouped_mm_kernel`` reading the weight transposed.
2. ``hidden_bwd_kernel``: recompute H and HN from the saved U, G and LN statistics (store HN
   for step 3), the LN backward to dH, per-program partial sums of ``dln_weight``/``dln_bias``,
   and the GeGLU / GELU backward to dU, dG.
3. ``wgrad_kernel``: ``dw_out[m] = HN_m^T @ dy[perm]_m`` with ``db_out`` as column sums.
4. ``dx[perm] = dU @ w_in[m]^T + dG @ w_gate[m]^T`` — one grouped GEMM, two products.
5. ``wgrad_kernel`` with ``PAIR``: ``dw_in`` and ``dw_gate`` (and ``db_in``) in one launch, each
   program reading its gathered x tile once for both products.

The ``dln_weight``/``dln_bias`` partial rows are added per modality in program order by
``layer_norm.group_column_sums``: deterministic, no atomics, no ``index_add_``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from omni_core.kernels.layer_norm import group_tile, to_storage
from omni_core.kernels.routed_ffn.fwd import gelu, gelu_grad, mma


@triton.jit
def wgrad_kernel(
    A, B, B2, Perm, Offsets, DW, DW2, DB, P, N,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, PAIR: tl.constexpr, HAS_DB: tl.constexpr,
    INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``DW[m] [P, N] = sum over modality m's grouped rows r of A[a_row]^T B[b_row]`` (and with
    ``PAIR`` ``DW2[m]`` from B2 with the same A tile); ``DB[m]`` the column sums of B.

    The reduction runs over the (variable) token count of one modality, so the grid is over
    output tiles only: (modality x P tile, N tile). BLOCK_M tiles P, BLOCK_K the tokens; a
    modality without tokens skips the loop and writes zeros.
    """
    pid = tl.program_id(0)
    p_tiles = tl.cdiv(P, BLOCK_M)
    m = pid // p_tiles
    ps = (pid % p_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = ps < P
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ps_in, cols_in = ps % P, cols % N  # clamped: loads need only the token mask
    lo = tl.load(Offsets + m)
    hi = tl.load(Offsets + m + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_b = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        rmask = rows < hi
        rows = tl.where(rmask, rows, lo).to(tl.int64)
        if GATHER_A or GATHER_B:
            tok = tl.load(Perm + rows).to(tl.int64)
        a_rows = tok if GATHER_A else rows
        b_rows = tok if GATHER_B else rows
        a_t = tl.load(A + a_rows[None, :] * P + ps_in[:, None], mask=rmask[None, :], other=0.0)
        b_offs = b_rows[:, None] * N + cols_in[None, :]
        b = tl.load(B + b_offs, mask=rmask[:, None], other=0.0)
        acc = mma(a_t, b, acc, INTERPRET, PREC)
        if PAIR:
            acc2 = mma(a_t, tl.load(B2 + b_offs, mask=rmask[:, None], other=0.0), acc2, INTERPRET, PREC)
        if HAS_DB:
            acc_b += tl.sum(b.to(tl.float32), axis=0)
    out = m.to(tl.int64) * P * N + ps[:, None] * N + cols[None, :]
    omask = pmask[:, None] & cmask[None, :]
    tl.store(DW + out, to_storage(acc, DW.dtype.element_ty), mask=omask)
    if PAIR:
        tl.store(DW2 + out, to_storage(acc2, DW2.dtype.element_ty), mask=omask)
    if HAS_DB:
        if pid % p_tiles == 0:  # the first P tile of a modality owns its bias gradient
            tl.store(DB + m * N + cols, to_storage(acc_b, DB.dtype.element_ty), mask=cmask)


@triton.jit
def _hidden_tile(U, G, offs, mask, GATED: tl.constexpr, dtype: tl.constexpr):
    """Recompute ``(u, g, gelu(g), h)`` of a tile from the saved U/G, h rounded as stored."""
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        gelu_g = gelu(g)
        h = to_storage(gelu_g * u, dtype).to(tl.float32)
    else:
        g = u
        gelu_g = u
        h = to_storage(gelu(u), dtype).to(tl.float32)
    return u, g, gelu_g, h


@triton.jit
def hidden_bwd_kernel(
    U, G, DHN, HN, DU, DG, LnW, LnB, Mean, Rstd, RowC1, RowC2, PartW, PartB, Offsets,
    M, F, rows_per_prog,
    GATED: tl.constexpr, HAS_LN: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: a chunk of one modality's rows, all F columns in BLOCK_N slices.

    A hidden row (F = 6144 at ONE-PEACE 4B) does not fit in registers with the ~10 live
    arrays this step needs, so the LN backward runs in two sweeps: sweep 1 (rows outer)
    reduces the row sums ``mean(w dHN xhat)``/``mean(w dHN)`` into a fp32 scratch; sweep 2
    (column slices outer, rows inner) writes HN, dU, dG and keeps one slice of the
    ``dln_weight``/``dln_bias`` partial sums in registers.
    """
    pid = tl.program_id(0)
    m, start, end = group_tile(pid, Offsets, M, rows_per_prog)
    dtype = HN.dtype.element_ty
    if HAS_LN:
        for r0 in range(start, end, BLOCK_ROWS):
            rows = r0 + tl.arange(0, BLOCK_ROWS)
            rmask = rows < end
            mean = tl.load(Mean + rows, mask=rmask, other=0.0)
            rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
            c1 = tl.zeros((BLOCK_ROWS,), tl.float32)
            c2 = tl.zeros((BLOCK_ROWS,), tl.float32)
            for c0 in range(0, F, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cmask = cols < F
                mask = rmask[:, None] & cmask[None, :]
                offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
                _, _, _, h = _hidden_tile(U, G, offs, mask, GATED, dtype)
                xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
                w = tl.load(LnW + m * F + cols, mask=cmask, other=0.0).to(tl.float32)
                wd = tl.load(DHN + offs, mask=mask, other=0.0).to(tl.float32) * w[None, :]
                c1 += tl.sum(wd * xhat, axis=1)
                c2 += tl.sum(wd, axis=1)
            tl.store(RowC1 + rows, c1 / F, mask=rmask)
            tl.store(RowC2 + rows, c2 / F, mask=rmask)
        tl.debug_barrier()  # sweep 2 reads row sums other threads of this program wrote
    for c0 in range(0, F, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < F
        if HAS_LN:
            w = tl.load(LnW + m * F + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_LN_BIAS:
                b = tl.load(LnB + m * F + cols, mask=cmask, other=0.0).to(tl.float32)
            else:
                b = tl.zeros((BLOCK_N,), tl.float32)
        acc_w = tl.zeros((BLOCK_N,), tl.float32)
        acc_b = tl.zeros((BLOCK_N,), tl.float32)
        for r0 in range(start, end, BLOCK_ROWS):
            rows = r0 + tl.arange(0, BLOCK_ROWS)
            rmask = rows < end
            mask = rmask[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
            u, g, gelu_g, h = _hidden_tile(U, G, offs, mask, GATED, dtype)
            dhn = tl.load(DHN + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_LN:
                mean = tl.load(Mean + rows, mask=rmask, other=0.0)
                rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
                c1 = tl.load(RowC1 + rows, mask=rmask, other=0.0)
                c2 = tl.load(RowC2 + rows, mask=rmask, other=0.0)
                xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
                tl.store(HN + offs, to_storage(xhat * w[None, :] + b[None, :], dtype), mask=mask)
                acc_w += tl.sum(dhn * xhat, axis=0)
                acc_b += tl.sum(dhn, axis=0)
                # LN's dx, rounded like the same-precision torch chain rounds dH.
                dh = (dhn * w[None, :] - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                dh = to_storage(dh, dtype).to(tl.float32)
            else:
                tl.store(HN + offs, to_storage(h, dtype), mask=mask)
                dh = dhn
            if GATED:
                tl.store(DU + offs, to_storage(dh * gelu_g, dtype), mask=mask)
                tl.store(DG + offs, to_storage(dh * u * gelu_grad(g), dtype), mask=mask)
            else:
                tl.store(DU + offs, to_storage(dh * gelu_grad(u), dtype), mask=mask)
        if HAS_LN:
            tl.store(PartW + pid * F + cols, acc_w, mask=cmask)
            if HAS_LN_BIAS:
                tl.store(PartB + pid * F + cols, acc_b, mask=cmask)
