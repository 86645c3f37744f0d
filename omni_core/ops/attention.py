"""``varlen_attention``: attention over packed variable-length sequences with an
optional learned per-modality relative-position bias: self-attention, causal and
cross-attention, grouped-query heads (the decode step over a KV cache is
:mod:`omni_core.ops.kvcache`).

Contract (the Triton kernel in ``kernels/varlen_attention/`` implements exactly this):

* q ``[Tq, H, Dh]``, k and v ``[Tk, Hk, Dh]``; ``cu_seqlens`` int32 ``[B+1]`` splits q (and
  k, v when ``cu_seqlens_k`` is not given: self-attention) into B sequences; with
  ``cu_seqlens_k`` (cross-attention) query sequence b attends to key sequence b only. A
  query with no key to attend to (an empty key sequence, or a causal row before the first
  key) outputs 0 and has log-sum-exp -inf.
* Grouped-query / multi-query attention: Hk divides H; query head h reads key/value head
  ``h // (H // Hk)``.
* ``causal=True`` as flash-attn >= 2.1, aligned bottom-right: with Lq queries and Lk keys
  in sequence b, query i may attend key j iff ``j <= i + Lk - Lq``.
* The scale defaults to ``1/sqrt(Dh)``.
* Bias (self-attention only): with ``bias_table [NB, H]`` and ``bias_lut`` int32
  ``[M, P, P]`` (plus ``modality [T]`` and ``position`` int32 ``[T]``), the logit of query i
  and key j of one sequence gets ``bias_table[bias_lut[m, pos[i], pos[j]], h]`` when
  ``modality[i] == modality[j] == m`` and that LUT entry is >= 0; otherwise nothing.
  A LUT that depends only on position differences can be given in the compact relative form
  ``[M, 2P-1]`` (odd width), read as ``bias_lut[m, pos[j] - pos[i] + P - 1]``: O(P) instead
  of O(P^2) (``omni_core.model.relpos.relative_lut`` converts). One that is relative except
  for position 0 (CLS: its own query row, key column and corner, as ONE-PEACE's and BEiT's
  tables) takes the CLS-aware compact form ``[M, 2P+2]`` (even width): column
  ``pos[j] - pos[i] + P - 1`` when both positions are >= 1, else column ``2P-1`` (query is
  CLS), ``2P`` (key is CLS) or ``2P+1`` (both) (``relpos.cls_relative_lut`` converts; a 2-D
  image bias becomes 1-D relative over ``relpos.grid_positions``).
* ``return_lse=True`` returns ``(out, lse)`` with lse ``[H, Tq]`` in natural log, float32
  (float64 for float64 inputs), as flash-attn's varlen LSE.

Backends and modes. Plain self-attention (equal heads, no causal mask, no LSE) is what every
backend implements. The other modes — ``"causal"``, ``"cross"`` (``cu_seqlens_k``), ``"gqa"``
(Hk < H), ``"lse"`` and ``"relative_lut"`` (either compact LUT form) — are run by a
backend only when its implementation lists them in a ``modes`` attribute (a set of those
names); the call then passes ``causal``, ``cu_seqlens_k``, ``max_seqlen_k`` and
``return_lse`` as keywords (``"relative_lut"`` needs none: the LUT's shape says it).
**Rule:** when the backend
chosen automatically for the device does not implement a mode the call uses, the torch
reference runs it; a backend forced with ``OMNI_BACKEND`` that lacks the mode is a
:class:`~omni_core.ops.dispatch.BackendUnavailable` error naming the mode (a forced backend
never falls back silently).
``deterministic=True`` (flash-attn's flag) is passed on to a backend that lists
``"deterministic"`` in its modes (the Triton kernel, whose fast backward sums ``dq`` by
atomics); the others are deterministic as they are and never see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from omni_core.ops import dispatch
from omni_core.ops.memo import memoised
from omni_core.ops.packing import check_cu_seqlens

OP = "varlen_attention"
MODES = ("causal", "cross", "gqa", "lse", "relative_lut")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cross: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, Dh], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if v.shape != k.shape or k.shape[2] != q.shape[2] or (not cross and k.shape[0] != q.shape[0]):
        raise ValueError(f"q, k, v shapes disagree: {shapes} (k and v must be [T{'k' if cross else ''}, Hk, Dh])")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q, k, v shapes disagree: {shapes}: the key/value heads Hk={k.shape[1]} must "
                         f"divide the query heads H={q.shape[1]} (grouped-query attention)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes disagree: {q.dtype}, {k.dtype}, {v.dtype}")


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
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> None:
    """Raise ValueError/TypeError naming the problem; shared by every backend."""
    cross = cu_seqlens_k is not None
    _check_qkv(q, k, v, cross)
    optional = {"bias_table": bias_table, "bias_lut": bias_lut, "modality": modality, "position": position}
    given = [n for n, t in optional.items() if t is not None]
    if given and cross:
        raise ValueError(f"the relative-position bias is a self-attention feature: {', '.join(given)} "
                         "cannot be combined with cu_seqlens_k (cross-attention)")
    tensors = {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens}
    if cross:
        tensors["cu_seqlens_k"] = cu_seqlens_k
    tensors.update({n: t for n, t in optional.items() if t is not None})
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")

    T = q.shape[0]
    # Value checks read the layout tensors back to the host: once per batch, not per layer.
    memoised(("checked cu_seqlens", T, int(max_seqlen)), (cu_seqlens,),
             lambda: check_cu_seqlens(cu_seqlens, T, max_seqlen, "q"))
    if cross:
        if cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(f"cu_seqlens_k must have the B+1={cu_seqlens.numel()} entries of cu_seqlens "
                             f"(one key sequence per query sequence), got shape {tuple(cu_seqlens_k.shape)}")
        if max_seqlen_k is None:
            raise ValueError("max_seqlen_k is required with cu_seqlens_k")
        memoised(("checked cu_seqlens", k.shape[0], int(max_seqlen_k)), (cu_seqlens_k,),
                 lambda: check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "k"))

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
    dense = bias_lut.dim() == 3 and bias_lut.shape[1] == bias_lut.shape[2]
    relative = bias_lut.dim() == 2 and (bias_lut.shape[1] % 2 == 1 or bias_lut.shape[1] >= 4)
    if bias_lut.dtype != torch.int32 or not (dense or relative):
        raise ValueError(f"bias_lut must be int32 [M, P, P], the compact relative [M, 2P-1] (odd width) or the "
                         f"CLS-aware compact [M, 2P+2] (even width), got {tuple(bias_lut.shape)} {bias_lut.dtype}")
    if modality.shape != (T,) or modality.dtype.is_floating_point:
        raise ValueError(f"modality must be an integer [T={T}] tensor, got {tuple(modality.shape)} {modality.dtype}")
    if position.shape != (T,) or position.dtype != torch.int32:
        raise ValueError(f"position must be int32 [T={T}], got {tuple(position.shape)} {position.dtype}")
    NB = bias_table.shape[0]
    memoised(("checked bias layout", NB), (modality, position, bias_lut),
             lambda: _check_bias_layout(modality, position, bias_lut, NB))


def lut_positions(bias_lut: torch.Tensor) -> int:
    """P, the number of positions a LUT covers: ``[M, P, P]``, compact ``[M, 2P-1]`` or
    CLS-aware compact ``[M, 2P+2]``."""
    if bias_lut.dim() == 3:
        return bias_lut.shape[1]
    width = bias_lut.shape[1]
    return (width + 1) // 2 if width % 2 else (width - 2) // 2


def lut_columns(bias_lut: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
    """Column of a compact LUT (``[M, 2P-1]`` or CLS-aware ``[M, 2P+2]``) read by query
    positions ``pos_q`` and key positions ``pos_k`` (broadcast, int64)."""
    return compact_columns(pos_q, pos_k, lut_positions(bias_lut), cls=bias_lut.shape[1] % 2 == 0)


def compact_columns(pos_q: torch.Tensor, pos_k: torch.Tensor, P: int, cls: bool) -> torch.Tensor:
    """Compact-LUT column of (query, key) positions: ``pos_k - pos_q + P - 1``; with ``cls``
    position 0 reads its own columns: ``2P-1`` (CLS query), ``2P`` (CLS key), ``2P+1`` (both)."""
    column = pos_k - pos_q + P - 1
    if not cls:
        return column
    cls_q, cls_k = pos_q == 0, pos_k == 0
    return torch.where(cls_q, torch.where(cls_k, 2 * P + 1, 2 * P - 1), torch.where(cls_k, 2 * P, column))


def _check_bias_layout(modality: torch.Tensor, position: torch.Tensor, bias_lut: torch.Tensor, NB: int) -> None:
    M, P = bias_lut.shape[0], lut_positions(bias_lut)
    if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= M):
        raise ValueError(f"modality ids must lie in [0, {M}) (bias_lut has M={M})")
    if position.numel() and (int(position.min()) < 0 or int(position.max()) >= P):
        raise ValueError(
            f"positions must lie in [0, {P}) (bias_lut {tuple(bias_lut.shape)} covers {P} positions), "
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
    *,
    causal: bool = False,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, any dtype (float64 is the ground truth); every mode of the contract.

    Sequences of similar length are batched together (padded, padding keys masked) so a
    pack of many sequences costs few matmuls. Tokens are gathered once and the buckets
    are split off (not sliced or indexed per bucket), so the backward pass concatenates
    the buckets' gradients instead of scattering each into a zero-filled [T, H, Dh];
    gathers use index_select, whose backward is a plain index_add (no sort). Grouped-query
    heads multiply the G query heads of a group as G*Lq rows against their shared key head,
    so k and v are never repeated.
    """
    T, H, Dh = q.shape
    Hk = k.shape[1]
    G = H // Hk
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(Dh)
    layout = memoised(("varlen_layout", bool(causal)), (cu_seqlens, cu_seqlens_k, modality, position, bias_lut),
                      lambda: _bucket_layout(cu_seqlens, cu_seqlens_k, causal, modality, position, bias_lut))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not layout.buckets:
        out = q.new_zeros(q.shape)
        return (out, q.new_full((H, T), float("-inf"), dtype=lse_dtype)) if return_lse else out
    qs = torch.split(q.index_select(0, layout.q_gather), layout.q_sizes)
    ks, vs = (torch.split(t.index_select(0, layout.k_gather), layout.k_sizes) for t in (k, v))
    outs, lses = [], []
    for (Lq, Lk, n), qg, kg, vg, mask, bias_rows in zip(layout.buckets, qs, ks, vs, layout.masks, layout.bias_rows):
        qg = qg.view(n, Lq, Hk, G, Dh).permute(0, 2, 3, 1, 4).reshape(n, Hk, G * Lq, Dh)
        kg, vg = (t.view(n, Lk, Hk, Dh).transpose(1, 2) for t in (kg, vg))  # [n, Hk, Lk, Dh]
        logits = (torch.matmul(qg, kg.transpose(-1, -2)) * scale).view(n, H, Lq, Lk)
        if bias_table is not None:
            entry, keep = bias_rows
            bias = bias_table.index_select(0, entry).view(n, Lq, Lk, H) * keep
            logits = logits + bias.permute(0, 3, 1, 2).to(logits.dtype)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs, lse = _softmax(logits, layout.may_be_empty, return_lse)
        out = torch.matmul(probs.view(n, Hk, G * Lq, Lk), vg).view(n, H, Lq, Dh)
        outs.append(out.transpose(1, 2).reshape(n * Lq, H, Dh))
        if return_lse:
            lses.append(lse.permute(0, 2, 1).reshape(n * Lq, H))
    out = torch.cat(outs).index_select(0, layout.rows_of_tokens)
    if not return_lse:
        return out
    return out, torch.cat(lses).index_select(0, layout.rows_of_tokens).t().to(lse_dtype).contiguous()


