"""
Routed FFN, launchers and the torch.library custom ops
======================================================

``_forward``/``_backward`` allocate and launch (kernels in ``fwd.py``/``bwd.py``, tiles in
``configs.py``); one custom op each way, so autograd and ``torch.compile`` see one op.
"""

from __future__ import annotations

import torch
import triton
from omni_core.kernels import layer_norm as ln_kernels
from omni_core.kernels.layer_norm import group_column_sums, new_buffer, rows_per_program
from omni_core.kernels.routed_ffn import configs as cfg
from omni_core.kernels.routed_ffn.bwd import hidden_bwd_kernel

# GEMM-1 leaves its LN statistics in one slot per column tile; slots are sized for the
# narrowest tile any config (or the interpreter) uses.
_STATS_MIN_BLOCK = 64


def _row_grid(T: int, M: int, N: int):
    """Grid of a raster GEMM: every (row tile, column tile) of every modality, 1-D."""
    return lambda bm, bn: ((triton.cdiv(T, bm) + M - 1) * triton.cdiv(N, bn),)


def _grouped_mm(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, *,
    trans_b: bool = False, gather_a: bool = False, scatter_c: bool = False,
    a2: torch.Tensor | None = None, b2: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    ln: tuple | None = None,
) -> None:
    """``out = a @ b`` per modality (see ``fwd.grouped_mm_kernel``); ``ln = (stats, stats_block,
    ln_weight, ln_bias, mean, rstd, eps)`` normalises ``a`` in the loads."""
    T, K = a.shape
    N = out.shape[1]
    M = offsets.numel() - 1
    if T == 0 or N == 0:
        return
    stats, stats_block, ln_w, ln_b, mean, rstd, eps = ln or (None, 1, None, None, None, None, 0.0)
    pair = a2 is not None
    cfg.launch(
        cfg.grouped_mm_pair_tuned if pair else cfg.grouped_mm_tuned, "pair" if pair else "one", _row_grid(T, M, N),
        a, a2, perm, offsets, b, b2, bias, out, stats, ln_w, ln_b, mean, rstd, M, N, K,
        triton.cdiv(K, _STATS_MIN_BLOCK), stats_block, eps, TRANS_B=trans_b,
        GATHER_A=gather_a, SCATTER_C=scatter_c, PAIR2=pair, HAS_BIAS=bias is not None,
        LN_A=ln is not None, HAS_LN_BIAS=ln_b is not None, PREC=cfg.prec(a.dtype), GROUP_M=cfg.GROUP_M,
    )


