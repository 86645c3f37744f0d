"""Precision policy: which dtype the matmuls run in, chosen from the machine.

``--precision auto|fp32|bf16`` (every command that trains, evaluates, embeds or benchmarks):

* ``fp32`` — no autocast.
* ``bf16`` — ``torch.autocast`` to bfloat16 (matmuls and attention projections in bf16,
  reductions and norms in fp32 as autocast's op lists decide), whatever the hardware.
* ``auto`` — bf16 where the device computes it natively, fp32 elsewhere. On a CPU that means
  AVX512-BF16 or AMX tiles, as torch reports them: such a CPU runs bf16 matmuls several times
  faster than fp32 (measured 352 vs 95-166 GFLOP/s on a 2-core AMD EPYC with AVX512-BF16),
  while an AVX2-only CPU emulates them about 300x slower (0.3 GFLOP/s). On CUDA, bf16 where
  the GPU supports it (Ampere and later).

:func:`resolve_precision` returns the dtype (``None`` for fp32) and a one-line description
to print and write into a run's summary; :meth:`Precision.autocast` is the context to run
the step under. Inside it the models' convolutional stems stay in fp32 (the adapters'
autocast policy, ``omni_core/model/adapters.py``): bf16 stems gave their LayerNorms'
gradients errors of 50-100 %.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import NamedTuple

import torch

PRECISIONS = ("auto", "fp32", "bf16")


class Precision(NamedTuple):
    dtype: torch.dtype | None  # the autocast dtype; None runs in fp32
    description: str

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The context to run forward passes under (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.dtype)


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the features torch reports."""
    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    features = [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]
    capability = torch.backends.cpu.get_cpu_capability()
    found = ", ".join(features) if features else "no native bf16"
    return bool(features), f"{capability} CPU, {found}"


def resolve_precision(name: str, device: torch.device | str = "cpu") -> Precision:
    """Resolve ``auto``/``fp32``/``bf16`` for ``device`` into a :class:`Precision`."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    device = torch.device(device)
    if name == "fp32":
        return Precision(None, "fp32 (asked for)")
    if device.type == "cpu":
        native, features = cpu_bf16_support()
        if name == "bf16":
            slow = "" if native else "; emulated, expect it to be much slower than fp32"
            return Precision(torch.bfloat16, f"bf16 autocast (asked for; {features}{slow})")
        if native:
            return Precision(torch.bfloat16, f"bf16 autocast (auto: {features})")
        return Precision(None, f"fp32 (auto: {features})")
    if device.type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if name == "bf16" or supported:
            return Precision(torch.bfloat16, f"bf16 autocast ({'asked for' if name == 'bf16' else 'auto'}: "
                                             f"{'GPU supports bf16' if supported else 'GPU without native bf16'})")
        return Precision(None, "fp32 (auto: GPU without native bf16)")
    if name == "bf16":
        return Precision(torch.bfloat16, f"bf16 autocast (asked for, on {device.type})")
    return Precision(None, f"fp32 (auto: no bf16 policy for {device.type})")


def add_precision_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """Add ``--precision auto|fp32|bf16`` to a command's parser."""
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help="matmul precision: auto picks bf16 where the device computes it natively "
                             f"(default {default})")
