"""
Varlen attention, the bias gradient
===================================

``d bias_table[e, h]`` is the sum of ``dS`` over every (query, key) pair of head h whose
bias reads entry e. Summed naively, with one fp32 atomic per pair, the learned relative
bias is the worst case for atomics: a log-bucket LUT sends most far-apart pairs to a few
table rows, so thousands of atomics queue on one address. Here there are none:

1. **Reduce inside the tile, along token diagonals.** Every relative LUT the project builds
   gives a pair's entry from its position difference, and inside one modality segment
   positions advance with the tokens: all pairs on one diagonal ``j - i`` of a tile read
   one entry. The kernel skews its ``[BLOCK_M, BLOCK_N]`` tile of ``dS`` (``tl.gather``)
   so that diagonal ``t = j - i + BLOCK_M - 1`` becomes column t, and sums each column per
   entry: a pass takes, on every diagonal, the smallest entry not yet summed. Diagonals
   that cross a segment boundary, or the CLS row and column, hold two or three entries,
   hence two or three passes; a 2-D (BEiT) image LUT has two entries per diagonal of
   row-major patches. The loop runs over the entries *of a diagonal*, not of the tile
   (an arbitrary LUT is still exact, with up to BLOCK_M passes).
2. **Merge equal entries across diagonals** (far diagonals share a log bucket): a
   ``[W, W]`` comparison sums every diagonal's partial into the first diagonal carrying
   the same entry, so each entry is written once per pass.
3. **Private rows, then one reduction.** Each program adds its partials into its own fp32
   row of a ``[programs, NB, H]`` scratch (row ``program_id(0)`` of the flattened schedule:
   one writer, program order, so a read-modify-write needs no atomic); after the launch the
   rows are summed (a torch reduction, deterministic). The program is a query block of the
   deterministic path's dq kernel, or a key block of the fused kernel (whose programs for
   the other key heads of that block write other head columns of the row). Either way the
   gradient is bit-identical from run to run. The scratch is ``(T / BLOCK + B) * NB * H * 4``
   bytes, and not zero-filled by a separate pass: every program, spare ones included, zeroes
   its own row first, so the zeros and the partial sums reach memory as one write of the row
   (a memset before the launch wrote it twice).

The work is skipped for tiles without a biased pair, and the whole gradient is compiled out
(``BIAS_GRAD=False``) when ``bias_table`` needs none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

_NO_ENTRY = tl.constexpr(2147483647)  # larger than any entry: "nothing left on this diagonal"
_ZERO_BLOCK = tl.constexpr(1024)  # entries zeroed per store when a program claims its row


@triton.jit
def _claim_bias_grad_row(DBias, h0, G, NB, H):
    """This program's private row of ``DBias [programs, NB, H]`` (row ``program_id(0)``), its
    head columns ``h0 .. h0 + G - 1`` zeroed; call before any early return, so that every
    row the launch's grid covers is written."""
    row = DBias + tl.program_id(0).to(tl.int64) * NB * H
    offs = tl.arange(0, _ZERO_BLOCK)
    for g in range(0, G):
        for start in range(0, NB, _ZERO_BLOCK):
            e = start + offs
            tl.store(row + e * H + h0 + g, tl.zeros([_ZERO_BLOCK], tl.float32), mask=e < NB)
    tl.debug_barrier()  # the first read-modify-write must see the zeros
    return row


@triton.jit
def _accumulate_bias_grad(DBias, entry, ds, h, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add the tile's ``ds`` (fp32 ``[BLOCK_M, BLOCK_N]``, ``entry`` -1 where no bias
    applies) into this block's private row ``DBias [NB, H]``, per entry, no atomics. The
    tile may be transposed (keys as rows, as the fused kernel holds it): its diagonals are
    the same pairs."""
    if tl.max(tl.max(entry, 1), 0) >= 0:
        W: tl.constexpr = 2 * max(BLOCK_M, BLOCK_N)  # diagonals t = j - i + BLOCK_M - 1 < W
        rows = tl.arange(0, BLOCK_M)
        diag = tl.arange(0, W)
        col = diag[None, :] + rows[:, None] - (BLOCK_M - 1)  # [BLOCK_M, W]: key of (row, diagonal)
        inside = (col >= 0) & (col < BLOCK_N)
        col = tl.where(inside, col, 0)
        ent = tl.where(inside, tl.gather(entry, col, 1), -1)
        val = tl.where(inside, tl.gather(ds, col, 1), 0.0)
        ent = tl.where(ent >= 0, ent, _NO_ENTRY)
        first = tl.min(ent, 0)  # [W]: smallest entry left on each diagonal
        while tl.min(first, 0) < _NO_ENTRY:
            hit = ent == first[None, :]
            part = tl.sum(tl.where(hit, val, 0.0), 0)
            # Diagonals sharing an entry: the first of them writes the sum of all.
            same = first[:, None] == first[None, :]
            total = tl.sum(tl.where(same, part[None, :], 0.0), 1)
            earlier = tl.sum((same & (diag[None, :] < diag[:, None])).to(tl.int32), 1)
            write = (first < _NO_ENTRY) & (earlier == 0)
            slot = DBias + tl.where(write, first, 0) * H + h
            tl.store(slot, tl.load(slot, mask=write, other=0.0) + total, mask=write)
            tl.debug_barrier()  # the next read-modify-write of this row must see these stores
            ent = tl.where(hit, _NO_ENTRY, ent)
            first = tl.min(ent, 0)


def bias_grad_buffer(programs: int, NB: int, H: int, bias_grad: bool, device: torch.device,
                     empty: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The fp32 scratch, one ``[NB, H]`` row per program of grid dimension 0 (the kernel
    zeroes its rows: allocated by ``empty``, not zero-filled), or a 1-element dummy without
    a bias gradient."""
    if not bias_grad:
        return torch.zeros(1, dtype=torch.float32, device=device)
    if NB * H >= 2**31:
        raise ValueError(f"the bias-gradient scratch rows ({NB} x {H}) need int32 offsets: fewer table rows or "
                         "heads per call")
    return empty((programs, NB, H), torch.float32, device)


def finish_bias_grad(scratch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``d bias_table``: the private rows summed."""
    return scratch.sum(0).to(dtype)
