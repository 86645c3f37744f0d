"""The precision policy: what auto resolves to on which machine, and the autocast it gives."""

from __future__ import annotations

import pytest
import torch

from omni_core import precision
from omni_core.precision import resolve_precision


def _fake_cpu(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize("amx, avx512_bf16, want", [
    (False, False, None), (False, True, torch.bfloat16), (True, False, torch.bfloat16),
])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, amx, avx512_bf16, want):
    _fake_cpu(monkeypatch, amx, avx512_bf16)
    got = resolve_precision("auto", "cpu")
    assert got.dtype == want
    assert got.description.startswith("bf16" if want else "fp32")
    assert ("AMX" in got.description) == amx and ("AVX512-BF16" in got.description) == avx512_bf16


def test_explicit_choices_win(monkeypatch):
    _fake_cpu(monkeypatch, False, False)
    assert resolve_precision("fp32", "cpu").dtype is None
    bf16 = resolve_precision("bf16", "cpu")
    assert bf16.dtype == torch.bfloat16 and "emulated" in bf16.description


def test_this_machine_matches_torch():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (resolve_precision("auto").dtype == torch.bfloat16) == native


def test_cuda_auto_is_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda").dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda").dtype is None


def test_autocast_runs_matmuls_in_the_chosen_dtype():
    a = torch.randn(4, 4)
    with precision.Precision(torch.bfloat16, "").autocast("cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with precision.Precision(None, "").autocast("cpu"):
        assert (a @ a).dtype == torch.float32


def test_bad_name_is_rejected():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
