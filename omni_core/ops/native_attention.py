"""The ``native`` backend of :func:`omni_core.ops.varlen_attention`: the C++ kernels of
``csrc/varlen_attention*.cpp`` (built into ``omni_core._C``) under a
:class:`torch.autograd.Function`.

What it runs: every mode of the contract — self-attention with or without the learned
per-modality relative-position bias (its LUT dense ``[M, P, P]``, relative ``[M, 2P-1]`` or
CLS-aware ``[M, 2P+2]``), ``causal`` (bottom-right aligned), cross-attention
(``cu_seqlens_k``), grouped-query heads (Hk < H) and ``return_lse`` — forward and backward
(dq, dk, dv, d``bias_table`` — skipped when the table needs no gradient — and the gradient
flowing back through a returned lse). Its ``modes`` attribute lists them all, so dispatch
never sends a CPU call elsewhere.

Dtypes: float32 and float64 run as they are; bfloat16 and float16 (what ``torch.autocast``
hands over) are computed in float32 and the results cast back, so the softmax and every sum
accumulate in float32 (the lse comes back in float32, as the contract says). The kernel is
compiled for DEFAULT, AVX2 and AVX512 and picks the one matching
``torch.backends.cpu.get_cpu_capability()`` (``ATEN_CPU_CAPABILITY`` lowers it).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

from omni_core.ops import dispatch

OP = "varlen_attention"
KERNEL_DTYPES = (torch.float32, torch.float64)


def _ops():
    return torch.ops.omni_native


class _NativeVarlenAttention(torch.autograd.Function):
    """Returns ``(out [Tq, H, Dh], lse [Tq, H])``; both are differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, cu_seqlens_k, causal, scale, bias_table, bias_lut, modality, position):
        out, lse = _ops().varlen_attention_fwd(q, k, v, cu_seqlens, scale, bias_table, bias_lut, modality, position,
                                               cu_seqlens_k, causal)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cu_seqlens_k, bias_table, bias_lut, modality, position)
        ctx.scale, ctx.causal = scale, causal
        ctx.set_materialize_grads(False)  # an unused lse brings no gradient: no zero [Tq, H] is made
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens, cu_seqlens_k, bias_table, bias_lut, modality, position = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        table_grad = bias_table is not None and ctx.needs_input_grad[7]
        dq, dk, dv, dtable = _ops().varlen_attention_bwd(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.scale, bias_table, bias_lut, modality, position,
            table_grad, cu_seqlens_k, ctx.causal, dlse)
        return dq, dk, dv, None, None, None, None, dtable if table_grad else None, None, None, None


def native_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    bias_table: torch.Tensor | None = None,
    bias_lut: torch.Tensor | None = None,
    modality: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
    *,
    causal: bool = False,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and result as :func:`~omni_core.ops.attention.varlen_attention_reference`
    (inputs already validated)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = q.dtype if q.dtype in KERNEL_DTYPES else torch.float32
    q32, k32, v32 = (t.to(dtype) for t in (q, k, v))
    table = bias_table.to(dtype) if bias_table is not None else None
    out, lse = _NativeVarlenAttention.apply(q32, k32, v32, cu_seqlens, cu_seqlens_k, bool(causal), float(scale),
                                            table, bias_lut, modality, position)
    out = out.to(q.dtype)
    return (out, lse.t().contiguous()) if return_lse else out


native_varlen_attention.modes = frozenset(("causal", "cross", "gqa", "lse", "relative_lut"))


def capability() -> str:
    """The instruction set the loaded kernel uses: ``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``."""
    _load()
    return _ops().varlen_attention_capability()


def _load() -> Callable:
    try:
        importlib.import_module("omni_core._C")
    except ImportError as err:
        raise dispatch.BackendUnavailable(f"omni_core._C is not built: {err}") from err
    if not hasattr(_ops(), "varlen_attention_fwd"):
        raise dispatch.BackendUnavailable("omni_core._C was built without the native varlen attention "
                                          "(rebuild: pip install --no-build-isolation -e .)")
    if "causal" not in {a.name for a in _ops().varlen_attention_fwd.default._schema.arguments}:
        raise dispatch.BackendUnavailable("omni_core._C is an older build without causal, cross-attention and GQA "
                                          "(rebuild: pip install --no-build-isolation -e .)")
    return native_varlen_attention


dispatch.register(OP, "native", _load)


def _register_fake_kernels() -> None:
    """Shape-only versions of the two ops, so ``torch.compile`` traces through them."""

    @torch.library.register_fake("omni_native::varlen_attention_fwd")
    def _fwd(q, k, v, cu_seqlens, scale, bias_table, bias_lut, modality, position, cu_seqlens_k=None, causal=False,
             out_buf=None, lse_buf=None):
        return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[1])

    @torch.library.register_fake("omni_native::varlen_attention_bwd")
    def _bwd(dout, q, k, v, out, lse, cu_seqlens, scale, bias_table, bias_lut, modality, position, table_grad,
             cu_seqlens_k=None, causal=False, dlse=None):
        dtable = torch.empty_like(bias_table) if table_grad and bias_table is not None else q.new_empty(0)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtable


try:
    _load()
    _register_fake_kernels()
except dispatch.BackendUnavailable:  # not built: the loader says so when asked
    pass
