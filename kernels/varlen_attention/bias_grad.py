"""
Varlen attention, the bias gradient
===================================

``d bias_table[e, h]`` is the sum of ``dS`` over every (query, key) pair of head h whose
bias reads entry e. The dq kernel calls :func:`_accumulate_bias_grad` once per tile with
the tile's entries (-1 where no bias applies) and ``dS``. Two modes:

* ``fast`` (the default): fp32 atomics into ``[NB, H]``; the summation order (the last
  bits) changes from run to run.
* ``deterministic``: the tile is reduced per distinct entry, in increasing entry order,
  into a private partial row per query block (scratch ``[rows, NB, H]``), and the rows are
  summed after the launch: bit-identical across runs.

``torch.use_deterministic_algorithms(True)``, ``OMNI_ATTN_BIAS_GRAD=deterministic`` or
:func:`bias_grad_mode_override` (flash-attn's ``deterministic=True``) select the second.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl


@triton.jit
def _accumulate_bias_grad(DBias, entry, ds, h, H, NB, DETERMINISTIC: tl.constexpr):
    """Add the tile's ``ds`` into the bias gradient: per entry in order into this query
    block's private row (DETERMINISTIC), else one fp32 atomic per biased pair."""
    if DETERMINISTIC:
        # Visit the tile's distinct entries in increasing order; padding and
        # unbiased pairs hold entry -1 (or NB) and are skipped.
        ent = tl.where(entry >= 0, entry, NB)
        e = tl.min(tl.min(ent, 1), 0)
        while e < NB:
            hit = ent == e
            part = tl.sum(tl.sum(tl.where(hit, ds, 0.0), 1), 0)
            slot = DBias + e * H + h
            tl.store(slot, tl.load(slot) + part)
            tl.debug_barrier()  # the next tile's read-modify-write must see this store
            ent = tl.where(hit, NB, ent)
            e = tl.min(tl.min(ent, 1), 0)
    else:
        tl.atomic_add(DBias + entry.to(tl.int64) * H + h, ds, mask=entry >= 0, sem="relaxed")


def bias_grad_buffer(T: int, B: int, NB: int, H: int, min_block_m: int, bias_grad: bool, deterministic: bool,
                     device: torch.device) -> torch.Tensor:
    """Zeroed fp32 accumulator the dq kernel writes: ``[NB, H]`` (fast), ``[rows, NB, H]``
    with one private row per query block (deterministic: row ``start // BLOCK_M + b + qb``
    is below ``T // BLOCK_M + B + 1``), or a 1-element dummy without a bias gradient."""
    if deterministic:
        return torch.zeros((T // min_block_m + B + 1, NB, H), dtype=torch.float32, device=device)
    return torch.zeros((NB if bias_grad else 1, H), dtype=torch.float32, device=device)


def finish_bias_grad(buffer: torch.Tensor, deterministic: bool, dtype: torch.dtype) -> torch.Tensor:
    """``d bias_table`` from the accumulator: the private rows summed (deterministic)."""
    return (buffer.sum(0) if deterministic else buffer).to(dtype)


_MODE_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("bias_grad_mode", default=None)


@contextlib.contextmanager
def bias_grad_mode_override(mode: str) -> Iterator[None]:
    """Calls made inside use ``mode`` for their bias gradient (flash-attn's
    ``deterministic=True``); the mode is fixed at the forward call, not at backward."""
    if mode not in ("fast", "deterministic"):
        raise ValueError(f"bias gradient mode {mode!r}: expected 'fast' or 'deterministic'")
    token = _MODE_OVERRIDE.set(mode)
    try:
        yield
    finally:
        _MODE_OVERRIDE.reset(token)


def bias_grad_mode() -> str:
    """The mode set by :func:`bias_grad_mode_override`, else ``"deterministic"`` when
    ``torch.use_deterministic_algorithms(True)`` is on or ``OMNI_ATTN_BIAS_GRAD=deterministic``;
    otherwise ``"fast"`` (atomics, the default)."""
    if _MODE_OVERRIDE.get() is not None:
        return _MODE_OVERRIDE.get()
    forced = os.environ.get("OMNI_ATTN_BIAS_GRAD", "").strip().lower()
    if forced not in ("", "fast", "deterministic"):
        raise ValueError(f"OMNI_ATTN_BIAS_GRAD={forced!r}: expected 'fast' or 'deterministic'")
    if forced:
        return forced
    return "deterministic" if torch.are_deterministic_algorithms_enabled() else "fast"
