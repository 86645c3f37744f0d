"""
Fused LayerNorm
===============

``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last dim, forward and
backward (dx, dweight, dbias), implementing ``omni_core.ops.layer_norm``
(``torch.nn.functional.layer_norm`` with optional weight and bias).

Rows are processed as *groups*: ``offsets[g]:offsets[g+1]`` is the slice of rows that uses
row ``g`` of ``weight``/``bias``. A plain LayerNorm is the case of one group; the routed FFN
(``kernels/routed_ffn.py``) uses the same kernels for its per-modality sub-LN over rows that
are grouped by modality. A program owns a tile of rows inside one group, found from the
offsets by :func:`group_tile`, so one launch covers every group with no host-side schedule.

Forward: each program loads ``BLOCK_ROWS`` whole rows (``BLOCK_N >= N``), reduces mean and
variance in fp32, writes ``y`` in the input dtype and keeps ``mean``/``rstd`` (fp32, one per
row) for the backward: 8 bytes per row spare re-reading x for the statistics.

Backward: with ``xhat = (x - mean) * rstd`` and ``g = dy * w``,
``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``; ``dw = sum_rows dy * xhat`` and
``db = sum_rows dy`` are column sums over a whole group. Instead of atomics, each program
walks a chunk of ``rows_per_prog`` rows of one group, keeps its partial column sums in
registers and writes them once to a ``[programs, N]`` fp32 buffer; :func:`group_column_sums`
then adds each group's partial rows in program order (deterministic: no atomics, and no
``index_add_``, whose CUDA sums are not). The chunk length sets the trade: longer chunks mean
fewer partial rows to add, shorter ones more parallelism.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from omni_core.kernels._aot import AotConfig

# Tests set this: every buffer a kernel must fill is NaN-filled first, so unwritten elements show.
POISON_OUTPUTS = False


# The traffic model (benchmarks/traffic.py) sets this: under the interpreter, launch with the
# tiles and grid a GPU (an H100, 132 SMs) would get instead of the small test tiles.
INTERPRET_AS_COMPILED = False
_MODEL_SMS = 132


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and not INTERPRET_AS_COMPILED


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer; NaN-poisoned when ``POISON_OUTPUTS`` (floating dtypes only)."""
    if POISON_OUTPUTS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# The interpreter casts fp32 to bf16 by truncation where GPUs round to nearest even, which
# doubles the rounding error. Under the interpreter the kernels round explicitly so tests
# measure the kernel's arithmetic, not the emulator's; compiled code is unchanged.
_ROUND_BF16 = tl.constexpr(interpreting())