def _wgrad(
    a: torch.Tensor, b: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, *,
    b2: torch.Tensor | None = None, gather_a: bool = False, gather_b: bool = False, with_db: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(A_m^T B_m, A_m^T B2_m or None, colsum(B_m) or None)`` for every modality m, one launch."""
    P, N = a.shape[1], b.shape[1]
    M = offsets.numel() - 1
    dw = new_buffer((M, P, N), a.dtype, a.device)
    dw2 = new_buffer((M, P, N), a.dtype, a.device) if b2 is not None else None
    db = new_buffer((M, N), a.dtype, a.device) if with_db else None
    pair = b2 is not None
    cfg.launch(
        cfg.wgrad_pair_tuned if pair else cfg.wgrad_tuned, "wgrad2" if pair else "one",
        lambda bm, bn: (M * triton.cdiv(P, bm), triton.cdiv(N, bn)),
        a, b, b2, perm, offsets, dw, dw2, db, P, N,
        GATHER_A=gather_a, GATHER_B=gather_b, PAIR=pair, HAS_DB=with_db, PREC=cfg.prec(a.dtype),
    )
    return dw, dw2, db


def _forward(
    x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
    b_in: torch.Tensor | None, b_out: torch.Tensor | None, w_gate: torch.Tensor | None,
    ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y, U, G, mean, rstd)``; G/mean/rstd are empty when unused."""
    T, D = x.shape
    M, _, F = w_in.shape
    has_ln = ln_weight is not None
    U = new_buffer((T, F), x.dtype, x.device)
    # Without a gate G is empty but keeps its [*, F] rank: the fake implementation says (0, F).
    G = new_buffer((T if w_gate is not None else 0, F), x.dtype, x.device)
    H = new_buffer((T, F), x.dtype, x.device)
    stats_tiles = triton.cdiv(F, _STATS_MIN_BLOCK)
    stats = new_buffer((T if has_ln else 0, stats_tiles, 2), torch.float32, x.device)
    mean = new_buffer((T if has_ln else 0,), torch.float32, x.device)
    rstd = new_buffer((T if has_ln else 0,), torch.float32, x.device)
    y = new_buffer((T, D), x.dtype, x.device)
    if T == 0:
        return y, U, G, mean, rstd
    blocks = cfg.launch(
        cfg.ffn_in_tuned, "gemm1", _row_grid(T, M, F),
        x, perm, offsets, w_in, w_gate, b_in, U, G, H, stats, M, D, F, stats_tiles,
        GATED=w_gate is not None, HAS_BIAS=b_in is not None, LN_STATS=has_ln, PREC=cfg.prec(x.dtype),
        GROUP_M=cfg.GROUP_M,
    )
    ln = (stats, blocks["BLOCK_N"], ln_weight, ln_bias, mean, rstd, eps) if has_ln else None
    _grouped_mm(H, w_out, y, perm, offsets, scatter_c=True, bias=b_out, ln=ln)
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
    dhn = new_buffer((T, F), x.dtype, x.device)
    _grouped_mm(dy, w_out, dhn, perm, offsets, trans_b=True, gather_a=True)

    hn = new_buffer((T, F), x.dtype, x.device)
    du = new_buffer((T, F), x.dtype, x.device)
    dg = new_buffer((T, F), x.dtype, x.device) if gated else None
    block_rows, block_n, warps = cfg.hidden_blocks(F, compiled=ln_kernels.INTERPRET_AS_COMPILED)
    per = rows_per_program(T, block_rows, x.device)
    progs = triton.cdiv(T, per) + M - 1 if T else 0
    part_w = new_buffer((progs if has_ln else 0, F), torch.float32, x.device)
    part_b = new_buffer((progs if has_ln_bias else 0, F), torch.float32, x.device)
    row_c1 = new_buffer((T if has_ln else 0,), torch.float32, x.device)
    row_c2 = new_buffer((T if has_ln else 0,), torch.float32, x.device)
    if progs:
        hidden_bwd_kernel[(progs,)](
            U, G, dhn, hn, du, dg, ln_weight, ln_bias, mean, rstd, row_c1, row_c2,
            part_w, part_b, offsets, M, F, per,
            GATED=gated, HAS_LN=has_ln, HAS_LN_BIAS=has_ln_bias,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=warps,
        )
    dln_w = group_column_sums(part_w, offsets, per).to(x.dtype) if has_ln else None
    dln_b = group_column_sums(part_b, offsets, per).to(x.dtype) if has_ln_bias else None

    dw_out, _, db_out = _wgrad(hn, dy, perm, offsets, gather_b=True, with_db=has_b_out)
    dx = new_buffer((T, D), x.dtype, x.device)
    _grouped_mm(du, w_in, dx, perm, offsets, trans_b=True, scatter_c=True, a2=dg, b2=w_gate)
    dw_in, dw_gate, db_in = _wgrad(x, du, perm, offsets, b2=dg, gather_a=True, with_db=has_b_in)
    return [dx, dw_in, dw_out, db_in, db_out, dw_gate, dln_w, dln_b]


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
    # U, G, mean, rstd are saved activations nobody differentiates: without this autograd
    # would zero-fill two [T, F] gradients for them every layer, only to ignore them.
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, dy, *_unused):
    if dy is None:  # y itself took no part in the loss
        return (None,) * 11
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
    return _routed_ffn_fwd_op(x, perm.to(torch.int32), offsets.to(torch.int32), w_in, w_out, b_in, b_out,
                              w_gate, ln_weight, ln_bias, eps)[0]


def routed_ffn_triton(
    x: torch.Tensor, modality: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
    b_in: torch.Tensor | None, b_out: torch.Tensor | None, w_gate: torch.Tensor | None,
    ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:
    """The ``triton`` backend of ``omni_core.ops.routed_ffn`` (inputs already validated there)."""
    perm, offsets = group_by_modality(modality, w_in.shape[0])
    return routed_ffn_grouped(x, perm, offsets, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, eps)
