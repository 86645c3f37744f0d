"""Modality-routed modules: each token uses the parameters of its modality."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_core import ops


class ModalityRoutedFFN(nn.Module):
    """One FFN per modality, run as one op over the packed batch.

    ``geglu=True`` is ONE-PEACE's GeGLU (``wi_0`` gate and ``wi_1`` without bias, GELU on
    the gate) with the sub-LN over the hidden units; ``geglu=False`` is a GELU MLP with biases.
    """

    def __init__(self, num_modalities: int, dim: int, hidden: int, geglu: bool = True,
                 sub_ln: bool = True, init_std: float = 0.02) -> None:
        super().__init__()
        M = num_modalities
        self.eps = 1e-5
        self.w_in = nn.Parameter(torch.randn(M, dim, hidden) * init_std)
        self.w_gate = nn.Parameter(torch.randn(M, dim, hidden) * init_std) if geglu else None
        self.b_in = None if geglu else nn.Parameter(torch.zeros(M, hidden))
        self.ln_weight = nn.Parameter(torch.ones(M, hidden)) if sub_ln else None
        self.ln_bias = nn.Parameter(torch.zeros(M, hidden)) if sub_ln else None
        self.w_out = nn.Parameter(torch.randn(M, hidden, dim) * init_std)
        self.b_out = nn.Parameter(torch.zeros(M, dim))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return ops.routed_ffn(x, modality, self.w_in, self.w_out, b_in=self.b_in, b_out=self.b_out,
                              w_gate=self.w_gate, ln_weight=self.ln_weight, ln_bias=self.ln_bias,
                              eps=self.eps)


class ModalityLayerNorm(nn.Module):
    """LayerNorm whose affine parameters are chosen per token by its modality."""

    def __init__(self, num_modalities: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, dim))
        self.bias = nn.Parameter(torch.zeros(num_modalities, dim))

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        # A one-hot matmul picks each token's affine: its backward is a [M, T] @ [T, D]
        # GEMM, where indexing would scatter-accumulate T rows into M (slow on CPU).
        pick = F.one_hot(modality.long(), self.weight.shape[0]).to(x.dtype)
        return ops.layer_norm(x, eps=self.eps) * (pick @ self.weight) + pick @ self.bias
