"""``PackedBatch``: every sequence of a step, any modality, as one token stream.

| field        | shape        | meaning                                                  |
|--------------|--------------|----------------------------------------------------------|
| x            | [T, ...]     | all tokens, no padding                                   |
| cu_seqlens   | int32 [B+1]  | sequence boundaries (flash-attn convention)              |
| modality     | int32 [T]    | modality id of each token (0 text, 1 image, 2 audio)     |
| position     | int32 [T]    | position of the token inside its modality segment        |
| max_seqlen   | int          | longest sequence                                         |

The routing plan (tokens stably grouped by modality) is computed once at construction and
reused by every layer through :func:`omni_core.ops.routing.routing_plan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from omni_core.ops.routing import RoutingPlan, routing_plan


@dataclass(frozen=True)
class Segment:
    """A run of tokens of one modality inside a sequence.

    ``position`` defaults to ``0..L-1``; masked views pass the original positions of the
    tokens they keep, so relative-position biases stay those of the unmasked input.
    """

    modality: int
    x: torch.Tensor
    position: torch.Tensor | None = None


@dataclass(frozen=True)
class SegmentSpan:
    sequence: int
    modality: int
    start: int  # packed index of the segment's first token
    length: int


@dataclass(frozen=True)
class PackedBatch:
    x: torch.Tensor
    cu_seqlens: torch.Tensor
    modality: torch.Tensor
    position: torch.Tensor
    max_seqlen: int
    num_modalities: int = 3
    segments: tuple[SegmentSpan, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def plan(self) -> RoutingPlan:
        return routing_plan(self.modality, self.num_modalities)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def with_x(self, x: torch.Tensor) -> PackedBatch:
        """The same layout carrying new token features (e.g. a layer's output)."""
        return replace(self, x=x)

    def unpack(self, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Split ``y`` (default ``x``) of shape ``[T, ...]`` back into per-sequence tensors."""
        y = self.x if y is None else y
        if y.shape[0] != self.num_tokens:
            raise ValueError(f"cannot unpack {y.shape[0]} rows with a layout of {self.num_tokens} tokens")
        return list(torch.split(y, self.lengths))

    @classmethod
    def from_segments(
        cls, sequences: Sequence[Sequence[Segment] | Segment], num_modalities: int = 3
    ) -> PackedBatch:
        """Pack sequences, each a list of segments (unimodal: one; joint: several)."""
        if not sequences:
            raise ValueError("cannot pack an empty list of sequences")
        rows, mods, poss, spans, lengths = [], [], [], [], []
        start = 0
        for s, seq in enumerate(sequences):
            seq = [seq] if isinstance(seq, Segment) else list(seq)
            if not seq:
                raise ValueError(f"sequence {s} has no segments")
            for seg in seq:
                n = seg.x.shape[0]
                if not 0 <= seg.modality < num_modalities:
                    raise ValueError(f"sequence {s}: modality id {seg.modality} outside [0, {num_modalities})")
                pos = seg.position
                if pos is None:
                    pos = torch.arange(n, dtype=torch.int32, device=seg.x.device)
                elif pos.shape != (n,):
                    raise ValueError(f"sequence {s}: position has shape {tuple(pos.shape)}, segment has {n} tokens")
                rows.append(seg.x)
                mods.append(torch.full((n,), seg.modality, dtype=torch.int32, device=seg.x.device))
                poss.append(pos.to(torch.int32))
                spans.append(SegmentSpan(s, seg.modality, start, n))
                start += n
            lengths.append(sum(seg.x.shape[0] for seg in seq))
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        x = torch.cat(rows)
        return cls(x, cu.to(x.device), torch.cat(mods), torch.cat(poss), max(lengths),
                   num_modalities, tuple(spans))


def check_cu_seqlens(cu_seqlens: torch.Tensor, T: int, max_seqlen: int, holder: str) -> None:
    """``cu_seqlens`` must be int32 ``[B+1]``, start at 0, never decrease and end at ``T``
    (the token count of ``holder``); ``max_seqlen`` must cover the longest sequence."""
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [B+1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if bounds[-1] != T:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} (the sequence lengths add up to {bounds[-1]}) "
                         f"but {holder} holds T={T} tokens")
    longest = max(b1 - b0 for b0, b1 in zip(bounds, bounds[1:]))
    if int(max_seqlen) < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")


def _validate(b: PackedBatch) -> None:
    if not isinstance(b.x, torch.Tensor) or b.x.dim() < 1:
        raise ValueError("x must be a tensor [T, ...]")
    T = b.x.shape[0]
    cu = b.cu_seqlens
    check_cu_seqlens(cu, T, b.max_seqlen, "x")
    if b.modality.shape != (T,) or b.modality.dtype.is_floating_point or b.modality.dtype == torch.bool:
        raise TypeError(f"modality must be an integer tensor [T={T}], got {tuple(b.modality.shape)} {b.modality.dtype}")
    if T and (int(b.modality.min()) < 0 or int(b.modality.max()) >= b.num_modalities):
        raise ValueError(
            f"modality ids must lie in [0, {b.num_modalities}), "
            f"got min {int(b.modality.min())} max {int(b.modality.max())}"
        )
    if b.position.shape != (T,) or b.position.dtype != torch.int32:
        raise TypeError(f"position must be int32 [T={T}], got {tuple(b.position.shape)} {b.position.dtype}")
    if T and int(b.position.min()) < 0:
        raise ValueError("positions must be >= 0")
    devices = {n: t.device for n, t in (("x", b.x), ("cu_seqlens", cu), ("modality", b.modality),
                                         ("position", b.position))}
    if len(set(devices.values())) > 1:
        raise ValueError(f"PackedBatch tensors are on different devices: {devices}")
