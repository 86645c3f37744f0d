"""Drop-in entry points for code written against flash-attn or xformers.

* :func:`flash_attn_varlen_func` takes flash-attn's argument names and layout
  (``q, k, v [T, H, Dh]``, ``cu_seqlens_q/k`` int32 ``[B+1]``) and runs
  :func:`omni_core.ops.varlen_attention`, so it also accepts the learned relative-position
  bias (``bias_table``, ``bias_lut``, ``modality``, ``position``). Features omni-core does not
  implement (causal masks, dropout, sliding windows, ALiBi, softcap, different query and
  key packs, returning the softmax) raise ``NotImplementedError`` naming the feature.
* :func:`memory_efficient_attention` takes xformers' ``[1, T, H, Dh]`` layout with an
  xformers ``BlockDiagonalMask`` as ``attn_bias``. xformers is imported lazily, only to
  recognise its mask class; any object exposing the mask's ``q_seqinfo.seqstart`` (and
  ``k_seqinfo.seqstart``) is accepted, so nothing here needs xformers installed.
"""

from __future__ import annotations

from typing import Any

import torch

from omni_core.ops import varlen_attention


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
) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` on omni-core's varlen attention.

    Returns ``[T, H, Dh]`` like flash-attn. dq, dk, dv are always deterministic; with a bias,
    ``deterministic=True`` insists that the bias gradient is too (see
    ``kernels/varlen_attention.py``) and says how to turn that on if it is not.
    """
    unsupported = {
        "causal=True": causal,
        "dropout_p > 0": dropout_p > 0.0,
        "window_size other than (-1, -1)": tuple(window_size) != (-1, -1),
        "softcap": softcap != 0.0,
        "alibi_slopes": alibi_slopes is not None,
        "return_attn_probs=True": return_attn_probs,
        "block_table (paged KV cache)": block_table is not None,
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise NotImplementedError(f"omni_core.compat.flash_attn_varlen_func does not support: {', '.join(used)}")
    _require_same_pack(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if deterministic and bias_table is not None and q.is_cuda:  # the CPU paths have no atomics
        from omni_core.kernels.varlen_attention import bias_grad_mode

        if bias_grad_mode() != "deterministic":
            raise ValueError(
                "deterministic=True with a bias needs the deterministic bias gradient: call "
                "torch.use_deterministic_algorithms(True) or set OMNI_ATTN_BIAS_GRAD=deterministic")
    return varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale=softmax_scale,
                            bias_table=bias_table, bias_lut=bias_lut, modality=modality, position=position)


def _require_same_pack(cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> None:
    if cu_q is not cu_k and (cu_q.shape != cu_k.shape or not torch.equal(cu_q, cu_k)):
        raise NotImplementedError(
            "cu_seqlens_q and cu_seqlens_k differ: omni-core attends within one pack "
            "(self-attention); cross-attention between different packs is not supported")
    if int(max_q) != int(max_k):
        raise NotImplementedError(f"max_seqlen_q={max_q} differs from max_seqlen_k={max_k}; they must match")


def seqstart_of(mask: Any) -> torch.Tensor:
    """``cu_seqlens`` (int32) of an xformers ``BlockDiagonalMask``.

    With xformers installed the mask must be exactly that class (its causal and local
    subclasses are refused); without it, any object of a class named ``BlockDiagonalMask``
    with ``q_seqinfo`` / ``k_seqinfo`` carrying ``seqstart`` (tensor) or ``seqstart_py``
    (list) is read the same way.
    """
    try:
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except ImportError:
        plain = type(mask).__name__ == "BlockDiagonalMask"
    else:
        plain = type(mask) is BlockDiagonalMask
    q_info, k_info = getattr(mask, "q_seqinfo", None), getattr(mask, "k_seqinfo", None)
    if not plain or q_info is None or k_info is None:
        raise NotImplementedError(
            f"attn_bias of type {type(mask).__name__} is not supported: only the plain xformers "
            "BlockDiagonalMask (no causal or local variants, no dense bias tensors)")
    q_starts, k_starts = _starts(q_info), _starts(k_info)
    if q_starts != k_starts:
        raise NotImplementedError("the BlockDiagonalMask has different query and key blocks; "
                                  "only self-attention over one pack is supported")
    return torch.tensor(q_starts, dtype=torch.int32)


def _starts(info: Any) -> list[int]:
    if getattr(info, "seqstart_py", None) is not None:
        return [int(s) for s in info.seqstart_py]
    return [int(s) for s in info.seqstart.tolist()]


def memory_efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Any = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    bias_table: torch.Tensor | None = None,
    bias_lut: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
) -> torch.Tensor:
    """xformers' ``memory_efficient_attention`` for ``[1, T, H, Dh]`` inputs packed with a
    ``BlockDiagonalMask``; returns ``[1, T, H, Dh]``."""
    if p > 0.0:
        raise NotImplementedError("dropout (p > 0) is not supported")
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"expected packed [1, T, H, Dh] inputs, got {tuple(query.shape)}")
    if attn_bias is None:
        raise NotImplementedError("attn_bias=None attends across the whole pack; pass a BlockDiagonalMask")
    cu_seqlens = seqstart_of(attn_bias).to(query.device)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    out = varlen_attention(query[0], key[0], value[0], cu_seqlens, max_seqlen, softmax_scale=scale,
                           bias_table=bias_table, bias_lut=bias_lut, modality=modality, position=position)
    return out.unsqueeze(0)
