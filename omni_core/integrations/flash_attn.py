"""flash-attn's entry points on omni-core's attention ops.

* :func:`flash_attn_varlen_func` — packed ``q [Tq, H, Dh]``, ``k, v [Tk, Hk, Dh]`` with
  ``cu_seqlens_q/k``: causal (bottom-right, as flash-attn >= 2.1), cross-attention,
  grouped-query heads, ``return_attn_probs`` (returns ``(out, softmax_lse, None)``: the LSE
  ``[H, Tq]`` fp32, as flash-attn; no attention probabilities are materialised), and the
  learned relative-position bias as extra keywords.
* :func:`flash_attn_func` — padded ``[B, L, H, Dh]`` batches.
* :func:`flash_attn_with_kvcache` — decoding over a KV cache (no rotary, no paging).

``deterministic=True`` makes the Triton kernel's backward take its atomic-free two-kernel path
(bit-repeatable ``dq``; the fused backward it runs for long keys sums ``dq`` by fp32 atomics, as
flash-attn's); the other backends are deterministic anyway. Features omni-core does not implement —
dropout, sliding windows, softcap, ALiBi, paged KV caches (``block_table``), rotary embedding
inside the call, cache index remapping — raise ``NotImplementedError`` naming them.
"""

from __future__ import annotations

import torch

from omni_core.ops import attention_with_kvcache, varlen_attention
from omni_core.ops.memo import memoised


def _refuse(function: str, features: dict[str, bool]) -> None:
    used = [name for name, on in features.items() if on]
    if used:
        raise NotImplementedError(f"omni_core.compat.{function} does not support: {', '.join(used)}")


def _common_refusals(dropout_p: float, window_size, softcap: float, alibi_slopes) -> dict[str, bool]:
    return {
        "dropout_p > 0": dropout_p > 0.0,
        "window_size other than (-1, -1) (sliding window)": tuple(window_size) != (-1, -1),
        "softcap": softcap != 0.0,
        "alibi_slopes": alibi_slopes is not None,
    }


def _same_pack(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor) -> bool:
    """Self-attention when q and k share one pack (checked once per batch)."""
    if cu_q is cu_k:
        return q.shape[0] == k.shape[0]
    if cu_q.shape != cu_k.shape or q.shape[0] != k.shape[0]:
        return False
    return memoised("same pack", (cu_q, cu_k), lambda: bool(torch.equal(cu_q, cu_k)))


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    bias_table: torch.Tensor | None = None,
    bias_lut: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
):
    """flash-attn's ``flash_attn_varlen_func``: ``out [Tq, H, Dh]``, or with
    ``return_attn_probs`` ``(out, softmax_lse [H, Tq], None)``."""
    _refuse("flash_attn_varlen_func", {**_common_refusals(dropout_p, window_size, softcap, alibi_slopes),
                                       "block_table (paged KV cache)": block_table is not None})
    cross = {}
    if not _same_pack(q, k, cu_seqlens_q, cu_seqlens_k):
        cross = {"cu_seqlens_k": cu_seqlens_k, "max_seqlen_k": max_seqlen_k}
    result = varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale=softmax_scale, causal=causal,
                              bias_table=bias_table, bias_lut=bias_lut, modality=modality, position=position,
                              return_lse=return_attn_probs, deterministic=deterministic, **cross)
    if return_attn_probs:
        out, lse = result
        return out, lse, None
    return result


_UNIFORM: dict[tuple, torch.Tensor] = {}


def _uniform_cu_seqlens(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``[0, L, 2L, ...]`` int32 on ``device``, one tensor per shape: the per-batch checks
    of the op are memoised on it."""
    key = (batch, length, str(device))
    if key not in _UNIFORM:
        _UNIFORM[key] = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return _UNIFORM[key]


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """flash-attn's ``flash_attn_func`` on padded ``q [B, Lq, H, Dh]``, ``k, v [B, Lk, Hk, Dh]``:
    ``out [B, Lq, H, Dh]``, or ``(out, softmax_lse [B, H, Lq], None)``."""
    _refuse("flash_attn_func", _common_refusals(dropout_p, window_size, softcap, alibi_slopes))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, L, H, Dh], got shape {tuple(t.shape)}")
    B, Lq, H, Dh = q.shape
    Lk = k.shape[1]
    if k.shape[0] != B:
        raise ValueError(f"q and k batch sizes differ: {B} vs {k.shape[0]}")
    cu_q = _uniform_cu_seqlens(B, Lq, q.device)
    cross = {} if Lk == Lq else {"cu_seqlens_k": _uniform_cu_seqlens(B, Lk, q.device), "max_seqlen_k": Lk}
    result = varlen_attention(q.reshape(B * Lq, H, Dh), k.reshape(B * Lk, *k.shape[2:]),
                              v.reshape(B * Lk, *v.shape[2:]), cu_q, Lq, softmax_scale=softmax_scale,
                              causal=causal, return_lse=return_attn_probs, deterministic=deterministic, **cross)
    out, lse = result if return_attn_probs else (result, None)
    out = out.view(B, Lq, H, -1)
    if return_attn_probs:
        return out, lse.view(H, B, Lq).transpose(0, 1), None
    return out


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """flash-attn's ``flash_attn_with_kvcache`` (no rotary, no paging): appends ``k, v`` to
    the caches in place at ``cache_seqlens`` and attends; ``num_splits`` is a tuning hint
    (ignored: the kernel picks its split). Returns ``out [B, Lq, H, Dh]`` or
    ``(out, softmax_lse [B, H, Lq])``."""
    _refuse("flash_attn_with_kvcache", {
        **_common_refusals(0.0, window_size, softcap, alibi_slopes),
        "rotary_cos / rotary_sin (rotary embedding)": rotary_cos is not None or rotary_sin is not None,
        "cache_batch_idx": cache_batch_idx is not None,
        "cache_leftpad": cache_leftpad is not None,
        "block_table (paged KV cache)": block_table is not None,
    })
    B = q.shape[0]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when k and v are appended to the cache")
        cache_seqlens = k_cache.shape[1]  # the whole cache is valid
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    return attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k=k, v=v, softmax_scale=softmax_scale,
                                  causal=causal, return_lse=return_softmax_lse)
