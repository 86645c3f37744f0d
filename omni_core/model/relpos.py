"""Relative-position lookup tables (LUTs) in the one form ``varlen_attention`` takes.

A LUT ``[P, P]`` maps (query position, key position) inside one modality segment to a row
of that modality's slice of the layer's ``bias_table``; -1 means "no bias". Stacking the
per-modality LUTs (with row offsets) gives the ``[M, P, P]`` ``bias_lut`` of the model.
"""

from __future__ import annotations

import math

import torch


def log_bucket(relative: torch.Tensor, bucket_size: int, max_distance: int) -> torch.Tensor:
    """ONE-PEACE-style 1D bucketing: exact within ``±bucket_size//2``, logarithmic beyond,
    saturating at ``max_distance``. Returns buckets in ``[-(bucket_size-1), bucket_size-1]``."""
    half = bucket_size // 2
    dist = relative.abs()
    near = dist < half
    ratio = torch.log(dist.clamp(min=half).double() / half) / math.log(max(max_distance - 1, half + 1) / half)
    far = (half + torch.ceil(ratio * (half - 1))).long().clamp(max=bucket_size - 1)
    return torch.where(near, relative, far * torch.sign(relative))


def bucket_lut_1d(length: int, bucket_size: int) -> tuple[torch.Tensor, int]:
    """LUT for a 1D sequence of ``length`` positions; returns (lut, number of rows)."""
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]
    lut = log_bucket(rel, bucket_size, max(length, bucket_size)) + bucket_size - 1
    return lut.to(torch.int32), 2 * bucket_size - 1


def beit_lut_2d(grid_h: int, grid_w: int) -> tuple[torch.Tensor, int]:
    """BEiT's 2D relative-position LUT with a CLS token at position 0.

    Patch pairs index ``(2h-1)(2w-1)`` rows by their (dy, dx); the three extra rows are
    CLS→patch, patch→CLS and CLS→CLS. Returns (lut ``[1+h*w, 1+h*w]``, number of rows).
    """
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + grid_h - 1
    dx = xs[:, None] - xs[None, :] + grid_w - 1
    patch_rows = (2 * grid_h - 1) * (2 * grid_w - 1)
    n = grid_h * grid_w + 1
    lut = torch.empty(n, n, dtype=torch.int64)
    lut[1:, 1:] = dy * (2 * grid_w - 1) + dx
    lut[0, 1:] = patch_rows
    lut[1:, 0] = patch_rows + 1
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