def _softmax(logits: torch.Tensor, may_be_empty: bool, want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax over the last dim (and its log-sum-exp when wanted). Where a row may have
    no allowed key at all, the row max is taken as 0 for such rows so that the row comes
    out as zeros (lse -inf) with finite gradients, instead of softmax's NaN."""
    if not may_be_empty:
        return torch.softmax(logits, dim=-1), (torch.logsumexp(logits, -1) if want_lse else None)
    if logits.shape[-1] == 0:  # a bucket of sequences without keys
        return logits, logits.new_full(logits.shape[:-1], float("-inf"))
    row_max = logits.detach().amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(logits - row_max)
    total = e.sum(-1, keepdim=True)
    probs = e / torch.where(total > 0, total, torch.ones_like(total))
    lse = (row_max + torch.log(total)).squeeze(-1) if want_lse else None
    return probs, lse


@dataclass
class _BucketLayout:
    buckets: list[tuple[int, int, int]]  # (padded query length, padded key length, number of sequences)
    q_sizes: list[int]  # padded query rows per bucket
    k_sizes: list[int]  # padded key rows per bucket
    q_gather: torch.Tensor  # query token of each padded row (a sequence's own token for padding)
    k_gather: torch.Tensor  # key token of each padded row
    rows_of_tokens: torch.Tensor  # padded row holding each packed query token
    masks: list  # per bucket: [n, 1, Lq, Lk] mask of allowed (query, key) pairs, or None when all are
    bias_rows: list  # per bucket: (flat bias_table rows, [n, L, L, 1] mask), or None
    may_be_empty: bool  # some real query row may have no allowed key


def _bucket_layout(cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor | None, causal: bool,
                   modality: torch.Tensor | None, position: torch.Tensor | None, bias_lut: torch.Tensor | None,
                   ratio: float = 1.1, small: int = 0) -> _BucketLayout:
    """Everything that depends only on the batch layout, computed once per batch.

    Sequences sorted by length are cut into buckets whose longest member is at most
    ``ratio`` times (or ``small`` tokens beyond) the shortest: few batched matmuls per
    pack, and little padding, whose keys are masked out (so results are exact). Sequences
    without queries are left out (they produce nothing).
    """
    device = cu_seqlens.device
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    q_starts, q_lens = cu_seqlens[:-1].tolist(), (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    k_starts, k_lens = cu_k[:-1].tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    order = sorted((max(q_lens[s], k_lens[s]), s) for s in range(len(q_lens)) if q_lens[s] > 0)
    members: list[list[int]] = []
    for L, s in order:
        first = max(q_lens[members[-1][0]], k_lens[members[-1][0]]) if members else 0
        if members and L <= max(ratio * first, first + small):
            members[-1].append(s)
        else:
            members.append([s])
    buckets, q_gathers, k_gathers, masks = [], [], [], []
    rows = torch.empty(int(cu_seqlens[-1]), dtype=torch.long)
    offset, may_be_empty = 0, False
    for seqs in members:
        Lq, Lk = max(q_lens[s] for s in seqs), max(k_lens[s] for s in seqs)
        q_gather, q_valid, q_start = _padded_rows([q_starts[s] for s in seqs], [q_lens[s] for s in seqs], Lq)
        k_gather, k_valid, _ = _padded_rows([k_starts[s] for s in seqs], [k_lens[s] for s in seqs], Lk)
        q_gathers.append(q_gather)
        k_gathers.append(k_gather)
        rows[(q_start + torch.arange(Lq)[None, :])[q_valid]] = offset + torch.nonzero(q_valid.flatten()).flatten()
        allowed = k_valid[:, None, :].expand(len(seqs), Lq, Lk)  # [n, Lq, Lk]
        if causal:
            shift = torch.tensor([k_lens[s] - q_lens[s] for s in seqs])[:, None, None]
            allowed = allowed & (torch.arange(Lk)[None, None, :] <= torch.arange(Lq)[None, :, None] + shift)
        may_be_empty |= bool((~allowed.any(-1) & q_valid).any())
        masks.append(None if bool(allowed.all()) else allowed[:, None].to(device))
        buckets.append((Lq, Lk, len(seqs)))
        offset += Lq * len(seqs)
    q_sizes, k_sizes = [Lq * n for Lq, _, n in buckets], [Lk * n for _, Lk, n in buckets]
    empty = torch.empty(0, dtype=torch.long)
    q_gather = torch.cat(q_gathers or [empty]).to(device)
    k_gather = torch.cat(k_gathers or [empty]).to(device)
    bias_rows = [None] * len(buckets)
    if bias_lut is not None:  # self-attention only: the query rows are the key rows
        bias_rows = [_bias_rows(idx.view(n, Lq), bias_lut, modality, position)
                     for (Lq, _, n), idx in zip(buckets, torch.split(q_gather, q_sizes))]
    return _BucketLayout(buckets, q_sizes, k_sizes, q_gather, k_gather, rows.to(device), masks, bias_rows,
                         may_be_empty)


def _padded_rows(starts: list[int], lengths: list[int], L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token index of every row of n sequences padded to L (padding repeats a real token of
    the pack: the sequence's first, or the pack's first for an empty sequence), the [n, L]
    mask of real rows, and the starts as [n, 1]."""
    start = torch.tensor(starts)[:, None]
    valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    pad = torch.where(torch.tensor(lengths)[:, None] > 0, start, 0)
    return torch.where(valid, start + torch.arange(L)[None, :], pad).flatten(), valid, start


def _bias_rows(idx: torch.Tensor, bias_lut: torch.Tensor, modality: torch.Tensor,
               position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sequences with token indices ``idx [n, L]``: the bias_table row of every
    (query, key) pair, flattened, and the mask of pairs that get a bias (same modality,
    LUT entry >= 0) as ``[n, L, L, 1]``."""
    mod = modality[idx].long()
    pos = position[idx].long()
    if bias_lut.dim() == 2:  # a compact LUT
        entry = bias_lut[mod[:, :, None], lut_columns(bias_lut, pos[:, :, None], pos[:, None, :])].long()
    else:
        entry = bias_lut[mod[:, :, None], pos[:, :, None], pos[:, None, :]].long()
    keep = (mod[:, :, None] == mod[:, None, :]) & (entry >= 0)
    return entry.clamp(min=0).flatten(), keep[..., None]


def backend_implements(mode: str, device: torch.device) -> bool:
    """Whether the backend a ``varlen_attention`` call on ``device`` resolves to implements
    ``mode``. The model asks before passing its compact LUT (``"relative_lut"``), so a backend
    that read only the dense LUT would keep running instead of the call falling back to the
    reference (every backend today reads every form)."""
    _, impl = dispatch.resolve(OP, device)
    return mode in getattr(impl, "modes", ())


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
    causal: bool = False,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences; see the module docstring for the contract.

    Returns ``[Tq, H, Dh]`` in q's dtype, or ``(out, lse)`` with ``return_lse=True``.
    Differentiable in q, k, v and ``bias_table``. ``max_seqlen_k`` defaults to
    ``max_seqlen`` for self-attention and is required with ``cu_seqlens_k``.
    """
    validate_varlen_attention(q, k, v, cu_seqlens, max_seqlen, bias_table, bias_lut, modality, position,
                              cu_seqlens_k, max_seqlen_k)
    relative = bias_lut is not None and bias_lut.dim() == 2
    used = [mode for mode, on in zip(MODES, (causal, cu_seqlens_k is not None, k.shape[1] != q.shape[1],
                                              return_lse, relative)) if on]
    backend, impl = dispatch.resolve(OP, q.device)
    args = (q, k, v, cu_seqlens, int(max_seqlen), softmax_scale, bias_table, bias_lut, modality, position)
    missing = [mode for mode in used if mode not in getattr(impl, "modes", ())]
    if missing:
        if dispatch.forced_backend() is not None:
            raise dispatch.BackendUnavailable(
                f"{OP}: the forced {backend!r} backend does not implement {', '.join(missing)}")
        impl = varlen_attention_reference
    flag = {"deterministic": True} if deterministic and "deterministic" in getattr(impl, "modes", ()) else {}
    if not used:
        return impl(*args, **flag)
    return impl(*args, causal=bool(causal), cu_seqlens_k=cu_seqlens_k,
                max_seqlen_k=None if max_seqlen_k is None else int(max_seqlen_k), return_lse=bool(return_lse),
                **flag)


varlen_attention_reference.modes = frozenset(MODES)
dispatch.register(OP, "reference", lambda: varlen_attention_reference)
