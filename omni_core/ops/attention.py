"""``varlen_attention``: attention over packed variable-length sequences with an
optional learned per-modality relative-position bias.

Contract (the Triton kernel in ``kernels/varlen_attention.py`` implements exactly this):
q, k, v ``[T, H, Dh]``; ``cu_seqlens`` int32 ``[B+1]``; a token attends only to tokens of
its own sequence; the scale defaults to ``1/sqrt(Dh)``. With ``bias_table [NB, H]`` and
``bias_lut`` int32 ``[M, P, P]`` (plus ``modality [T]`` and ``position`` int32 ``[T]``), the
logit of query i and key j of one sequence gets ``bias_table[bias_lut[m, pos[i], pos[j]], h]``
when ``modality[i] == modality[j] == m`` and that LUT entry is >= 0; otherwise nothing.
"""

from __future__ import annotations

import math

import torch

from omni_core.ops import dispatch

OP = "varlen_attention"


def validate_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    bias_table: torch.Tensor | None,
    bias_lut: torch.Tensor | None,
    modality: torch.Tensor | None,
    position: torch.Tensor | None,
) -> None:
    """Raise ValueError/TypeError naming the problem; shared by every backend."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, Dh], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes disagree: {q.dtype}, {k.dtype}, {v.dtype}")
    tensors = {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens}
    optional = {"bias_table": bias_table, "bias_lut": bias_lut, "modality": modality,
                "position": position}
    tensors.update({n: t for n, t in optional.items() if t is not None})
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")

    T = q.shape[0]
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [B+1] with B >= 1, got {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but q holds T={T} tokens")
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if int(max_seqlen) < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")

    given = [n for n, t in optional.items() if t is not None]
    if not given:
        return
    if len(given) != 4:
        missing = sorted(set(optional) - set(given))
        raise ValueError(f"the bias needs bias_table, bias_lut, modality and position; missing {missing}")
    H = q.shape[1]
    if bias_table.dim() != 2 or bias_table.shape[1] != H:
        raise ValueError(f"bias_table must be [NB, H={H}], got {tuple(bias_table.shape)}")
    if not bias_table.dtype.is_floating_point:
        raise TypeError(f"bias_table must be floating point, got {bias_table.dtype}")
    if bias_lut.dtype != torch.int32 or bias_lut.dim() != 3 or bias_lut.shape[1] != bias_lut.shape[2]:
        raise ValueError(f"bias_lut must be int32 [M, P, P], got {tuple(bias_lut.shape)} {bias_lut.dtype}")
    if modality.shape != (T,) or modality.dtype.is_floating_point:
        raise ValueError(f"modality must be an integer [T={T}] tensor, got {tuple(modality.shape)} {modality.dtype}")
    if position.shape != (T,) or position.dtype != torch.int32:
        raise ValueError(f"position must be int32 [T={T}], got {tuple(position.shape)} {position.dtype}")
    M, P = bias_lut.shape[0], bias_lut.shape[1]
    NB = bias_table.shape[0]
    if T and (int(modality.min()) < 0 or int(modality.max()) >= M):
        raise ValueError(f"modality ids must lie in [0, {M}) (bias_lut has M={M})")
    if T and (int(position.min()) < 0 or int(position.max()) >= P):
        raise ValueError(
            f"positions must lie in [0, {P}) (bias_lut is [M, {P}, {P}]), "
            f"got min {int(position.min())} max {int(position.max())}"
        )
    if bias_lut.numel() and (int(bias_lut.min()) < -1 or int(bias_lut.max()) >= NB):
        raise ValueError(
            f"bias_lut entries must be -1 (no bias) or in [0, {NB}) (bias_table rows), "
            f"got min {int(bias_lut.min())} max {int(bias_lut.max())}"
        )


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    bias_table: torch.Tensor | None = None,
    bias_lut: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch, any dtype (float64 is the ground truth).

    Sequences of equal length are batched together so a pack of many short sequences
    costs few matmuls. Tokens are gathered once into length order and the groups are
    split off (not sliced or indexed per group), so the backward pass concatenates the
    groups' gradients instead of scattering each group into a zero-filled [T, H, Dh].
    """
    T, H, Dh = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(Dh)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_order = torch.sort(lengths, stable=True).indices
    sorted_lengths = lengths[seq_order]
    first = torch.cumsum(sorted_lengths, 0) - sorted_lengths  # start of each sequence after sorting
    perm = (torch.repeat_interleave(cu_seqlens[:-1].long()[seq_order], sorted_lengths)
            + torch.arange(T, device=q.device) - torch.repeat_interleave(first, sorted_lengths))
    group_lengths, group_counts = torch.unique_consecutive(sorted_lengths, return_counts=True)
    groups = [(L, n) for L, n in zip(group_lengths.tolist(), group_counts.tolist()) if L > 0]
    if not groups:
        return q.new_zeros(q.shape)
    sizes = [L * n for L, n in groups]
    outs = []
    for (L, n), qg, kg, vg, idx in zip(groups, *(torch.split(t[perm], sizes) for t in (q, k, v)),
                                        torch.split(perm, sizes)):
        qg, kg, vg = (t.view(n, L, H, Dh).transpose(1, 2) for t in (qg, kg, vg))  # [n, H, L, Dh]
        logits = torch.matmul(qg, kg.transpose(-1, -2)) * scale
        if bias_table is not None:
            bias = _gathered_bias(idx.view(n, L), bias_table, bias_lut, modality, position)
            logits = logits + bias.to(logits.dtype)
        probs = torch.softmax(logits, dim=-1)
        outs.append(torch.matmul(probs, vg).transpose(1, 2).reshape(n * L, H, Dh))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(T, device=q.device)
    return torch.cat(outs)[inverse]


def _gathered_bias(
    idx: torch.Tensor,
    bias_table: torch.Tensor,
    bias_lut: torch.Tensor,
    modality: torch.Tensor,
    position: torch.Tensor,
) -> torch.Tensor:
    """Bias ``[n, H, L, L]`` for the sequences whose token indices are ``idx [n, L]``."""
    mod = modality[idx].long()
    pos = position[idx].long()
    entry = bias_lut[mod[:, :, None], pos[:, :, None], pos[:, None, :]].long()
    keep = (mod[:, :, None] == mod[:, None, :]) & (entry >= 0)
    bias = bias_table[entry.clamp(min=0)] * keep[..., None].to(bias_table.dtype)
    return bias.permute(0, 3, 1, 2)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    softmax_scale: float | None = None,
    bias_table: torch.Tensor | None = None,
    bias_lut: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over packed sequences; see the module docstring for the contract.

    Returns ``[T, H, Dh]`` in q's dtype. Differentiable in q, k, v and ``bias_table``.
    """
    validate_varlen_attention(q, k, v, cu_seqlens, max_seqlen, bias_table, bias_lut,
                              modality, position)
    _, impl = dispatch.resolve(OP, q.device)
    return impl(q, k, v, cu_seqlens, int(max_seqlen), softmax_scale, bias_table, bias_lut,
                modality, position)


dispatch.register(OP, "reference", lambda: varlen_attention_reference)
