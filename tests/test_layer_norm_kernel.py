"""The Triton LayerNorm (kernels/layer_norm.py) under the interpreter, against float64.

Error metric: ``||out - ref|| / ||ref||`` against ``torch.nn.functional.layer_norm`` in
float64, for y, dx, dweight and dbias. The kernel must be within 2x the error of the same
torch op run in the same dtype on CPU (fp16/bf16 LayerNorm and its backward run natively
there at these sizes) plus a tiny absolute floor, and under the caps of ARCHITECTURE.md.
Every buffer the kernels write is NaN-poisoned first, so an unwritten element fails.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omni_core.kernels import layer_norm as ln_kernels  # noqa: E402

from omni_core.ops import layer_norm  # noqa: E402

CAPS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# A single row of one element, a prime width, a 3-D input, more rows than one backward chunk.
SHAPES = [(1, 1), (7, 37), (3, 5, 53), (131, 96)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ln_kernels, "POISON_OUTPUTS", True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def run(fn, x, weight, bias, dy, dtype):
    leaves = [t.to(dtype, copy=True).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves, 1e-5)
    y.backward(dy.to(dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def torch_ln(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@pytest.mark.parametrize("affine", ["weight_bias", "weight_only", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_output_and_every_gradient(dtype, shape, affine):
    N = shape[-1]
    x = torch.randn(shape) * 2.0 + 0.5  # a mean away from zero exercises the centring
    weight = 1.0 + 0.3 * torch.randn(N) if affine != "none" else None
    bias = 0.3 * torch.randn(N) if affine == "weight_bias" else None
    dy = torch.randn(shape)
    y64, g64 = run(torch_ln, x, weight, bias, dy, torch.float64)
    y_torch, g_torch = run(torch_ln, x, weight, bias, dy, dtype)
    y_tri, g_tri = run(ln_kernels.layer_norm_triton, x, weight, bias, dy, dtype)

    assert y_tri.shape == x.shape and y_tri.dtype == dtype
    results = {"y": (y_tri, y_torch, y64)}
    for name, tri, base, ref in zip(("dx", "dweight", "dbias"), g_tri, g_torch, g64):
        assert (tri is None) == (ref is None), name
        if ref is not None:
            results[name] = (tri, base, ref)
    for name, (tri, base, ref) in results.items():
        assert tri.dtype == dtype and tri.shape == ref.shape, name
        assert torch.isfinite(tri).all(), f"{name}: non-finite (unwritten) elements"
        if ref.abs().max() < 1e-9:  # N == 1: xhat is 0 (up to fp64 noise), so dx = dweight = 0
            assert (tri.double() - ref).abs().max() <= FLOOR[dtype], name
            continue
        err, base_err = rel_err(tri, ref), rel_err(base, ref)
        assert err <= 2 * base_err + FLOOR[dtype], f"{name}: {err:.3e} vs torch {dtype} {base_err:.3e}"
        assert err <= CAPS[dtype], f"{name}: {err:.3e} over the {dtype} cap"


def test_public_op_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setenv("OMNI_BACKEND", "triton")
    calls = []
    real = ln_kernels.layer_norm_fwd_grouped
    monkeypatch.setattr(ln_kernels, "layer_norm_fwd_grouped", lambda *a: calls.append(1) or real(*a))
    x, w, b = torch.randn(9, 40), torch.randn(40), torch.randn(40)
    y = layer_norm(x, w, b)
    assert calls == [1]
    assert rel_err(y, torch_ln(x.double(), w.double(), b.double(), 1e-5)) <= CAPS[torch.float32]


AFFINE = ["weight_bias", "weight_only", "none"]


def _ln_args(affine: str, strided: bool) -> tuple:
    x = torch.randn(6, 24) * 2.0 + 0.5
    if strided:  # same values, column-major storage: y must still come out contiguous
        x = x.t().contiguous().t()
    w = (1.0 + 0.3 * torch.randn(24)).requires_grad_() if affine != "none" else None
    b = (0.3 * torch.randn(24)).requires_grad_() if affine == "weight_bias" else None
    return x.requires_grad_(), w, b, 1e-5


@pytest.mark.parametrize("affine", AFFINE)
def test_custom_op_registration(affine):
    """Schema, fakes and autograd registration agree with the real op, strided input included."""
    for strided in (False, True):
        torch.library.opcheck(torch.ops.omni_core.layer_norm_fwd.default, _ln_args(affine, strided),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("affine", AFFINE)
def test_torch_compile_fullgraph(affine):
    import torch._dynamo

    torch._dynamo.reset()
    args = _ln_args(affine, False)
    leaves = [a for a in args[:3] if a is not None]

    def fn(x, w, b, eps):
        return ln_kernels.layer_norm_triton(x, w, b, eps)

    dy = torch.randn(args[0].shape)
    y = torch.compile(fn, fullgraph=True)(*args)
    compiled = torch.autograd.grad(y, leaves, dy)
    eager = torch.autograd.grad(fn(*args), leaves, dy)
    assert torch.equal(y, fn(*args))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.fixture
def triton_without_launch(monkeypatch):
    """Force the Triton backend with a launcher that fails the test if it is ever reached."""
    monkeypatch.setenv("OMNI_BACKEND", "triton")

    def no_launch(*_args):
        raise AssertionError("a kernel launched for invalid input")

    monkeypatch.setattr(ln_kernels, "layer_norm_fwd_grouped", no_launch)


def test_wrong_weight_shape_fails_before_launch(triton_without_launch):
    with pytest.raises(ValueError, match=r"weight must be \[40\]"):
        layer_norm(torch.randn(9, 40), torch.randn(41))


def test_weight_on_another_device_fails_before_launch(triton_without_launch):
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        layer_norm(torch.randn(9, 40), torch.empty(40, device="meta"))
