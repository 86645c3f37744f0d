"""A transformers attention backend: ``register()`` adds ``"omni"`` to transformers'
attention-function registry (``AttentionInterface``) and its mask registry
(``AttentionMaskInterface``), so that ::

    from omni_core.integrations.transformers import register
    register()
    model = AutoModel.from_config(cfg, attn_implementation="omni")

runs every attention layer of a model that supports attention backends on
:func:`omni_core.ops.varlen_attention`.

Mapping. transformers calls the function with ``query [B, H, Lq, Dh]`` and ``key, value
[B, Hk, Lk, Dh]`` (grouped-query heads are passed as they are, not repeated) and the mask
built by the registered mask function: flash-attn's convention, ``None`` when nothing is
padded, else the 2-D boolean padding mask ``[B, Lk]`` (True = real token). The valid queries
(the last Lq columns of the mask) and valid keys of each batch element are packed into one
stream with their ``cu_seqlens``, so padding costs no FLOPs; when queries and keys are the
same tokens it is self-attention, otherwise (a KV cache) cross-attention with bottom-right
causal alignment, which is exactly "query at position p sees keys up to p" when the valid
tokens are contiguous (left or right padding). ``module.is_causal`` (or the ``is_causal``
keyword) selects the causal mask. Padded query rows output 0, as flash-attn's. The function
returns ``(out [B, Lq, H, Dh], None)``: attention weights are never materialised.

Refused with ``NotImplementedError``: dropout during training, sliding windows, softcap,
attention sinks, paged caches, and 4-D (arbitrary) masks.
"""

from __future__ import annotations

import torch

from omni_core.integrations.flash_attn import _uniform_cu_seqlens
from omni_core.ops import varlen_attention
from omni_core.ops.memo import memoised

NAME = "omni"


def omni_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature on omni-core's varlen attention."""
    unsupported = {"dropout > 0": dropout > 0.0, "sliding_window": sliding_window is not None,
                   "softcap": softcap is not None, "s_aux (attention sinks)": s_aux is not None,
                   "paged cache": kwargs.get("cache") is not None}
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise NotImplementedError(f"the omni attention backend does not support: {', '.join(used)}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(f"the omni attention backend takes 2-D padding masks (its registered mask "
                                  f"function makes them), got a {attention_mask.dim()}-D mask")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    B, H, Lq, Dh = query.shape
    Hk, Lk = key.shape[1], key.shape[2]
    q = query.transpose(1, 2).reshape(B * Lq, H, Dh)
    k = key.transpose(1, 2).reshape(B * Lk, Hk, Dh)
    v = value.transpose(1, 2).reshape(B * Lk, Hk, value.shape[-1])
    if attention_mask is None:
        out = _attend(q, k, v, _uniform_cu_seqlens(B, Lq, q.device), Lq, _uniform_cu_seqlens(B, Lk, q.device), Lk,
                      scaling, causal, Lq == Lk)
        return out.view(B, Lq, H, -1), None
    # One layout per mask tensor (every layer of a forward shares it): one host sync, and the
    # same cu_seqlens tensors, so the op's per-batch checks stay memoised across layers.
    q_rows, k_rows, (cu_q, max_q), (cu_k, max_k) = memoised(("omni hf layout", Lq), (attention_mask,),
                                                            lambda: _layout(attention_mask, Lq))
    packed = _attend(q.index_select(0, q_rows), k.index_select(0, k_rows), v.index_select(0, k_rows), cu_q, max_q,
                     cu_k, max_k, scaling, causal, Lq == Lk)
    out = packed.new_zeros(B * Lq, H, packed.shape[-1]).index_copy(0, q_rows, packed)
    return out.view(B, Lq, H, -1), None


def _attend(q, k, v, cu_q, max_q, cu_k, max_k, scale, causal, same: bool):
    """``same``: queries and keys are the same tokens (Lq == Lk), i.e. self-attention."""
    cross = {} if same else {"cu_seqlens_k": cu_k, "max_seqlen_k": max_k}
    return varlen_attention(q, k, v, cu_q, max_q, softmax_scale=scale, causal=causal, **cross)


def _layout(attention_mask: torch.Tensor, Lq: int):
    """Packed rows of the valid queries (the mask's last Lq columns) and keys, and their
    cu_seqlens and longest sequence."""
    k_valid = attention_mask.to(torch.bool)
    q_valid = k_valid[:, -Lq:]
    q_rows, k_rows = q_valid.flatten().nonzero().squeeze(1), k_valid.flatten().nonzero().squeeze(1)
    return q_rows, k_rows, _cu_seqlens(q_valid), _cu_seqlens(k_valid)


def _cu_seqlens(valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    lengths = valid.sum(1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return cu, int(lengths.max()) if lengths.numel() else 0


def register() -> None:
    """Register ``"omni"`` with transformers (idempotent); needs ``pip install omni_core[hf]``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as err:
        raise ImportError("omni_core.integrations.transformers needs transformers: pip install 'omni_core[hf]'") \
            from err
    AttentionInterface.register(NAME, omni_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
