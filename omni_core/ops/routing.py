"""Routing plan: tokens stably grouped by modality, computed once per batch.

``perm`` lists token indices grouped by modality (stable, so tokens keep their packed
order inside a group); ``offsets[m]:offsets[m+1]`` is modality ``m``'s slice of ``perm``.
Every layer of a forward pass reuses the plan of the batch's ``modality`` tensor: the
plan is memoised against that tensor object (a weak reference plus its version counter),
so the sort and the host sync for the offsets happen once per batch, not per layer.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from omni_core.ops.memo import memoised


@dataclass
class RoutingPlan:
    perm: torch.Tensor  # int64 [T]: packed index of the i-th token in modality order
    inverse: torch.Tensor  # int64 [T]: position of packed token t inside perm
    offsets: torch.Tensor  # int64 [M+1] on the tokens' device
    counts: tuple[int, ...]  # tokens per modality, on the host

    @functools.cached_property
    def perm_i32(self) -> torch.Tensor:
        return self.perm.to(torch.int32)

    @functools.cached_property
    def offsets_i32(self) -> torch.Tensor:
        return self.offsets.to(torch.int32)

    @property
    def num_modalities(self) -> int:
        return len(self.counts)

    def bounds(self, m: int) -> tuple[int, int]:
        start = sum(self.counts[:m])
        return start, start + self.counts[m]


def build_routing_plan(modality: torch.Tensor, num_modalities: int) -> RoutingPlan:
    if modality.dim() != 1 or modality.dtype.is_floating_point or modality.dtype == torch.bool:
        raise ValueError(
            f"modality must be a 1-D integer tensor, got {tuple(modality.shape)} {modality.dtype}"
        )
    if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= num_modalities):
        raise ValueError(
            f"modality ids must lie in [0, {num_modalities}), "
            f"got min {int(modality.min())} max {int(modality.max())}"
        )
    ids = modality.long()
    native = _native_grouping()
    if native is not None and ids.device.type == "cpu":
        perm, counts_t = native(ids, num_modalities)
    else:
        perm = torch.sort(ids, stable=True).indices
        counts_t = torch.bincount(ids, minlength=num_modalities)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    offsets = torch.zeros(num_modalities + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts_t, 0)
    return RoutingPlan(perm, inverse, offsets, tuple(int(c) for c in counts_t.tolist()))


def _native_grouping():
    """The O(T) counting sort of ``omni_core._C`` when built (``OMNI_BACKEND=reference`` skips it)."""
    if os.environ.get("OMNI_BACKEND", "").strip().lower() == "reference":
        return None
    try:
        from omni_core import _C
    except ImportError:
        return None
    return _C.group_by_modality


def routing_plan(modality: torch.Tensor, num_modalities: int) -> RoutingPlan:
    """The plan of ``modality``, memoised while that tensor lives and is unmodified."""
    return memoised(("routing_plan", num_modalities), (modality,),
                    lambda: build_routing_plan(modality, num_modalities))
