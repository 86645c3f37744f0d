"""``layer_norm``: LayerNorm over the last dim; the fused Triton kernel in
``kernels/layer_norm.py`` implements exactly ``torch.nn.functional.layer_norm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_core.ops import dispatch

OP = "layer_norm"


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm of ``x [..., D]`` with optional ``weight``/``bias`` ``[D]``."""
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (D,):
            raise ValueError(f"{name} must be [{D}], got {list(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    _, impl = dispatch.resolve(OP, x.device)
    return impl(x, weight, bias, eps)


dispatch.register(OP, "reference", lambda: layer_norm_reference)
