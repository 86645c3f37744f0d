"""``VarlenAttention``: multi-head self-attention over a packed batch, as ONE-PEACE's
(q and v projections with bias, k without, the scale applied after the bias, sub-LN
before the output projection). The relative-position bias table is the caller's: the
model concatenates the adapters' per-modality tables once per pass and every layer
indexes that one ``bias_table`` through the model's ``bias_lut``."""

from __future__ import annotations

import torch
from torch import nn

from omni_core import ops


class VarlenAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, sub_ln: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.sub_ln = nn.LayerNorm(dim) if sub_ln else None
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, batch: ops.PackedBatch, bias_lut: torch.Tensor | None = None,
                bias_table: torch.Tensor | None = None) -> torch.Tensor:
        """``bias_table [NB, H]`` and ``bias_lut`` together, or neither (no bias). The LUT is in any
        form ``ops.varlen_attention`` takes: dense ``[M, P, P]``, relative ``[M, 2P-1]`` or the
        CLS-aware relative ``[M, 2P+2]``."""
        if (bias_table is None) != (bias_lut is None):
            raise ValueError("pass bias_table and bias_lut together (or neither)")
        T = x.shape[0]
        shape = (T, self.num_heads, self.head_dim)
        # softmax_scale multiplies q k^T, i.e. (W_q h + b_q) is scaled after its bias (ONE-PEACE).
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        bias = {}
        if bias_table is not None:
            bias = dict(bias_table=bias_table, bias_lut=bias_lut, modality=batch.modality,
                        position=batch.position)
        out = ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, **bias).reshape(T, -1)
        if self.sub_ln is not None:
            out = ops.layer_norm(out, self.sub_ln.weight, self.sub_ln.bias, self.sub_ln.eps)
        return self.out_proj(out)
