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
from dataclasses import dataclass

import torch

from omni_core.ops import dispatch
from omni_core.ops.memo import memoised
from omni_core.ops.packing import check_cu_seqlens

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
    # Value checks read the layout tensors back to the host: once per batch, not per layer.
    memoised(("checked cu_seqlens", T, int(max_seqlen)), (cu_seqlens,),
             lambda: check_cu_seqlens(cu_seqlens, T, max_seqlen, "q"))

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
    NB = bias_table.shape[0]
    memoised(("checked bias layout", NB), (modality, position, bias_lut),
             lambda: _check_bias_layout(modality, position, bias_lut, NB))


def _check_bias_layout(modality: torch.Tensor, position: torch.Tensor, bias_lut: torch.Tensor, NB: int) -> None:
    M, P = bias_lut.shape[0], bias_lut.shape[1]
    if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= M):
        raise ValueError(f"modality ids must lie in [0, {M}) (bias_lut has M={M})")
    if position.numel() and (int(position.min()) < 0 or int(position.max()) >= P):
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

    Sequences of similar length are batched together (padded, padding keys masked) so a
    pack of many sequences costs few matmuls. Tokens are gathered once and the buckets
    are split off (not sliced or indexed per bucket), so the backward pass concatenates
    the buckets' gradients instead of scattering each into a zero-filled [T, H, Dh];
    gathers use index_select, whose backward is a plain index_add (no sort).
    """
    T, H, Dh = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(Dh)
    layout = memoised("varlen_layout", (cu_seqlens, modality, position, bias_lut),
                      lambda: _bucket_layout(cu_seqlens, modality, position, bias_lut))
    if not layout.buckets:
        return q.new_zeros(q.shape)
    grouped = [torch.split(t.index_select(0, layout.gather), layout.sizes) for t in (q, k, v)]
    outs = []
    for (L, n), qg, kg, vg, key_valid, bias_rows in zip(layout.buckets, *grouped, layout.key_valid,
                                                         layout.bias_rows):
        qg, kg, vg = (t.view(n, L, H, Dh).transpose(1, 2) for t in (qg, kg, vg))  # [n, H, L, Dh]
        logits = torch.matmul(qg, kg.transpose(-1, -2)) * scale
        if bias_table is not None:
            entry, keep = bias_rows
            bias = bias_table.index_select(0, entry).view(n, L, L, H) * keep
            logits = logits + bias.permute(0, 3, 1, 2).to(logits.dtype)
        if key_valid is not None:
            logits = logits.masked_fill(~key_valid, float("-inf"))
        outs.append(torch.matmul(torch.softmax(logits, dim=-1), vg).transpose(1, 2).reshape(n * L, H, Dh))
    return torch.cat(outs).index_select(0, layout.rows_of_tokens)


@dataclass
class _BucketLayout:
    buckets: list[tuple[int, int]]  # (padded length, number of sequences) per bucket
    sizes: list[int]  # padded rows per bucket
    gather: torch.Tensor  # packed token of each padded row (a sequence's own token for padding)
    rows_of_tokens: torch.Tensor  # padded row holding each packed token
    key_valid: list  # per bucket: [n, 1, 1, L] mask of real keys, or None without padding
    bias_rows: list  # per bucket: (flat bias_table rows, [n, L, L, 1] mask), or None


def _bucket_layout(cu_seqlens: torch.Tensor, modality: torch.Tensor | None, position: torch.Tensor | None,
                   bias_lut: torch.Tensor | None, ratio: float = 1.1, small: int = 0) -> _BucketLayout:
    """Everything that depends only on the batch layout, computed once per batch.

    Sequences sorted by length are cut into buckets whose longest member is at most
    ``ratio`` times (or ``small`` tokens beyond) the shortest: few batched matmuls per
    pack, and little padding, whose keys are masked out (so results are exact).
    """
    device = cu_seqlens.device
    starts, lengths = cu_seqlens[:-1].tolist(), (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    order = sorted((L, s) for s, L in enumerate(lengths) if L > 0)
    members: list[list[int]] = []
    for L, s in order:
        if members and L <= max(ratio * lengths[members[-1][0]], lengths[members[-1][0]] + small):
            members[-1].append(s)
        else:
            members.append([s])
    buckets, gathers, valids, rows = [], [], [], torch.empty(int(cu_seqlens[-1]), dtype=torch.long)
    offset = 0
    for seqs in members:
        L = max(lengths[s] for s in seqs)
        start = torch.tensor([starts[s] for s in seqs])[:, None]
        length = torch.tensor([lengths[s] for s in seqs])[:, None]
        step = torch.arange(L)[None, :]
        valid = step < length
        gathers.append(torch.where(valid, start + step, start).flatten())
        rows[(start + step)[valid]] = offset + torch.nonzero(valid.flatten()).flatten()
        valids.append(valid[:, None, None, :].to(device) if not bool(valid.all()) else None)
        buckets.append((L, len(seqs)))
        offset += L * len(seqs)
    sizes = [L * n for L, n in buckets]
    gather = torch.cat(gathers).to(device) if gathers else torch.empty(0, dtype=torch.long, device=device)
    bias_rows = [None] * len(buckets)
    if bias_lut is not None:
        bias_rows = [_bias_rows(idx.view(n, L), bias_lut, modality, position)
                     for (L, n), idx in zip(buckets, torch.split(gather, sizes))]
    return _BucketLayout(buckets, sizes, gather, rows.to(device), valids, bias_rows)


def _bias_rows(idx: torch.Tensor, bias_lut: torch.Tensor, modality: torch.Tensor,
               position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sequences with token indices ``idx [n, L]``: the bias_table row of every
    (query, key) pair, flattened, and the mask of pairs that get a bias (same modality,
    LUT entry >= 0) as ``[n, L, L, 1]``."""
    mod = modality[idx].long()
    pos = position[idx].long()
    entry = bias_lut[mod[:, :, None], pos[:, :, None], pos[:, None, :]].long()
    keep = (mod[:, :, None] == mod[:, None, :]) & (entry >= 0)
    return entry.clamp(min=0).flatten(), keep[..., None]


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
