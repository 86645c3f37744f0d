"""Per-batch memoisation: values derived from a batch's layout tensors (``cu_seqlens``,
``modality``, ``position``) are computed once and reused by every layer.

An entry lives while its key tensors live and are unmodified (weak references plus the
tensors' version counters), so a new batch, or an in-place edit, recomputes it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

_CACHE: dict[tuple, tuple[tuple, tuple[int, ...], Any]] = {}


def memoised(tag: Hashable, tensors: tuple[torch.Tensor | None, ...], compute: Callable[[], Any]) -> Any:
    key = (tag, *(id(t) for t in tensors))
    versions = tuple(t._version if t is not None else -1 for t in tensors)
    hit = _CACHE.get(key)
    if hit is not None:
        refs, hit_versions, value = hit
        if hit_versions == versions and all((r() if r is not None else None) is t for r, t in zip(refs, tensors)):
            return value
    value = compute()
    for stale in [k for k, (refs, _, _) in _CACHE.items() if any(r is not None and r() is None for r in refs)]:
        del _CACHE[stale]
    _CACHE[key] = (tuple(weakref.ref(t) if t is not None else None for t in tensors), versions, value)
    return value
