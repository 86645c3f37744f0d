"""``routed_ffn``: each token goes through the FFN of its modality.

For a token of modality m: ``u = x @ w_in[m] (+ b_in[m])``; ``h = gelu(x @ w_gate[m]) * u``
with ``w_gate`` (GeGLU, as ONE-PEACE) else ``h = gelu(u)``; with ``ln_weight``,
``h = layer_norm(h) * ln_weight[m] + ln_bias[m]`` over the hidden dim (ONE-PEACE's
sub-LN); ``y = h @ w_out[m] (+ b_out[m])``. GELU is the exact erf form. Shapes:
``w_in``/``w_gate [M, D, F]``, ``w_out [M, F, D]``, ``b_in``/``ln_weight``/``ln_bias [M, F]``,
``b_out [M, D]``. The Triton kernel in ``kernels/routed_ffn.py`` implements exactly this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_core.ops import dispatch
from omni_core.ops.memo import memoised
from omni_core.ops.routing import routing_plan

OP = "routed_ffn"


def validate_routed_ffn(
    x: torch.Tensor,
    modality: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
) -> None:
    """Raise ValueError/TypeError naming the problem; shared by every backend."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if w_in.dim() != 3:
        raise ValueError(f"w_in must be [M, D, F], got shape {tuple(w_in.shape)}")
    T, D = x.shape
    M, D_in, F_hidden = w_in.shape
    if D_in != D:
        raise ValueError(f"w_in is [M, {D_in}, F] but x has D={D}")
    expected = {
        "w_out": (M, F_hidden, D),
        "w_gate": (M, D, F_hidden),
        "b_in": (M, F_hidden),
        "b_out": (M, D),
        "ln_weight": (M, F_hidden),
        "ln_bias": (M, F_hidden),
    }
    given = {"w_out": w_out, "w_gate": w_gate, "b_in": b_in, "b_out": b_out,
             "ln_weight": ln_weight, "ln_bias": ln_bias}
    for name, t in given.items():
        if t is None:
            continue
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {list(expected[name])}, got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
    if w_in.dtype != x.dtype:
        raise TypeError(f"w_in has dtype {w_in.dtype} but x has {x.dtype}")
    if ln_bias is not None and ln_weight is None:
        raise ValueError("ln_bias was given without ln_weight")
    devices = {n: t.device for n, t in {"x": x, "modality": modality, "w_in": w_in, **given}.items()
               if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")
    if modality.shape != (T,) or modality.dtype.is_floating_point or modality.dtype == torch.bool:
        raise ValueError(f"modality must be an integer [T={T}] tensor, got {tuple(modality.shape)} {modality.dtype}")
    # Reads modality back to the host: once per batch, not per layer.
    memoised(("checked ffn modality", M), (modality,), lambda: _check_modality_range(modality, M))


def _check_modality_range(modality: torch.Tensor, M: int) -> None:
    if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= M):
        raise ValueError(
            f"modality ids must lie in [0, {M}) (the weights hold M={M} FFNs), "
            f"got min {int(modality.min())} max {int(modality.max())}"
        )


def routed_ffn_reference(
    x: torch.Tensor,
    modality: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    w_gate: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Plain torch, any dtype: one GEMM chain per modality over its slice of the plan."""
    plan = routing_plan(modality, w_in.shape[0])
    # split/unbind (not slicing/indexing) so backward concatenates instead of zero-filling.
    groups = torch.split(x.index_select(0, plan.perm), list(plan.counts))
    per_modality = [t.unbind(0) if t is not None else [None] * len(groups)
                    for t in (w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias)]
    outs = []
    for xm, wi, wo, bi, bo, wg, lw, lb in zip(groups, *per_modality):
        u = xm @ wi
        if bi is not None:
            u = u + bi
        h = F.gelu(xm @ wg) * u if wg is not None else F.gelu(u)
        if lw is not None:
            h = F.layer_norm(h, (h.shape[-1],), lw, lb, eps)
        y = h @ wo
        if bo is not None:
            y = y + bo
        outs.append(y)
    return torch.cat(outs).index_select(0, plan.inverse)


def routed_ffn(
    x: torch.Tensor,
    modality: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    *,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    w_gate: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Modality-routed FFN; see the module docstring. Returns ``[T, D]`` in x's dtype.

    Differentiable in x and every weight; a modality without tokens gets zero gradients.
    """
    validate_routed_ffn(x, modality, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias)
    _, impl = dispatch.resolve(OP, x.device)
    return impl(x, modality, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, eps)


dispatch.register(OP, "reference", lambda: routed_ffn_reference)
