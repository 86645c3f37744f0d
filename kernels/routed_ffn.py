"""
Modality-routed FFN as grouped GEMMs
====================================

Implements ``omni_core.ops.routed_ffn`` (see ``omni_core/ops/ffn.py`` for the contract): token
``t`` of modality ``m`` goes through FFN ``m``::

    u = x @ w_in[m] + b_in[m]
    h = gelu(x @ w_gate[m]) * u          (GeGLU, ONE-PEACE)    or    h = gelu(u)
    h = layer_norm(h) * ln_weight[m] + ln_bias[m]               (optional sub-LN over F)
    y = h @ w_out[m] + b_out[m]

The routing plan groups tokens stably by modality: ``perm[r]`` is the packed index of the
r-th grouped row and ``offsets[m]:offsets[m+1]`` are modality m's grouped rows. Nothing is
ever copied into grouped order: GEMM-1 *gathers* its A rows through ``perm`` and GEMM-2
*scatters* its output rows through ``perm``, so the hidden activations are the only tensors
that live in grouped order. Each GEMM is ONE launch for all modalities: the grid is
``(row tiles, N tiles)`` with an upper bound of ``cdiv(T, BLOCK_M) + M - 1`` row tiles, and
each program finds its modality and rows from the device-side offsets
(:func:`~omni_core.kernels.layer_norm.group_tile`); no host synchronisation, no host schedule.
``routed_ffn_triton`` builds the plan of ``omni_core.ops.routing`` (stable sort, counts) on the
device itself, since kernels do not import ops; ``routed_ffn_grouped`` takes a plan the caller
already holds.

Forward launches

1. ``_ffn_in_kernel``: ``U = x[perm] @ w_in[m] + b_in[m]`` and ``G = x[perm] @ w_gate[m]``
   with the GeGLU / GELU epilogue (exact erf GELU) writing ``H``.
2. the fused LayerNorm of ``kernels/layer_norm.py`` over H with per-modality weights (sub-LN).
3. ``_grouped_mm_kernel``: ``y[perm] = HN @ w_out[m] + b_out[m]``.

What the backward keeps, and why. Saved: the GEMM-1 outputs ``U`` and ``G`` (pre-activation,
``[T, F]`` each in the input dtype) and the LN statistics ``mean``/``rstd`` (fp32, 8 bytes a
token). Recomputed: ``H = act(U, G)`` and ``HN = LN(H)``, elementwise, inside the fused
backward kernel that also runs the LN and GeGLU backward. Re-deriving U and G would cost a
second GEMM-1 (``4 T D F`` FLOPs, two thirds of the forward) to save ``2 T F`` elements; re-deriving H
and HN costs a few FLOPs per element on data the backward kernel loads anyway, and saves two
more ``[T, F]`` tensors (at ONE-PEACE 4B, 40 layers, each ``[T, 6144]`` is 4x the layer's
``[T, 1536]`` input).

Backward launches (``dy`` in packed order, gathered/scattered through perm like the forward)

1. ``dHN = dy[perm] @ w_out[m]^T`` (grouped GEMM reading the weight transposed, no copy).
2. ``_ffn_hidden_bwd_kernel``: recompute H and HN (store HN for step 3), LN backward to dH
   in two sweeps over F (a 6144-wide row does not fit in registers) with per-program partial
   sums for ``dln_weight``/``dln_bias``, then GeGLU/GELU backward to ``dU``/``dG``.
3. ``dw_out[m] = HN_m^T @ dy[perm]_m`` and ``db_out[m]`` (column sums), grouped weight-gradient
   GEMM: grid over (modality x F tile, D tile), each program reduces over its modality's rows;
   a modality with no tokens writes zeros.
4. ``dx[perm] = dU @ w_in[m]^T + dG @ w_gate[m]^T`` (one launch, two products, scattered).
5. ``dw_in``/``db_in`` and ``dw_gate`` as in 3, A rows gathered from x through perm.

Precision: every GEMM accumulates in fp32; U, G, H, HN, dU, dG are rounded to the input
dtype between steps, as the same-precision torch implementation rounds them. fp32 GEMMs use
``input_precision="ieee"`` (no TF32) so fp32 matches a fp32 reference. Under the interpreter
half-precision tiles are upcast to fp32 before ``tl.dot`` (its bf16 dot is wrong) and bf16
stores round to nearest even explicitly (its cast truncates); both are constexpr branches that
compiled code never sees.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from omni_core.kernels import layer_norm as ln_kernels
from omni_core.kernels._aot import AotConfig
from omni_core.kernels.layer_norm import (
    group_tile,
    interpreting,
    layer_norm_fwd_grouped,
    new_buffer,
    rows_per_program,
    to_storage,
)

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


# ---------------------------------------------------------------------------------------------
# GEMM-1 with the bias + GeGLU / GELU epilogue
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(Perm, Offsets, M, BLOCK_M: tl.constexpr):
    """This program's grouped rows: (modality, rows, row mask, perm[rows], live).

    Rows past the tile end are clamped to row 0 and masked only at the store, so the K loop
    loads without a row mask; ``live`` is False for the spare programs of the grid bound.
    """
    m, start, end = group_tile(tl.program_id(0), Offsets, M, BLOCK_M)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    rows = tl.where(rmask, rows, 0).to(tl.int64)
    tok = tl.load(Perm + rows).to(tl.int64)
    return m, rows, rmask, tok, start < end


@triton.jit
def _ffn_in_kernel(
    X, Perm, Offsets, W_in, W_gate, B_in, U, G, H, M, D, F,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m, rows, rmask, tok, live = _tile_rows(Perm, Offsets, M, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = X + tok[:, None] * D + ks[None, :]  # gather through perm: no permuted copy of x
    w_ptrs = m.to(tl.int64) * D * F + ks[:, None] * F + (cols % F)[None, :]
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, tl.where(live, D, 0), BLOCK_K):
        kmask = ks < D - k0
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        acc_u = _mma(a, tl.load(W_in + w_ptrs, mask=kmask[:, None], other=0.0), acc_u, INTERPRET, PREC)
        if GATED:
            acc_g = _mma(a, tl.load(W_gate + w_ptrs, mask=kmask[:, None], other=0.0), acc_g, INTERPRET, PREC)
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
        h = _gelu(g.to(tl.float32)) * u.to(tl.float32)
    else:
        h = _gelu(u.to(tl.float32))
    tl.store(H + offs, to_storage(h, dtype), mask=omask)


# ---------------------------------------------------------------------------------------------
# Grouped GEMM with row gather / scatter: GEMM-2, dHN and dx
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grouped_mm_kernel(
    A, A2, Perm, Offsets, B, B2, Bias, C, M, N, K,
    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, PAIR2: tl.constexpr, HAS_BIAS: tl.constexpr,
    TRANS_B: tl.constexpr,
    INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``C[c_row] = A[a_row] @ B[m] (+ A2[a_row] @ B2[m]) (+ Bias[m])`` for grouped row r of
    modality m; ``a_row``/``c_row`` is ``perm[r]`` when gathering/scattering, else r. A, A2
    and C are contiguous row-major; B[m] is a contiguous ``[K, N]`` weight, or with ``TRANS_B``
    a contiguous ``[N, K]`` one read transposed (no transposed copy)."""
    m, rows, rmask, tok, live = _tile_rows(Perm, Offsets, M, BLOCK_M)
    a_rows = tok if GATHER_A else rows
    c_rows = tok if SCATTER_C else rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_offs = a_rows[:, None] * K + ks[None, :]
    if TRANS_B:
        b_offs = m.to(tl.int64) * N * K + ks[:, None] + (cols % N)[None, :] * K
    else:
        b_offs = m.to(tl.int64) * N * K + ks[:, None] * N + (cols % N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, tl.where(live, K, 0), BLOCK_K):
        kmask = ks < K - k0
        acc = _mma(tl.load(A + a_offs, mask=kmask[None, :], other=0.0),
                   tl.load(B + b_offs, mask=kmask[:, None], other=0.0), acc, INTERPRET, PREC)
        if PAIR2:
            acc = _mma(tl.load(A2 + a_offs, mask=kmask[None, :], other=0.0),
                       tl.load(B2 + b_offs, mask=kmask[:, None], other=0.0), acc, INTERPRET, PREC)
        a_offs += BLOCK_K
        b_offs += BLOCK_K if TRANS_B else BLOCK_K * N
    if HAS_BIAS:
        acc += tl.load(Bias + m * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(C + c_rows[:, None] * N + cols[None, :], to_storage(acc, C.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------------------------
# Grouped weight gradients: dW[m] = A_m^T @ B_m, db[m] = column sums of B_m
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grouped_wgrad_kernel(
    A, B, Perm, Offsets, DW, DB, P, N,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_DB: tl.constexpr,
    INTERPRET: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``DW[m] [P, N] = sum over modality m's grouped rows r of A[a_row]^T B[b_row]``.

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
        b = tl.load(B + b_rows[:, None] * N + cols_in[None, :], mask=rmask[:, None], other=0.0)
        acc = _mma(a_t, b, acc, INTERPRET, PREC)
        if HAS_DB:
            acc_b += tl.sum(b.to(tl.float32), axis=0)
    out = m.to(tl.int64) * P * N + ps[:, None] * N + cols[None, :]
    tl.store(DW + out, to_storage(acc, DW.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])
    if HAS_DB:
        if pid % p_tiles == 0:  # the first P tile of a modality owns its bias gradient
            tl.store(DB + m * N + cols, to_storage(acc_b, DB.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------
# Fused hidden backward: recompute H, HN; LN backward; GeGLU / GELU backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _hidden_tile(U, G, offs, mask, GATED: tl.constexpr, dtype: tl.constexpr):
    """Recompute ``(u, g, gelu(g), h)`` of a tile from the saved U/G, h rounded as stored."""
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        gelu_g = _gelu(g)
        h = to_storage(gelu_g * u, dtype).to(tl.float32)
    else:
        g = u
        gelu_g = u
        h = to_storage(_gelu(u), dtype).to(tl.float32)
    return u, g, gelu_g, h


@triton.jit
def _ffn_hidden_bwd_kernel(
    U, G, DHN, HN, DU, DG, LnW, LnB, Mean, Rstd, RowC1, RowC2, PartW, PartB, PartGroup, Offsets,
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
                tl.store(DG + offs, to_storage(dh * u * _gelu_grad(g), dtype), mask=mask)
            else:
                tl.store(DU + offs, to_storage(dh * _gelu_grad(u), dtype), mask=mask)
        if HAS_LN:
            tl.store(PartW + pid * F + cols, acc_w, mask=cmask)
            tl.store(PartB + pid * F + cols, acc_b, mask=cmask)
    if HAS_LN:
        tl.store(PartGroup + pid, m)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for fp16/bf16. All keep the code free of
# spills and on HMMA (sm_80) / HGMMA (sm_90); checked by aot_configs() and
# benchmarks/kernel_report.py.
GEMM_CONFIGS = [
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
]
# GEMM-1 holds two fp32 accumulators (GeGLU): at 128x128 they spill on sm_80 even with 8
# warps, so its tiles hold half as many outputs.
GEMM1_CONFIGS = [
    (128, 64, 32, 4, 3),
    (64, 128, 32, 4, 3),
    (64, 64, 64, 4, 3),
]
# fp32 runs the IEEE FMA dot (no TF32, to meet fp32 accuracy): its operands live in registers,
# so the K slice is short to stay spill-free on sm_80. Every GEMM kernel uses these for fp32.
FP32_CONFIGS = [
    (64, 64, 16, 4, 3),
    (64, 128, 16, 8, 2),
]
# Under the interpreter each program costs per op, not per element, so tiles are big; they stay
# smaller than the test shapes so the K loop, several row tiles and ragged edges all run.
_INTERPRET_BLOCKS = (32, 64, 32)


def _tuned(kernel: triton.JITFunction, half_configs: list[tuple[int, int, int, int, int]], key: list[str]):
    """Autotune over ``half_configs`` for fp16/bf16 and FP32_CONFIGS for fp32 operands."""
    def config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)

    half = [config(*c) for c in half_configs]
    full = [config(*c) for c in FP32_CONFIGS]

    def by_dtype(configs: list[triton.Config], named_args: dict, **_kwargs) -> list[triton.Config]:
        wanted = full if named_args[kernel.arg_names[0]].dtype == torch.float32 else half
        return [c for c in configs if any(c is w for w in wanted)]

    tuned = triton.autotune(configs=half + full, key=key, prune_configs_by={"early_config_prune": by_dtype})(kernel)
    tuned.model_configs = half_configs
    return tuned


_ffn_in_tuned = _tuned(_ffn_in_kernel, GEMM1_CONFIGS, ["D", "F", "GATED"])
_grouped_mm_tuned = _tuned(_grouped_mm_kernel, GEMM_CONFIGS, ["N", "K", "GATHER_A", "SCATTER_C", "PAIR2"])
_grouped_wgrad_tuned = _tuned(_grouped_wgrad_kernel, GEMM_CONFIGS, ["P", "N", "GATHER_A", "GATHER_B"])


def _hidden_blocks(F: int, compiled: bool = False) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps) of the hidden backward: 8 elements a thread per live
    array compiled (no spills); under the interpreter bigger row tiles and 32-column slices,
    so a test row of a few dozen units still runs several slices with a ragged last one."""
    if interpreting() and not compiled:
        return 16, 32, 4
    block_n = min(512, triton.next_power_of_2(F))
    return 2048 // block_n, block_n, 8


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch(kernel: triton.JITFunction, tuned, grid_rows, grid_cols, *args, **flags) -> None:
    """Launch ``kernel`` with the interpreter's fixed tile, or its autotuned wrapper compiled.

    ``grid_rows(BLOCK_M)``/``grid_cols(BLOCK_N)`` give the grid for a tile shape.
    """
    if interpreting() or ln_kernels.INTERPRET_AS_COMPILED:
        bm, bn, bk = _INTERPRET_BLOCKS
        warps = 4
        if ln_kernels.INTERPRET_AS_COMPILED:  # the traffic model: the first GPU config
            bm, bn, bk, warps, _ = (FP32_CONFIGS if args[0].dtype == torch.float32 else tuned.model_configs)[0]
        kernel[(grid_rows(bm), grid_cols(bn))](*args, **flags, INTERPRET=True,
                                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    else:
        tuned[lambda meta: (grid_rows(meta["BLOCK_M"]), grid_cols(meta["BLOCK_N"]))](
            *args, **flags, INTERPRET=False)


def _grouped_mm(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor,
    *, trans_b: bool = False, gather_a: bool = False, scatter_c: bool = False,
    a2: torch.Tensor | None = None, b2: torch.Tensor | None = None, bias: torch.Tensor | None = None,
) -> None:
    T, K = a.shape
    N = out.shape[1]
    M = offsets.numel() - 1
    if T == 0 or N == 0:
        return
    _launch(
        _grouped_mm_kernel, _grouped_mm_tuned,
        lambda bm: triton.cdiv(T, bm) + M - 1, lambda bn: triton.cdiv(N, bn),
        a, a2, perm, offsets, b, b2, bias, out, M, N, K, TRANS_B=trans_b,
        GATHER_A=gather_a, SCATTER_C=scatter_c, PAIR2=a2 is not None, HAS_BIAS=bias is not None,
        PREC=_prec(a.dtype),
    )


def _grouped_wgrad(
    a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, *,
    gather_a: bool = False, gather_b: bool = False, with_db: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    P, N = a.shape[1], b.shape[1]
    M = offsets.numel() - 1
    dw = new_buffer((M, P, N), a.dtype, a.device)
    db = new_buffer((M, N), a.dtype, a.device) if with_db else None

    _launch(
        _grouped_wgrad_kernel, _grouped_wgrad_tuned,
        lambda bm: M * triton.cdiv(P, bm), lambda bn: triton.cdiv(N, bn),
        a, b, perm, offsets, dw, db, P, N,
        GATHER_A=gather_a, GATHER_B=gather_b, HAS_DB=with_db, PREC=_prec(a.dtype),
    )
    return dw, db


def _forward(
    x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
    b_in: torch.Tensor | None, b_out: torch.Tensor | None, w_gate: torch.Tensor | None,
    ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, U, G, mean, rstd)``; G/mean/rstd are empty when unused."""
    T, D = x.shape
    M, _, F = w_in.shape
    U = new_buffer((T, F), x.dtype, x.device)
    # Without a gate G is empty but keeps its [*, F] rank: the fake implementation says (0, F).
    G = new_buffer((T if w_gate is not None else 0, F), x.dtype, x.device)
    H = new_buffer((T, F), x.dtype, x.device)
    if T:
        _launch(
            _ffn_in_kernel, _ffn_in_tuned,
            lambda bm: triton.cdiv(T, bm) + M - 1, lambda bn: triton.cdiv(F, bn),
            x, perm, offsets, w_in, w_gate, b_in, U, G, H, M, D, F,
            GATED=w_gate is not None, HAS_BIAS=b_in is not None, PREC=_prec(x.dtype),
        )
    if ln_weight is not None:
        hn, mean, rstd = layer_norm_fwd_grouped(H, ln_weight, ln_bias, offsets, eps)
    else:
        hn, mean, rstd = H, x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32)
    y = new_buffer((T, D), x.dtype, x.device)
    _grouped_mm(hn, w_out, y, perm, offsets, scatter_c=True, bias=b_out)
    return y, U, G, mean, rstd


def _backward(
    dy: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor,
    w_out: torch.Tensor, w_gate: torch.Tensor | None, ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None, has_b_in: bool, has_b_out: bool,
    U: torch.Tensor, G: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> list[torch.Tensor | None]:
    """``[dx, dw_in, dw_out, db_in, db_out, dw_gate, dln_weight, dln_bias]`` (None when absent)."""
    T, D = x.shape
    M, _, F = w_in.shape
    gated, has_ln, has_ln_bias = w_gate is not None, ln_weight is not None, ln_bias is not None
    dy = dy.contiguous()
    dhn = new_buffer((T, F), x.dtype, x.device)
    _grouped_mm(dy, w_out, dhn, perm, offsets, trans_b=True, gather_a=True)

    hn = new_buffer((T, F), x.dtype, x.device)
    du = new_buffer((T, F), x.dtype, x.device)
    dg = new_buffer((T, F), x.dtype, x.device) if gated else None
    block_rows, block_n, warps = _hidden_blocks(F, compiled=ln_kernels.INTERPRET_AS_COMPILED)
    per = rows_per_program(T, block_rows, x.device)
    progs = triton.cdiv(T, per) + M - 1 if T else 0
    part_w = new_buffer((progs, F), torch.float32, x.device)
    part_b = new_buffer((progs, F), torch.float32, x.device)
    part_g = torch.zeros((progs,), dtype=torch.int32, device=x.device)
    row_c1 = new_buffer((T if has_ln else 0,), torch.float32, x.device)
    row_c2 = new_buffer((T if has_ln else 0,), torch.float32, x.device)
    if progs:
        _ffn_hidden_bwd_kernel[(progs,)](
            U, G, dhn, hn, du, dg, ln_weight, ln_bias, mean, rstd, row_c1, row_c2,
            part_w, part_b, part_g, offsets, M, F, per,
            GATED=gated, HAS_LN=has_ln, HAS_LN_BIAS=has_ln_bias,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=warps,
        )
    dln_w = dln_b = None
    if has_ln:
        idx = part_g.long()
        zeros = torch.zeros((M, F), dtype=torch.float32, device=x.device)
        dln_w = zeros.clone().index_add_(0, idx, part_w).to(x.dtype)
        dln_b = zeros.index_add_(0, idx, part_b).to(x.dtype) if has_ln_bias else None

    dw_out, db_out = _grouped_wgrad(hn, dy, perm, offsets, gather_b=True, with_db=has_b_out)
    dx = new_buffer((T, D), x.dtype, x.device)
    _grouped_mm(du, w_in, dx, perm, offsets, trans_b=True, scatter_c=True, a2=dg, b2=w_gate)
    dw_in, db_in = _grouped_wgrad(x, du, perm, offsets, gather_a=True, with_db=has_b_in)
    dw_gate = _grouped_wgrad(x, dg, perm, offsets, gather_a=True)[0] if gated else None
    return [dx, dw_in, dw_out, db_in, db_out, dw_gate, dln_w, dln_b]


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: one op forward, one backward; autograd and torch.compile see them.
# ---------------------------------------------------------------------------------------------


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


@torch.library.custom_op("omni_core::routed_ffn_fwd", mutates_args=())
def _routed_ffn_fwd_op(
    x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
    b_in: torch.Tensor | None, b_out: torch.Tensor | None, w_gate: torch.Tensor | None,
    ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The kernels index dense row-major tensors; a strided caller gets a copy, not wrong numbers.
    x, perm, offsets, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias = (
        _dense(t) for t in (x, perm, offsets, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias))
    return _forward(x, perm, offsets, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, eps)


@_routed_ffn_fwd_op.register_fake
def _(x, perm, offsets, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, eps):
    T, F = x.shape[0], w_in.shape[2]
    stats = T if ln_weight is not None else 0
    # new_empty, not empty_like: the real outputs are fresh contiguous buffers whatever x's strides.
    return (x.new_empty((T, x.shape[1])), x.new_empty((T, F)), x.new_empty((T if w_gate is not None else 0, F)),
            x.new_empty((stats,), dtype=torch.float32), x.new_empty((stats,), dtype=torch.float32))


@torch.library.custom_op("omni_core::routed_ffn_bwd", mutates_args=())
def _routed_ffn_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor,
    w_out: torch.Tensor, w_gate: torch.Tensor | None, ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None, has_b_in: bool, has_b_out: bool,
    U: torch.Tensor, G: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> list[torch.Tensor]:
    dy, x, perm, offsets, w_in, w_out, w_gate, ln_weight, ln_bias = (
        _dense(t) for t in (dy, x, perm, offsets, w_in, w_out, w_gate, ln_weight, ln_bias))
    grads = _backward(dy, x, perm, offsets, w_in, w_out, w_gate, ln_weight, ln_bias, has_b_in, has_b_out,
                      U, G, mean, rstd)
    return [g if g is not None else x.new_empty((0,)) for g in grads]


@_routed_ffn_bwd_op.register_fake
def _(dy, x, perm, offsets, w_in, w_out, w_gate, ln_weight, ln_bias, has_b_in, has_b_out, U, G, mean, rstd):
    M, D, F = w_in.shape

    def maybe(flag: bool, shape: tuple[int, ...]) -> torch.Tensor:
        return x.new_empty(shape if flag else (0,))

    return [x.new_empty(x.shape), x.new_empty(w_in.shape), x.new_empty(w_out.shape), maybe(has_b_in, (M, F)),
            maybe(has_b_out, (M, D)), maybe(w_gate is not None, (M, D, F)),
            maybe(ln_weight is not None, (M, F)), maybe(ln_bias is not None, (M, F))]


def _setup_context(ctx, inputs, output) -> None:
    x, perm, offsets, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, _ = inputs
    _, U, G, mean, rstd = output
    ctx.save_for_backward(x, perm, offsets, w_in, w_out, w_gate, ln_weight, ln_bias, U, G, mean, rstd)
    ctx.flags = (b_in is not None, b_out is not None)


def _autograd_backward(ctx, dy, *_unused):
    x, perm, offsets, w_in, w_out, w_gate, ln_weight, ln_bias, U, G, mean, rstd = ctx.saved_tensors
    has_b_in, has_b_out = ctx.flags
    dx, dw_in, dw_out, db_in, db_out, dw_gate, dln_w, dln_b = _routed_ffn_bwd_op(
        dy, x, perm, offsets, w_in, w_out, w_gate, ln_weight, ln_bias, has_b_in, has_b_out,
        U, G, mean, rstd)
    return (dx, None, None, dw_in, dw_out, db_in if has_b_in else None, db_out if has_b_out else None,
            dw_gate if w_gate is not None else None, dln_w if ln_weight is not None else None,
            dln_b if ln_bias is not None else None, None)


_routed_ffn_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def group_by_modality(modality: torch.Tensor, num_modalities: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing plan on the tokens' device, without a host sync: ``(perm, offsets)`` int32."""
    ids = modality.long()
    perm = torch.sort(ids, stable=True).indices.to(torch.int32)
    offsets = torch.zeros(num_modalities + 1, dtype=torch.int32, device=modality.device)
    offsets[1:] = torch.cumsum(torch.bincount(ids, minlength=num_modalities), 0)
    return perm, offsets


def routed_ffn_grouped(
    x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
    b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None, w_gate: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None, eps: float = 1e-5,
) -> torch.Tensor:
    """The routed FFN over a routing plan the caller already holds (``perm``/``offsets``)."""
    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.contiguous() if t is not None else None

    return _routed_ffn_fwd_op(
        x.contiguous(), perm.to(torch.int32).contiguous(), offsets.to(torch.int32).contiguous(),
        c(w_in), c(w_out), c(b_in), c(b_out), c(w_gate), c(ln_weight), c(ln_bias), eps)[0]


def routed_ffn_triton(
    x: torch.Tensor, modality: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
    b_in: torch.Tensor | None, b_out: torch.Tensor | None, w_gate: torch.Tensor | None,
    ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """The ``triton`` backend of ``omni_core.ops.routed_ffn`` (inputs already validated there)."""
    perm, offsets = group_by_modality(modality, w_in.shape[0])
    return routed_ffn_grouped(x, perm, offsets, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, eps)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time configs for benchmarks/kernel_report.py: every autotune config x dtype, for
# every specialisation the forward and backward launch, on the ONE-PEACE 4B shape.
# ---------------------------------------------------------------------------------------------

_AOT_T, _AOT_D, _AOT_F = 32768, 1536, 6144


def aot_configs() -> list[AotConfig]:
    T, D, F = _AOT_T, _AOT_D, _AOT_F
    configs = []
    for dtype, elem in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        ptr = f"*{dtype}"
        prec = "ieee" if dtype == "fp32" else "tf32"
        gemm_flops = 2 * T * D * F
        # (kernel label, fn, tunable configs, pointer args, runtime ints, flags, FLOPs, bytes)
        variants = [
            ("ffn_in_geglu", _ffn_in_kernel, GEMM1_CONFIGS,
             ["X", "W_in", "W_gate", "B_in", "U", "G", "H"], ["M", "D", "F"],
             {"GATED": True, "HAS_BIAS": False}, 2 * gemm_flops, elem * (T * D + 2 * D * F + 3 * T * F)),
            ("ffn_in_gelu", _ffn_in_kernel, GEMM1_CONFIGS,
             ["X", "W_in", "W_gate", "B_in", "U", "G", "H"], ["M", "D", "F"],
             {"GATED": False, "HAS_BIAS": True}, gemm_flops, elem * (T * D + D * F + 2 * T * F)),
            ("ffn_out", _grouped_mm_kernel, GEMM_CONFIGS,
             ["A", "A2", "B", "B2", "Bias", "C"], ["M", "N", "K"],
             {"GATHER_A": False, "SCATTER_C": True, "PAIR2": False, "HAS_BIAS": True, "TRANS_B": False},
             gemm_flops, elem * (T * F + F * D + T * D)),
            ("bwd_dhn", _grouped_mm_kernel, GEMM_CONFIGS,
             ["A", "A2", "B", "B2", "Bias", "C"], ["M", "N", "K"],
             {"GATHER_A": True, "SCATTER_C": False, "PAIR2": False, "HAS_BIAS": False, "TRANS_B": True},
             gemm_flops, elem * (T * D + F * D + T * F)),
            ("bwd_dx", _grouped_mm_kernel, GEMM_CONFIGS,
             ["A", "A2", "B", "B2", "Bias", "C"], ["M", "N", "K"],
             {"GATHER_A": False, "SCATTER_C": True, "PAIR2": True, "HAS_BIAS": False, "TRANS_B": True},
             2 * gemm_flops, elem * (2 * T * F + 2 * F * D + T * D)),
            ("bwd_dw_out", _grouped_wgrad_kernel, GEMM_CONFIGS,
             ["A", "B", "DW", "DB"], ["P", "N"],
             {"GATHER_A": False, "GATHER_B": True, "HAS_DB": True},
             gemm_flops, elem * (T * F + T * D + F * D)),
            ("bwd_dw_in", _grouped_wgrad_kernel, GEMM_CONFIGS,
             ["A", "B", "DW", "DB"], ["P", "N"],
             {"GATHER_A": True, "GATHER_B": False, "HAS_DB": True},
             gemm_flops, elem * (T * D + T * F + D * F)),
        ]
        for label, fn, tunables, ptrs, ints, flags, flops, nbytes in variants:
            for bm, bn, bk, warps, stages in (FP32_CONFIGS if dtype == "fp32" else tunables):
                constexprs = {**flags, "INTERPRET": False, "PREC": prec,
                              "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                signature = {**dict.fromkeys(ptrs, ptr), "Perm": "*i32", "Offsets": "*i32",
                             **dict.fromkeys(ints, "i32"), **dict.fromkeys(constexprs, "constexpr")}
                signature = {name: signature[name] for name in fn.arg_names}
                configs.append(AotConfig(
                    kernel=f"routed_ffn_{label}", fn=fn, signature=signature, constexprs=constexprs,
                    num_warps=warps, num_stages=stages, dtype=dtype, flops=flops, min_bytes=nbytes,
                    label=f"BLOCK_M={bm} BLOCK_N={bn} BLOCK_K={bk} warps={warps} stages={stages}",
                    divisible_by_16=tuple(n for n in ints if n != "M"),
                ))
        for f in (F, 512):
            block_n = triton.next_power_of_2(f)
            block_rows, block_n, warps = _hidden_blocks(f, compiled=True)
            flags = {"GATED": True, "HAS_LN": True, "HAS_LN_BIAS": True,
                     "BLOCK_ROWS": block_rows, "BLOCK_N": block_n}
            signature = {**dict.fromkeys(["U", "G", "DHN", "HN", "DU", "DG", "LnW", "LnB"], ptr),
                         **dict.fromkeys(["Mean", "Rstd", "RowC1", "RowC2", "PartW", "PartB"], "*fp32"),
                         "PartGroup": "*i32", "Offsets": "*i32",
                         "M": "i32", "F": "i32", "rows_per_prog": "i32",
                         **dict.fromkeys(flags, "constexpr")}
            configs.append(AotConfig(
                kernel="routed_ffn_bwd_hidden", fn=_ffn_hidden_bwd_kernel, signature=signature,
                constexprs=flags, num_warps=warps, num_stages=1, dtype=dtype,
                flops=30 * T * f, min_bytes=elem * 6 * T * f,
                label=f"F={f} BLOCK_ROWS={block_rows} BLOCK_N={block_n} warps={warps}",
                divisible_by_16=("F",),
            ))
    return configs
