"""Relative-position lookup tables (LUTs) in the one form ``varlen_attention`` takes.

A LUT ``[P, P]`` maps (query position, key position) inside one modality segment to a row
of that modality's relative-position table; stacking the per-modality LUTs with row
offsets gives the model's ``bias_lut [M, P, P]``, which indexes the concatenation of the
three adapters' tables (``bias_table``). -1 means "no bias" (positions a modality never has).

The buckets are ONE-PEACE's (see ``/work/shared/ONE-PEACE.md`` §6): position 0 is CLS and
gets its own query-row, key-column and corner entries.

Every table the model builds is relative between positions >= 1 (1D: the bucket of
``i - j``; BEiT's 2D: the row and column offsets), so the model also takes the
CLS-aware compact form ``[M, 2P+2]`` (:func:`stack_cls_relative`): O(P) instead of
O(P^2), read by ``varlen_attention`` at column ``key - query + P - 1`` or, for CLS, at the
three columns after it. A 2D grid becomes 1D relative by spacing its rows ``2W - 1`` apart
(:func:`grid_positions`): then ``key - query = dy (2W - 1) + dx`` with ``|dx| < W``, one
difference per (dy, dx).
"""

from __future__ import annotations

import math

import torch

from omni_core.ops.attention import compact_columns

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
    BEiT's 2D LUT depends on the row and column offsets of the patch grid; those take the
    CLS-aware form instead (:func:`stack_cls_relative`)."""
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


def grid_positions(position: torch.Tensor, width: int) -> torch.Tensor:
    """Positions of a row-major ``width``-wide grid with CLS at 0 (``1 + y*width + x``)
    respaced to ``1 + y*(2*width - 1) + x`` (CLS stays 0): over these a 2D relative LUT is 1D
    relative, since ``key - query`` determines (dy, dx)."""
    patch = (position - 1).clamp(min=0)
    spaced = 1 + patch // width * (2 * width - 1) + patch % width
    return torch.where(position > 0, spaced, position).to(position.dtype)


def cls_relative_lut(lut: torch.Tensor, positions: torch.Tensor, P: int) -> torch.Tensor:
    """The CLS-aware compact form ``[2P+2]`` of one modality's LUT ``[n, n]`` whose row and
    column i belong to the token at ``positions[i]`` (position 0 is CLS; ``arange(n)`` for a
    1D LUT, :func:`grid_positions` of it for a grid). Columns no pair reads are -1. Raises
    ValueError when two pairs that share a column have different entries (the LUT is not
    relative between positions >= 1, or CLS's row/column is not constant)."""
    n = lut.shape[0]
    if lut.shape != (n, n) or positions.shape != (n,):
        raise ValueError(f"expected a LUT [n, n] and positions [n], got {tuple(lut.shape)}, {tuple(positions.shape)}")
    if n and (int(positions.min()) < 0 or int(positions.max()) >= P):
        raise ValueError(f"positions must lie in [0, P={P})")
    pos = positions.long()
    column = compact_columns(pos[:, None], pos[None, :], P, cls=True)
    compact = torch.full((2 * P + 2,), -1, dtype=lut.dtype)
    compact[column] = lut  # any pair of a column; checked below
    mismatch = compact[column] != lut
    if bool(mismatch.any()):
        q, k = (int(i) for i in torch.nonzero(mismatch)[0])
        raise ValueError(f"the LUT has no CLS-aware relative form: entry ({q}, {k}) differs from another pair "
                         f"reading its column")
    return compact


def stack_cls_relative(luts: list[tuple[torch.Tensor, int]],
                       widths: list[int | None]) -> tuple[torch.Tensor, list[int]]:
    """The CLS-aware compact ``[M, 2P+2]`` form of :func:`stack_luts` (same row offsets): a
    modality with a grid width in ``widths`` is read at :func:`grid_positions`, the others at
    their own positions. P covers every modality's largest position. Returns (bias_lut,
    offsets); real (in-range) pairs read exactly the entries of the dense form."""
    positions = [torch.arange(lut.shape[0]) if w is None else grid_positions(torch.arange(lut.shape[0]), w)
                 for (lut, _), w in zip(luts, widths, strict=True)]
    P = max(int(p.max()) + 1 for p in positions)
    rows, offsets = [], [0]
    for (lut, n_rows), pos in zip(luts, positions):
        rows.append(cls_relative_lut(lut + offsets[-1], pos, P))
        offsets.append(offsets[-1] + n_rows)
    return torch.stack(rows).to(torch.int32), offsets
