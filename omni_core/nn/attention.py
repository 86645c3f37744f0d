"""``VarlenAttention``: multi-head self-attention over a packed batch (ONE-PEACE style:
key projection without bias, sub-LN before the output projection, per-modality learned
relative-position bias held as one ``bias_table`` indexed through the model's LUT)."""

from __future__ import annotations

import torch
from torch import nn

from omni_core import ops


class VarlenAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, bias_rows: int = 0, sub_ln: bool = True) -> None:
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
        self.bias_table = nn.Parameter(torch.zeros(bias_rows, num_heads)) if bias_rows else None

    def forward(self, x: torch.Tensor, batch: ops.PackedBatch, bias_lut: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[0]
        shape = (T, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        bias = {}
        if self.bias_table is not None and bias_lut is not None:
            bias = dict(bias_table=self.bias_table, bias_lut=bias_lut, modality=batch.modality,
                        position=batch.position)
        out = ops.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, **bias).reshape(T, -1)
        if self.sub_ln is not None:
            out = ops.layer_norm(out, self.sub_ln.weight, self.sub_ln.bias, self.sub_ln.eps)
        return self.out_proj(out)
