"""The ``native`` backend of :func:`omni_core.ops.varlen_attention`: the C++ kernels of
``csrc/varlen_attention*.cpp`` (built into ``omni_core._C``) under a
:class:`torch.autograd.Function`.

What it runs: plain self-attention over packed sequences (equal query and key heads, no
causal mask, no LSE output), with or without the learned per-modality relative-position
bias, forward and backward (dq, dk, dv and d``bias_table``, the last skipped when the table
needs no gradient). Its ``modes`` attribute is empty, so by the dispatch rule of
:mod:`omni_core.ops.attention` every call using ``causal``, ``cu_seqlens_k``, GQA or
``return_lse`` goes to the torch reference (or fails, when ``OMNI_BACKEND=native`` forces this
backend).

Dtypes: float32 and float64 run as they are; bfloat16 and float16 (what ``torch.autocast``
hands over) are computed in float32 and the results cast back, so the softmax and every sum
accumulate in float32. The kernel is compiled for DEFAULT, AVX2 and AVX512 and picks the
one matching ``torch.backends.cpu.get_cpu_capability()`` (``ATEN_CPU_CAPABILITY`` lowers it).
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
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, bias_table, bias_lut, modality, position):
        out, lse = _ops().varlen_attention_fwd(q, k, v, cu_seqlens, scale, bias_table, bias_lut, modality, position)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, bias_table, bias_lut, modality, position)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, bias_table, bias_lut, modality, position = ctx.saved_tensors
        table_grad = bias_table is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dtable = _ops().varlen_attention_bwd(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.scale, bias_table, bias_lut, modality, position,
            table_grad)
        return dq, dk, dv, None, None, dtable if table_grad else None, None, None, None


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
) -> torch.Tensor:
    """Same arguments and result as the reference's plain mode (inputs already validated)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = q.dtype if q.dtype in KERNEL_DTYPES else torch.float32
    q32, k32, v32 = (t.to(dtype) for t in (q, k, v))
    table = bias_table.to(dtype) if bias_table is not None else None
    out = _NativeVarlenAttention.apply(q32, k32, v32, cu_seqlens, float(scale), table, bias_lut, modality, position)
    return out.to(q.dtype)


native_varlen_attention.modes = frozenset()  # plain self-attention only: see the module docstring


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
    return native_varlen_attention


dispatch.register(OP, "native", _load)


def _register_fake_kernels() -> None:
    """Shape-only versions of the two ops, so ``torch.compile`` traces through them."""

    @torch.library.register_fake("omni_native::varlen_attention_fwd")
    def _fwd(q, k, v, cu_seqlens, scale, bias_table, bias_lut, modality, position, out_buf=None, lse_buf=None):
        return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[1])

    @torch.library.register_fake("omni_native::varlen_attention_bwd")
    def _bwd(dout, q, k, v, out, lse, cu_seqlens, scale, bias_table, bias_lut, modality, position, table_grad):
        dtable = torch.empty_like(bias_table) if table_grad and bias_table is not None else q.new_empty(0)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtable


try:
    _load()
    _register_fake_kernels()
except dispatch.BackendUnavailable:  # not built: the loader says so when asked
    pass
