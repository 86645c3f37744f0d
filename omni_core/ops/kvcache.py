"""``attention_with_kvcache``: one decode step of attention over a KV cache
(flash-attn's ``flash_attn_with_kvcache`` semantics, without rotary and paging).

Contract: ``q [B, Lq, H, Dh]``; caches ``k_cache, v_cache [B, S, Hk, Dh]`` (Hk divides H,
query head h reads key head ``h // (H // Hk)``); ``cache_seqlens`` int32 ``[B]``: how many
cache rows of each batch element are valid. With ``k, v [B, Ln, Hk, Dh]`` the new keys and
values are first written **in place** into the caches at rows ``cache_seqlens[b] ...
cache_seqlens[b] + Ln - 1`` and attended to; ``cache_seqlens`` itself is not changed (the
caller advances it, as with flash-attn). Batch element b attends to its first
``Lk = cache_seqlens[b] + Ln`` cache rows; with ``causal=True`` (bottom-right aligned) query i
sees key j iff ``j <= i + Lk - Lq``. A query with no key outputs 0 (lse -inf). Returns
``out [B, Lq, H, Dh]`` or, with ``return_lse``, ``(out, lse [B, H, Lq])`` (natural log,
float32; float64 for float64 inputs). Forward only.

Backends: the torch reference, and the Triton split-KV (flash-decoding) kernel in
``kernels/decode_attention.py`` on CUDA (or under ``TRITON_INTERPRET=1`` when forced).
"""

from __future__ import annotations

import math

import torch

from omni_core.ops import dispatch
from omni_core.ops.attention import _softmax
from omni_core.ops.memo import memoised

OP = "attention_with_kvcache"


def validate_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     k: torch.Tensor | None, v: torch.Tensor | None) -> None:
    """Raise ValueError/TypeError naming the problem, before anything is written or launched."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    B, Lq, H, Dh = q.shape
    if v_cache.shape != k_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != Dh:
        raise ValueError(f"caches must both be [B={B}, S, Hk, Dh={Dh}], got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    Hk = k_cache.shape[2]
    if Hk == 0 or H % Hk:
        raise ValueError(f"the cache's key/value heads Hk={Hk} must divide the query heads H={H}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    new = 0
    if k is not None:
        if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k and v must both be [B={B}, Ln, Hk={Hk}, Dh={Dh}], got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")
        new = k.shape[1]
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 \
            or cache_seqlens.shape != (B,):
        raise TypeError(f"cache_seqlens must be an int32 [B={B}] tensor, got "
                        f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)} "
                        f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": cache_seqlens}
    if k is not None:
        tensors.update(k=k, v=v)
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")
    S = k_cache.shape[1]
    # One host read per decode step (every layer of the step shares the tensor).
    memoised(("checked cache_seqlens", S, new), (cache_seqlens,), lambda: _check_lengths(cache_seqlens, S, new))


def _check_lengths(cache_seqlens: torch.Tensor, S: int, new: int) -> None:
    if not cache_seqlens.numel():
        return
    low, high = int(cache_seqlens.min()), int(cache_seqlens.max())
    if low < 0 or high + new > S:
        raise ValueError(f"cache_seqlens must lie in [0, S - Ln] = [0, {S - new}] (cache of S={S} rows, "
                         f"Ln={new} new rows), got min {low} max {high}")


def append_to_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None:
    """Write ``k, v [B, Ln, Hk, Dh]`` into the caches at rows ``cache_seqlens[b] + 0..Ln-1``,
    in place, without a host sync."""
    B, Ln = k.shape[:2]
    rows = cache_seqlens.long()[:, None] + torch.arange(Ln, device=k.device)[None, :]
    batch = torch.arange(B, device=k.device)[:, None].expand(B, Ln)
    k_cache[batch, rows] = k
    v_cache[batch, rows] = v


def attention_with_kvcache_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     cache_seqlens: torch.Tensor, new: int, softmax_scale: float | None,
                                     causal: bool, return_lse: bool):
    """Plain torch on the (already appended) caches; any dtype, float64 is the ground truth.
    ``new`` is the number of rows just appended (they count as valid keys)."""
    B, Lq, H, Dh = q.shape
    S, Hk = k_cache.shape[1], k_cache.shape[2]
    G = H // Hk
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(Dh)
    lengths = cache_seqlens.long() + new
    qg = q.view(B, Lq, Hk, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * Lq, Dh)
    kc, vc = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [B, Hk, S, Dh]
    logits = (torch.matmul(qg, kc.transpose(-1, -2)) * scale).view(B, H, Lq, S)
    j = torch.arange(S, device=q.device)[None, None, :]
    allowed = j < lengths[:, None, None]
    if causal:
        i = torch.arange(Lq, device=q.device)[None, :, None]
        allowed = allowed & (j <= i + (lengths - Lq)[:, None, None])
    probs, lse = _softmax(logits.masked_fill(~allowed[:, None], float("-inf")), True, return_lse)
    out = torch.matmul(probs.view(B, Hk, G * Lq, S), vc).view(B, H, Lq, Dh).transpose(1, 2)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decode step over a KV cache; see the module docstring for the contract."""
    validate_kvcache(q, k_cache, v_cache, cache_seqlens, k, v)
    _, impl = dispatch.resolve(OP, q.device)
    if hasattr(impl, "check"):  # the backend's own limits (e.g. head dims), before the cache is written
        impl.check(q, k_cache, v_cache, cache_seqlens)
    if k is not None:
        append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
    return impl(q, k_cache, v_cache, cache_seqlens, 0 if k is None else k.shape[1], softmax_scale, bool(causal),
                bool(return_lse))


dispatch.register(OP, "reference", lambda: attention_with_kvcache_reference)
