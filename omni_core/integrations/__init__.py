"""Thin adapters from other libraries' call sites onto :mod:`omni_core.ops`:
``flash_attn`` (flash-attn's functions), ``xformers`` (``memory_efficient_attention``)
and ``transformers`` (an attention backend registered as ``"omni"``).
:mod:`omni_core.compat` re-exports the first two."""
