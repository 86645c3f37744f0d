"""The functional API: the stable public surface of omni-core.

Each op validates its inputs, then dispatches per call (see :mod:`omni_core.ops.dispatch`)
to the Triton kernel, the native CPU code or the torch reference.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from omni_core.ops import dispatch
from omni_core.ops.attention import varlen_attention, varlen_attention_reference
from omni_core.ops.dispatch import BackendUnavailable
from omni_core.ops.ffn import routed_ffn, routed_ffn_reference
from omni_core.ops.kvcache import attention_with_kvcache, attention_with_kvcache_reference
from omni_core.ops.norm import layer_norm, layer_norm_reference
from omni_core.ops.packing import PackedBatch, Segment
from omni_core.ops.routing import RoutingPlan, routing_plan

__all__ = [
    "BackendUnavailable",
    "PackedBatch",
    "RoutingPlan",
    "Segment",
    "attention_with_kvcache",
    "attention_with_kvcache_reference",
    "layer_norm",
    "layer_norm_reference",
    "routed_ffn",
    "routed_ffn_reference",
    "routing_plan",
    "varlen_attention",
    "varlen_attention_reference",
]


def _kernel_loader(module: str, attr: str) -> Callable[[], Callable]:
    """Import ``omni_core.kernels.<module>.<attr>`` lazily; a missing kernel is a clear error."""

    def load() -> Callable:
        try:
            mod = importlib.import_module(f"omni_core.kernels.{module}")
            return getattr(mod, attr)
        except (ImportError, AttributeError) as err:
            raise BackendUnavailable(f"Triton kernel omni_core.kernels.{module}.{attr} is unavailable: {err}") from err

    return load


def _native_loader(attr: str) -> Callable[[], Callable]:
    def load() -> Callable:
        try:
            native = importlib.import_module("omni_core._C")
        except ImportError as err:
            raise BackendUnavailable(f"omni_core._C is not built: {err}") from err
        if not hasattr(native, attr):
            raise BackendUnavailable(f"omni_core._C has no native {attr}")
        return getattr(native, attr)

    return load


def _routed_ffn_triton_loader() -> Callable:
    """The grouped-GEMM kernel fed with the batch's memoised routing plan, so the tokens
    are sorted by modality once per batch rather than once per layer."""
    grouped = _kernel_loader("routed_ffn", "routed_ffn_grouped")()

    def run(x, modality, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, eps):
        plan = routing_plan(modality, w_in.shape[0])
        return grouped(x, plan.perm_i32, plan.offsets_i32, w_in, w_out, b_in, b_out, w_gate,
                       ln_weight, ln_bias, eps)

    return run


for _op, _module, _attr in (
    ("varlen_attention", "varlen_attention", "varlen_attention_triton"),
    ("layer_norm", "layer_norm", "layer_norm_triton"),
    ("attention_with_kvcache", "decode_attention", "decode_attention_triton"),
):
    dispatch.register(_op, "triton", _kernel_loader(_module, _attr))
dispatch.register("routed_ffn", "triton", _routed_ffn_triton_loader)
for _op in ("routed_ffn", "layer_norm"):
    dispatch.register(_op, "native", _native_loader(_op))
# The native CPU varlen attention (csrc/varlen_attention*.cpp) registers itself.
from omni_core.ops import native_attention  # noqa: E402, F401