@triton.jit
def to_storage(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even on every backend."""
    if _ROUND_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def group_tile(tile, Offsets, G, TILE):
    """Map flat tile index ``tile`` onto ``(group, first row, end row)``.

    Tiles of ``TILE`` rows are numbered group after group; a tile index past the last tile
    (the grid is an upper bound) gets an empty range, so its program writes nothing.
    """
    grp = tl.load(Offsets) * 0
    start = grp
    end = grp
    seen = grp
    for g in range(G):
        lo = tl.load(Offsets + g)
        hi = tl.load(Offsets + g + 1)
        n = (hi - lo + TILE - 1) // TILE
        hit = (tile >= seen) & (tile < seen + n)
        grp = tl.where(hit, g, grp)
        start = tl.where(hit, lo + (tile - seen) * TILE, start)
        end = tl.where(hit, tl.minimum(hi, lo + (tile - seen + 1) * TILE), end)
        seen += n
    return grp, start, end


@triton.jit
def layer_norm_dx(dy, xhat, w, rstd, mask, N):
    """dx of LayerNorm for a [rows, BLOCK_N] tile (fp32); ``mask`` zeroes padding columns."""
    g = dy * w[None, :]
    c1 = tl.sum(g * xhat, axis=1) / N
    c2 = tl.sum(g, axis=1) / N
    return tl.where(mask, (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _layer_norm_fwd_kernel(
    X, Y, W, B, Mean, Rstd, Offsets, G, N, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    grp, start, end = group_tile(tl.program_id(0), Offsets, G, BLOCK_ROWS)
    rows = start + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < end
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + grp * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + grp * N + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, to_storage(y, Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, DY, DX, W, Mean, Rstd, PartW, PartB, Offsets, G, N, rows_per_prog,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    grp, start, end = group_tile(pid, Offsets, G, rows_per_prog)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + grp * N + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_N,), 1.0, tl.float32)
    acc_w = tl.zeros((BLOCK_N,), tl.float32)
    acc_b = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(start, end, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dx = layer_norm_dx(dy, xhat, w, rstd, mask, N)
        tl.store(DX + offs, to_storage(dx, DX.dtype.element_ty), mask=mask)
        acc_w += tl.sum(dy * xhat, axis=0)
        acc_b += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(PartW + pid * N + cols, acc_w, mask=cmask)
    if HAS_B:
        tl.store(PartB + pid * N + cols, acc_b, mask=cmask)


@triton.jit
def _group_sum_kernel(Part, Out, Offsets, N, rows_per_prog, G, BLOCK_N: tl.constexpr):
    """``Out[g] = sum of the partial rows of group g's programs``, in program order.

    Programs are numbered group after group (:func:`group_tile`), so group g's partial rows
    are the ``cdiv(rows_g, rows_per_prog)`` rows after those of the groups before it.
    """
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    first = tl.load(Offsets) * 0
    count = first
    for h in range(G):
        n = (tl.load(Offsets + h + 1) - tl.load(Offsets + h) + rows_per_prog - 1) // rows_per_prog
        first += tl.where(h < g, n, 0)
        count = tl.where(h == g, n, count)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    row = Part + first.to(tl.int64) * N + cols
    for _ in range(0, count):
        acc += tl.load(row, mask=cmask, other=0.0)
        row += N
    tl.store(Out + g * N + cols, acc, mask=cmask)


def group_column_sums(part: torch.Tensor, offsets: torch.Tensor, rows_per_prog: int) -> torch.Tensor:
    """Per-group sums ``[G, N]`` (fp32) of the ``[programs, N]`` partial rows of a grouped
    backward whose programs each took ``rows_per_prog`` rows (``group_tile`` numbering)."""
    G, N = offsets.numel() - 1, part.shape[1]
    out = new_buffer((G, N), torch.float32, part.device)
    if G and N:
        block_n = min(1024, triton.next_power_of_2(N))
        _group_sum_kernel[(G, triton.cdiv(N, block_n))](part, out, offsets, N, rows_per_prog, G,
                                                       BLOCK_N=block_n, num_warps=4)
    return out


# Launch shapes. Compiled code keeps whole rows in registers: a tile of at least 2048 elements
# spread as 8 per thread (row tile shrinks as N grows, warps grow with it); the interpreter
# pays per program and per op, not per element, so it gets big tiles.
def compiled_row_block(n_block: int) -> int:
    return max(1, 2048 // n_block)


def row_block(n_block: int) -> int:
    return 16 if interpreting() else compiled_row_block(n_block)


def row_warps(n_block: int) -> int:
    return min(32, max(4, n_block * compiled_row_block(n_block) // 256))


def rows_per_program(rows: int, block_rows: int, device: torch.device) -> int:
    """Rows per backward program: about four programs per SM (one per row block when tiny)."""
    if interpreting() or (device.type != "cuda" and not INTERPRET_AS_COMPILED):
        return 2 * block_rows  # several chunks per group even in small tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _MODEL_SMS
    per = triton.cdiv(rows, 4 * sms)
    return max(block_rows, triton.cdiv(per, block_rows) * block_rows)


def layer_norm_fwd_grouped(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    offsets: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of contiguous rows ``x [R, N]``; rows of group g use ``weight[g]``/``bias[g]``.

    ``offsets`` is int32 ``[G+1]`` on x's device. Returns ``(y, mean, rstd)``.
    """
    R, N = x.shape
    G = offsets.numel() - 1
    y = new_buffer((R, N), x.dtype, x.device)
    mean = new_buffer((R,), torch.float32, x.device)
    rstd = new_buffer((R,), torch.float32, x.device)
    if R == 0:
        return y, mean, rstd
    block_n = triton.next_power_of_2(N)
    rows = row_block(block_n)
    grid = (triton.cdiv(R, rows) + G - 1,)
    _layer_norm_fwd_kernel[grid](
        x, y, weight, bias, mean, rstd, offsets, G, N, eps,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_ROWS=rows, BLOCK_N=block_n, num_warps=row_warps(block_n),
    )
    return y, mean, rstd


def layer_norm_bwd_grouped(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, has_bias: bool,
    mean: torch.Tensor, rstd: torch.Tensor, offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`layer_norm_fwd_grouped`: ``(dx, dweight [G, N] | None, dbias | None)``."""
    R, N = x.shape
    G = offsets.numel() - 1
    dx = new_buffer((R, N), x.dtype, x.device)
    block_n = triton.next_power_of_2(N)
    block_rows = row_block(block_n)
    per = rows_per_program(R, block_rows, x.device)
    progs = triton.cdiv(R, per) + G - 1 if R else 0
    part_w = new_buffer((progs if weight is not None else 0, N), torch.float32, x.device)
    part_b = new_buffer((progs if has_bias else 0, N), torch.float32, x.device)
    if progs:
        _layer_norm_bwd_kernel[(progs,)](
            x, dy, dx, weight, mean, rstd, part_w, part_b, offsets, G, N, per,
            HAS_W=weight is not None, HAS_B=has_bias,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=row_warps(block_n),
        )
    dw = group_column_sums(part_w, offsets, per).to(x.dtype) if weight is not None else None
    db = group_column_sums(part_b, offsets, per).to(x.dtype) if has_bias else None
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: autograd and torch.compile see one op each way.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("omni_core::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    offsets = torch.tensor([0, x.numel() // max(N, 1)], dtype=torch.int32, device=x.device)
    y, mean, rstd = layer_norm_fwd_grouped(x.reshape(-1, N).contiguous(), weight, bias, offsets, eps)
    return y.view(x.shape), mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // max(x.shape[-1], 1)
    stats = x.new_empty((rows,), dtype=torch.float32)
    # new_empty, not empty_like: the real y is contiguous whatever x's strides are.
    return x.new_empty(x.shape), stats, stats.clone()


@torch.library.custom_op("omni_core::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, has_bias: bool,
    mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    offsets = torch.tensor([0, x.numel() // max(N, 1)], dtype=torch.int32, device=x.device)
    dx, dw, db = layer_norm_bwd_grouped(
        dy.reshape(-1, N).contiguous(), x.reshape(-1, N).contiguous(), weight, has_bias,
        mean, rstd, offsets,
    )
    return (dx.view(x.shape), dw[0] if dw is not None else x.new_empty((0,)),
            db[0] if db is not None else x.new_empty((0,)))


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, has_bias, mean, rstd):
    N = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((N if weight is not None else 0,)),
            x.new_empty((N if has_bias else 0,)))


def _ln_setup(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # mean/rstd get no gradient: no zero-filled tensors for them


def _ln_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd_op(dy, x, weight, ctx.has_bias, mean, rstd)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


_layer_norm_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup)


def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """The ``triton`` backend of ``omni_core.ops.layer_norm``."""
    return _layer_norm_fwd_op(x, weight, bias, eps)[0]


# ---------------------------------------------------------------------------------------------
# Ahead-of-time configs for benchmarks/kernel_report.py
# ---------------------------------------------------------------------------------------------

_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
# Widths that matter: ONE-PEACE 4B (model 1536, sub-LN over 6144) and the tiny test model. The
# backward keeps a whole row and its partial sums in registers, which spills past 4096 columns;
# the 6144-wide sub-LN backward is the two-sweep kernel in routed_ffn.py, so only its forward
# runs this file's kernels at that width.
_AOT_WIDTHS = (192, 512, 1536, 6144)
_AOT_BWD_MAX = 4096


def aot_configs() -> list[AotConfig]:
    configs = []
    rows = 16384
    for name, ptr in _DTYPES.items():
        elem = {"fp16": 2, "bf16": 2, "fp32": 4}[name]
        for n in _AOT_WIDTHS:
            block_n = triton.next_power_of_2(n)
            block_rows = compiled_row_block(block_n)
            warps = row_warps(block_n)
            common = {"HAS_W": True, "HAS_B": True, "BLOCK_ROWS": block_rows, "BLOCK_N": block_n}
            label = f"N={n} BLOCK_ROWS={block_rows} BLOCK_N={block_n} warps={warps}"
            configs.append(AotConfig(
                kernel="layer_norm_fwd", fn=_layer_norm_fwd_kernel,
                signature={"X": ptr, "Y": ptr, "W": ptr, "B": ptr, "Mean": "*fp32", "Rstd": "*fp32",
                           "Offsets": "*i32", "G": "i32", "N": "i32", "eps": "fp32",
                           **dict.fromkeys(common, "constexpr")},
                constexprs=common, num_warps=warps, num_stages=1, label=label, dtype=name,
                flops=8 * rows * n, min_bytes=2 * rows * n * elem + 8 * rows,
            ))
            if n > _AOT_BWD_MAX:
                continue
            configs.append(AotConfig(
                kernel="layer_norm_bwd", fn=_layer_norm_bwd_kernel,
                signature={"X": ptr, "DY": ptr, "DX": ptr, "W": ptr, "Mean": "*fp32", "Rstd": "*fp32",
                           "PartW": "*fp32", "PartB": "*fp32", "Offsets": "*i32",
                           "G": "i32", "N": "i32", "rows_per_prog": "i32",
                           **dict.fromkeys(common, "constexpr")},
                constexprs=common, num_warps=warps, num_stages=1, label=label, dtype=name,
                flops=14 * rows * n, min_bytes=3 * rows * n * elem + 8 * rows,
            ))
    return configs
