"""xformers' ``memory_efficient_attention`` on omni-core's varlen attention.

Layouts: ``[B, M, H, K]``, or ``[B, M, G, H, K]`` for grouped-query attention (keys and
values expanded over H with stride 0, as xformers expects; query head (g, h) reads key
head g). ``attn_bias`` may be

* ``None`` — each batch element is one sequence (no mask);
* ``LowerTriangularMask`` (Mq == Mk) / ``LowerTriangularFromBottomRightMask`` — causal;
* ``BlockDiagonalMask`` — packed sequences in ``[1, T, H, K]``, no mask inside a block;
* ``BlockDiagonalCausalMask`` — causal inside each block, top-left aligned (xformers'
  meaning); accepted when every block has as many queries as keys, where top-left and
  bottom-right coincide;
* ``BlockDiagonalCausalFromBottomRightMask`` — causal, bottom-right aligned.

Any other mask class (local attention, padded or gappy keys, paged, tensor biases) and
dropout raise ``NotImplementedError`` naming them; ``op`` is accepted and ignored (the
dispatch picks the implementation). The mask's ``cu_seqlens`` are copied to the device once
per mask object and reused, so the op's once-per-batch layout checks stay memoised across
layers. xformers itself is imported only to recognise its mask classes.
"""

from __future__ import annotations

from typing import Any

import torch

from omni_core.ops import varlen_attention
from omni_core.ops.memo import memoised

# mask class name -> causal alignment ("none", "top_left", "bottom_right"), packed or batched
_MASKS = {
    "BlockDiagonalMask": ("none", True),
    "BlockDiagonalCausalMask": ("top_left", True),
    "BlockDiagonalCausalFromBottomRightMask": ("bottom_right", True),
    "LowerTriangularMask": ("top_left", False),
    "LowerTriangularFromBottomRightMask": ("bottom_right", False),
}


def _mask_kind(mask: Any) -> tuple[str, bool]:
    try:
        from xformers.ops.fmha import attn_bias
    except ImportError as err:
        raise NotImplementedError(f"attn_bias of type {type(mask).__name__} needs xformers installed") from err
    for name, kind in _MASKS.items():
        if type(mask) is getattr(attn_bias, name, None):  # exact class: subclasses add features
            return kind
    raise NotImplementedError(
        f"attn_bias of type {type(mask).__name__} is not supported: omni-core takes None, "
        f"{', '.join(_MASKS)} (no local-attention, padded/gappy-key or paged masks, no tensor biases)")


def _device_seqstart(info: Any, device: torch.device) -> torch.Tensor:
    """The block starts of one side of a BlockDiagonal mask as int32 on ``device``, copied once
    per mask (memoised on the mask's own seqstart tensor)."""
    return memoised(("xformers seqstart", str(device)), (info.seqstart,),
                    lambda: info.seqstart.to(device=device, dtype=torch.int32))


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """[B, M, G, H, K] -> [B, M, G*H, K] queries and [B, Mk, G or G*H, K] keys/values."""
    B, M, G, H, K = query.shape
    q = query.reshape(B, M, G * H, K)
    if key.stride(3) == 0 and value.stride(3) == 0:  # expanded over H: G key heads
        return q, key[:, :, :, 0], value[:, :, :, 0]
    return q, key.reshape(B, key.shape[1], G * H, K), value.reshape(B, value.shape[1], G * H, K)


def memory_efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Any = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    op: Any = None,
    bias_table: torch.Tensor | None = None,
    bias_lut: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
) -> torch.Tensor:
    """xformers' ``memory_efficient_attention``; returns the query's layout."""
    del op  # xformers' kernel choice; omni-core dispatches by device and OMNI_BACKEND
    if p > 0.0:
        raise NotImplementedError("dropout (p > 0) is not supported")
    if query.dim() not in (4, 5) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"expected [B, M, H, K] or [B, M, G, H, K] inputs, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    shape = query.shape
    if query.dim() == 5:
        query, key, value = _grouped(query, key, value)
    B, Mq, H, K = query.shape
    Mk = key.shape[1]
    bias = dict(bias_table=bias_table, bias_lut=bias_lut, modality=modality, position=position)
    if attn_bias is None:
        causal, packed = "none", False
    else:
        causal, packed = _mask_kind(attn_bias)
    if packed:
        if B != 1:
            raise ValueError(f"a BlockDiagonal mask packs sequences along M: batch must be 1, got {B}")
        q_starts, k_starts = attn_bias.q_seqinfo.seqstart_py, attn_bias.k_seqinfo.seqstart_py
        if causal == "top_left" and any(q1 - q0 != k1 - k0 for q0, q1, k0, k1 in
                                        zip(q_starts, q_starts[1:], k_starts, k_starts[1:])):
            raise NotImplementedError("BlockDiagonalCausalMask (top-left causal) with blocks of unequal query "
                                      "and key lengths; use BlockDiagonalCausalFromBottomRightMask")
        cu_q = _device_seqstart(attn_bias.q_seqinfo, query.device)
        max_q = attn_bias.q_seqinfo.max_seqlen
        cross = {}
        if q_starts != k_starts:
            cross = {"cu_seqlens_k": _device_seqstart(attn_bias.k_seqinfo, query.device),
                     "max_seqlen_k": attn_bias.k_seqinfo.max_seqlen}
        out = varlen_attention(query[0], key[0], value[0], cu_q, max_q, softmax_scale=scale,
                               causal=causal != "none", **cross, **bias)
        return out.view(shape)
    if causal == "top_left" and Mq != Mk:
        raise NotImplementedError("LowerTriangularMask (top-left causal) with Mq != Mk; use "
                                  "LowerTriangularFromBottomRightMask")
    from omni_core.integrations.flash_attn import _uniform_cu_seqlens

    cross = {} if Mq == Mk else {"cu_seqlens_k": _uniform_cu_seqlens(B, Mk, query.device), "max_seqlen_k": Mk}
    out = varlen_attention(query.reshape(B * Mq, H, K), key.reshape(B * Mk, -1, K), value.reshape(B * Mk, -1, K),
                           _uniform_cu_seqlens(B, Mq, query.device), Mq, softmax_scale=scale,
                           causal=causal != "none", **cross, **bias)
    return out.view(shape)
