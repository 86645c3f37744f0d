"""Per-call backend choice for every op in :mod:`omni_core.ops`.

Rules (ARCHITECTURE.md, "Dispatch"):

* ``OMNI_BACKEND=reference|triton|native`` forces one backend; a forced backend that
  cannot run is a :class:`BackendUnavailable` error, never a silent fallback.
* Otherwise: Triton on CUDA tensors, and under ``TRITON_INTERPRET=1`` only when forced;
  on CPU tensors the native (``omni_core._C``) path when it implements the op, else
  the torch reference.

An op registers implementations with :func:`register`; a loader returns the callable or
raises :class:`BackendUnavailable` saying why (not built, Triton missing, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

BACKENDS = ("reference", "triton", "native")


class BackendUnavailable(RuntimeError):
    """A backend was asked for (or forced) but cannot run this call."""


_LOADERS: dict[tuple[str, str], Callable[[], Callable]] = {}


def register(op: str, backend: str, loader: Callable[[], Callable]) -> None:
    """Register ``loader`` (called lazily, may raise BackendUnavailable) for ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _LOADERS[(op, backend)] = loader


def forced_backend() -> str | None:
    name = os.environ.get("OMNI_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise BackendUnavailable(f"OMNI_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(op: str, backend: str) -> Callable:
    loader = _LOADERS.get((op, backend))
    if loader is None:
        raise BackendUnavailable(f"{op}: no {backend!r} implementation exists")
    return loader()


def resolve(op: str, device: torch.device) -> tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` for a call of ``op`` on ``device``."""
    forced = forced_backend()
    if forced is not None:
        if forced == "triton" and device.type != "cuda" and not interpreting():
            raise BackendUnavailable(
                f"{op}: OMNI_BACKEND=triton needs CUDA tensors or TRITON_INTERPRET=1 "
                f"(got tensors on {device})"
            )
        return forced, _load(op, forced)
    preferred = ("triton", "reference") if device.type == "cuda" else ("native", "reference")
    for backend in preferred:
        try:
            return backend, _load(op, backend)
        except BackendUnavailable:
            continue
    raise BackendUnavailable(f"{op}: no backend can run on {device}")
