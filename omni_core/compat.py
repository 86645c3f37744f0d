"""Drop-in entry points for code written against flash-attn or xformers.

Re-exports :mod:`omni_core.integrations.flash_attn` (``flash_attn_varlen_func``,
``flash_attn_func``, ``flash_attn_with_kvcache``) and
:mod:`omni_core.integrations.xformers` (``memory_efficient_attention``); see those modules
for what is supported and what raises ``NotImplementedError``. Both also accept the learned
relative-position bias (``bias_table``, ``bias_lut``, ``modality``, ``position``) on
self-attention calls.
"""

from omni_core.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from omni_core.integrations.xformers import memory_efficient_attention

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "memory_efficient_attention"]
