"""Ahead-of-time compilation descriptors shared by every kernel module.

Each kernel module exposes ``aot_configs() -> list[AotConfig]``: one entry per
(kernel, autotune config, dtype) that ``benchmarks/kernel_report.py`` compiles for
sm_80 and sm_90 with ``triton.compile`` and a ``GPUTarget`` (no GPU needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotConfig:
    kernel: str  # e.g. "varlen_attention_fwd"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # values of the constexpr arguments (block sizes, flags)
    num_warps: int
    num_stages: int
    label: str  # human-readable config, e.g. "BLOCK_M=128 BLOCK_N=64"
    dtype: str  # "fp16" | "bf16" | "fp32"
    flops: int = 0  # FLOPs of the module's reference problem
    min_bytes: int = 0  # minimum bytes moved by that problem
    extra: dict[str, Any] = field(default_factory=dict)
    # Integer arguments the JIT would specialise as multiples of 16 (e.g. strides of
    # contiguous [T, H, Dh] tensors); pointers are always assumed 16-byte aligned, as the
    # JIT assumes for fresh torch allocations. Without these hints loads are not vectorised.
    divisible_by_16: tuple[str, ...] = ()
