"""Relative-position lookup tables (LUTs) in the one form ``varlen_attention`` takes.

A LUT ``[P, P]`` maps (query position, key position) inside one modality segment to a row
of that modality's relative-position table; stacking the per-modality LUTs with row
offsets gives the model's ``bias_lut [M, P, P]``, which indexes the concatenation of the
three adapters' tables (``bias_table``). -1 means "no bias" (positions a modality never has).

The buckets are ONE-PEACE's (see ``/work/shared/ONE-PEACE.md`` §6): position 0 is CLS and
gets its own query-row, key-column and corner entries.
"""

from __future__ import annotations

import math

import torch

MAX_POSITION = 1024  # ONE-PEACE builds every 1D bucket table for 1024 positions


def log_bucket(relative: torch.Tensor, bucket_size: int, max_position: int = MAX_POSITION) -> torch.Tensor:
    """ONE-PEACE's 1D bucket of a relative position ``i - j``: exact within ``±bucket_size//2``,
    logarithmic beyond, reaching ``±(bucket_size-1)`` at ``max_position - 1``.

    The logarithm is taken in float32 as upstream does, so the table is bit-identical."""
    mid = bucket_size // 2
    dist = relative.abs()
    ratio = torch.log(dist.clamp(min=mid).float() / mid) / math.log((max_position - 1) / mid)
    far = mid + torch.ceil(ratio * (mid - 1)).long()
    return torch.where(dist <= mid, relative, far * torch.sign(relative))


def bucket_lut_1d(length: int, bucket_size: int, max_position: int = MAX_POSITION) -> tuple[torch.Tensor, int]:
    """LUT of a 1D sequence (CLS at 0) of up to ``length`` positions; returns (lut, table rows).

    Rows ``0..2bs-2`` are the buckets; ``2bs-1`` is the CLS query row, ``2bs`` the CLS key
    column and ``2bs+1`` the CLS-CLS corner: a table of ``2bs+2`` rows."""
    if not 2 <= bucket_size < max_position:
        raise ValueError(f"bucket_size must lie in [2, {max_position}), got {bucket_size}")
    if not 1 <= length <= max_position:
        raise ValueError(f"a 1D LUT covers at most {max_position} positions, asked for {length}")
    pos = torch.arange(length)
    lut = log_bucket(pos[:, None] - pos[None, :], bucket_size, max_position) + bucket_size - 1
    rows = 2 * bucket_size - 1
    lut[0, :] = rows
    lut[:, 0] = rows + 1
    lut[0, 0] = rows + 2
    return lut.to(torch.int32), rows + 3


def beit_lut_2d(grid_h: int, grid_w: int) -> tuple[torch.Tensor, int]:
    """BEiT's 2D relative-position LUT with a CLS token at position 0.

    Patches are row-major (index ``1 + h*grid_w + w``); a patch pair indexes row
    ``(dh + grid_h-1)(2grid_w-1) + (dw + grid_w-1)``; the three extra rows are the CLS
    query row, the CLS key column and the CLS-CLS corner. Returns (lut, table rows)."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + grid_h - 1
    dx = xs[:, None] - xs[None, :] + grid_w - 1
    patch_rows = (2 * grid_h - 1) * (2 * grid_w - 1)
    n = grid_h * grid_w + 1
    lut = torch.empty(n, n, dtype=torch.int64)
    lut[1:, 1:] = dy * (2 * grid_w - 1) + dx
    lut[0, :] = patch_rows
    lut[:, 0] = patch_rows + 1
    lut[0, 0] = patch_rows + 2
    return lut.to(torch.int32), patch_rows + 3


def stack_luts(luts: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, list[int]]:
    """Stack per-modality LUTs into ``[M, P, P]`` with row offsets into one shared table.

    Returns (bias_lut, row offset of each modality + total rows at the end).
    """
    P = max(lut.shape[0] for lut, _ in luts)
    out = torch.full((len(luts), P, P), -1, dtype=torch.int32)
    offsets = [0]
    for m, (lut, rows) in enumerate(luts):
        n = lut.shape[0]
        out[m, :n, :n] = lut + offsets[-1]
        offsets.append(offsets[-1] + rows)
    return out, offsets


def relative_lut(lut: torch.Tensor) -> torch.Tensor:
    """The compact relative form ``[..., 2P-1]`` of a LUT ``[..., P, P]`` whose entries depend
    only on the position difference (entry ``key - query + P - 1``): what
    ``ops.varlen_attention`` reads in O(P) instead of O(P^2). Raises ValueError when the LUT is
    not relative: ONE-PEACE's 1D LUTs give CLS (position 0) its own row and column, and
    BEiT's 2D LUT depends on the row and column offsets of the patch grid, so those stay
    ``[M, P, P]``."""
    P = lut.shape[-1]
    if lut.dim() < 2 or lut.shape[-2] != P:
        raise ValueError(f"expected a LUT [..., P, P], got {tuple(lut.shape)}")
    pos = torch.arange(P)
    diff = pos[None, :] - pos[:, None] + P - 1  # [P, P]: the compact index of every pair
    compact = torch.full((*lut.shape[:-2], 2 * P - 1), -1, dtype=lut.dtype)
    compact[..., diff] = lut  # any pair of a diagonal; checked below
    mismatch = compact[..., diff] != lut
    if bool(mismatch.any()):
        q, k = (int(i) for i in torch.nonzero(mismatch)[0, -2:])
        raise ValueError(f"the LUT is not relative: entry ({q}, {k}) differs from others at key - query = {k - q}")
    return compact
