"""The Triton routed FFN (kernels/routed_ffn.py) under the interpreter, against float64.

Error metric: ``||out - ref|| / ||ref||`` against ``routed_ffn_reference`` in float64, for the
output and every gradient. The kernel must be within 2x the error of the same-precision torch
implementation (``routed_ffn_reference`` run with CPU torch in that dtype, autograd included:
at these sizes CPU fp16/bf16 matmul is fast enough, so the baseline is real torch, not an
emulation) plus a tiny absolute floor, and under the fixed caps of ARCHITECTURE.md.
Every buffer the kernels write is NaN-poisoned first, so an unwritten element fails.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from omni_core.kernels import layer_norm as ln_kernels  # noqa: E402
from omni_core.kernels import routed_ffn as ffn_kernels  # noqa: E402
from omni_core.kernels.routed_ffn import fwd as ffn_fwd  # noqa: E402
from omni_core.kernels.routed_ffn import op as ffn_op  # noqa: E402

from omni_core.ops import routed_ffn, routed_ffn_reference  # noqa: E402

CAPS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
NAMES = ("x", "w_in", "w_out", "b_in", "b_out", "w_gate", "ln_weight", "ln_bias")
# ONE-PEACE's GeGLU + sub-LN, GeGLU alone with biases, sub-LN without its bias, plain GELU.
VARIANTS = {
    "geglu_subln": ("w_gate", "ln_weight", "ln_bias"),
    "geglu_bias": ("w_gate", "b_in", "b_out"),
    "geglu_subln_nobias": ("w_gate", "ln_weight"),
    "gelu_bias": ("b_in", "b_out"),
}
# Odd sizes, multiples of no block size; interpreter tiles are (32, 64, 32).
T, D, F, M = 45, 37, 71, 3


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ln_kernels, "POISON_OUTPUTS", True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def make_modality(layout: str) -> torch.Tensor:
    if layout == "mixed":  # every modality present, interleaved
        return torch.randint(0, M, (T,))
    # modality 0 empty, modality 2 a single token, the rest modality 1
    ids = torch.ones(T, dtype=torch.int64)
    ids[T // 3] = 2
    return ids


def make_params(variant: str) -> dict[str, torch.Tensor | None]:
    used = VARIANTS[variant]
    p = {
        "x": torch.randn(T, D),
        "w_in": torch.randn(M, D, F) * D**-0.5,
        "w_out": torch.randn(M, F, D) * F**-0.5,
        "w_gate": torch.randn(M, D, F) * D**-0.5,
        "b_in": torch.randn(M, F) * 0.5,
        "b_out": torch.randn(M, D) * 0.5,
        "ln_weight": 1.0 + 0.3 * torch.randn(M, F),
        "ln_bias": 0.3 * torch.randn(M, F),
    }
    return {k: (v if k in ("x", "w_in", "w_out") or k in used else None) for k, v in p.items()}


def run(fn, params, modality, dtype, dy):
    leaves = {k: (v.to(dtype, copy=True).requires_grad_() if v is not None else None) for k, v in params.items()}
    y = fn(leaves["x"], modality, leaves["w_in"], leaves["w_out"], leaves["b_in"], leaves["b_out"],
           leaves["w_gate"], leaves["ln_weight"], leaves["ln_bias"], 1e-5)
    y.backward(dy.to(dtype))
    return y.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def reference(x, modality, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, eps):
    return routed_ffn_reference(x, modality, w_in, w_out, b_in, b_out, w_gate, ln_weight, ln_bias, eps)


@pytest.mark.parametrize("layout", ["mixed", "empty_and_single"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_output_and_every_gradient(dtype, variant, layout):
    params = make_params(variant)
    modality = make_modality(layout)
    dy = torch.randn(T, D)
    y64, g64 = run(reference, params, modality, torch.float64, dy)
    y_torch, g_torch = run(reference, params, modality, dtype, dy)
    y_tri, g_tri = run(ffn_kernels.routed_ffn_triton, params, modality, dtype, dy)

    assert y_tri.dtype == dtype and all(g.dtype == dtype for g in g_tri.values())
    assert set(g_tri) == set(g64)
    results = {"y": (y_tri, y_torch, y64), **{k: (g_tri[k], g_torch[k], g64[k]) for k in g64}}
    for name, (tri, base, ref) in results.items():
        assert torch.isfinite(tri).all(), f"{name}: non-finite (unwritten) elements"
        err, base_err = rel_err(tri, ref), rel_err(base, ref)
        assert err <= 2 * base_err + FLOOR[dtype], f"{name}: {err:.3e} vs torch {dtype} {base_err:.3e}"
        assert err <= CAPS[dtype], f"{name}: {err:.3e} over the {dtype} cap"

    # A modality without tokens gets exactly zero weight gradients.
    for m in range(M):
        if not (modality == m).any():
            for name, grad in g_tri.items():
                if name != "x":
                    assert torch.count_nonzero(grad[m]) == 0, f"{name}[{m}] of an empty modality"


def test_no_tokens_at_all():
    params = make_params("geglu_subln")
    params["x"] = torch.randn(0, D)
    y, grads = run(ffn_kernels.routed_ffn_triton, params, torch.zeros(0, dtype=torch.int64),
                   torch.float32, torch.randn(0, D))
    assert y.shape == (0, D)
    for name, grad in grads.items():
        assert grad.shape == params[name].shape
        assert torch.count_nonzero(grad) == 0, name


def test_public_op_dispatches_to_the_kernel(monkeypatch):
    """``omni_core.ops.routed_ffn`` with OMNI_BACKEND=triton runs this kernel."""
    monkeypatch.setenv("OMNI_BACKEND", "triton")
    calls = []
    real = ffn_op._forward
    monkeypatch.setattr(ffn_op, "_forward", lambda *a: calls.append(1) or real(*a))
    p = {k: v for k, v in make_params("geglu_subln").items() if v is not None}
    modality = make_modality("mixed")
    y = routed_ffn(p["x"], modality, p["w_in"], p["w_out"], w_gate=p["w_gate"],
                   ln_weight=p["ln_weight"], ln_bias=p["ln_bias"])
    assert calls == [1]
    ref = routed_ffn_reference(*(t.double() for t in (p["x"],)), modality,
                               p["w_in"].double(), p["w_out"].double(), w_gate=p["w_gate"].double(),
                               ln_weight=p["ln_weight"].double(), ln_bias=p["ln_bias"].double())
    assert rel_err(y, ref) <= CAPS[torch.float32]


# Every specialisation of the custom op: gate (GeGLU/GELU) x sub-LN x b_out.
OP_VARIANTS = [(gated, ln, b_out) for gated in (True, False) for ln in (True, False) for b_out in (True, False)]


def _op_args(gated: bool, ln: bool, b_out: bool, strided_x: bool = False) -> tuple:
    """Arguments of ``routed_ffn_fwd`` for a variant; all float leaves require grad."""
    p = make_params("geglu_subln")
    n = 9
    x = p["x"][:n]
    if strided_x:  # same values, column-major storage: outputs must still be contiguous
        x = x.t().contiguous().t()
    perm, offsets = ffn_kernels.group_by_modality(make_modality("mixed")[:n], M)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    return (leaf(x), perm, offsets, leaf(p["w_in"]), leaf(p["w_out"]), None,
            leaf(torch.randn(M, D)) if b_out else None, leaf(p["w_gate"]) if gated else None,
            leaf(p["ln_weight"]) if ln else None, leaf(p["ln_bias"]) if ln else None, 1e-5)


@pytest.mark.parametrize(("gated", "ln", "b_out"), OP_VARIANTS,
                         ids=[f"{'geglu' if g else 'gelu'}-{'ln' if n else 'noln'}-{'bout' if b else 'nobout'}"
                              for g, n, b in OP_VARIANTS])
def test_custom_op_registration(gated, ln, b_out):
    """Schema, fake (meta) kernel and autograd registration agree with the real op, for every
    variant and for a strided x (the fakes must not copy strides the real outputs lack)."""
    for strided in (False, True):
        torch.library.opcheck(torch.ops.omni_core.routed_ffn_fwd.default, _op_args(gated, ln, b_out, strided),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize(("gated", "ln", "b_out"), OP_VARIANTS,
                         ids=[f"{'geglu' if g else 'gelu'}-{'ln' if n else 'noln'}-{'bout' if b else 'nobout'}"
                              for g, n, b in OP_VARIANTS])
def test_torch_compile_fullgraph(gated, ln, b_out):
    """``torch.compile(fullgraph=True)`` traces forward and backward through the fakes and runs
    the real kernels; output and gradients equal eager's."""
    import torch._dynamo

    torch._dynamo.reset()
    args = _op_args(gated, ln, b_out)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*a):
        return torch.ops.omni_core.routed_ffn_fwd(*a)[0]

    dy = torch.randn(args[0].shape)
    eager = torch.autograd.grad(fn(*args), leaves, dy)
    y = torch.compile(fn, fullgraph=True)(*args)
    compiled = torch.autograd.grad(y, leaves, dy)
    assert torch.equal(y, fn(*args))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# --- Bad input: clear errors from the public op before any kernel launch -------------------


def _good_inputs() -> dict:
    p = make_params("geglu_subln")
    return {"x": p["x"], "modality": make_modality("mixed"), "w_in": p["w_in"], "w_out": p["w_out"],
            "w_gate": p["w_gate"], "ln_weight": p["ln_weight"], "ln_bias": p["ln_bias"]}


def _bad(case: str) -> dict:
    inp = _good_inputs()
    if case == "modality_too_big":
        inp["modality"] = inp["modality"].clone()
        inp["modality"][3] = M
    elif case == "modality_negative":
        inp["modality"] = inp["modality"].clone()
        inp["modality"][0] = -1
    elif case == "w_out_shape":
        inp["w_out"] = torch.randn(M, F + 1, D)
    elif case == "w_gate_shape":
        inp["w_gate"] = torch.randn(M - 1, D, F)
    elif case == "w_in_vs_x":
        inp["w_in"] = torch.randn(M, D + 2, F)
    elif case == "mixed_dtypes":
        inp["w_out"] = inp["w_out"].half()
    elif case == "x_fp16_weights_fp32":
        inp["x"] = inp["x"].half()
    elif case == "meta_device":
        inp["w_gate"] = torch.empty(M, D, F, device="meta")
    return inp


@pytest.mark.parametrize(("case", "error", "message"), [
    ("modality_too_big", ValueError, r"modality ids must lie in \[0, 3\)"),
    ("modality_negative", ValueError, r"modality ids must lie in \[0, 3\)"),
    ("w_out_shape", ValueError, r"w_out must be \[3, 71, 37\]"),
    ("w_gate_shape", ValueError, r"w_gate must be \[3, 37, 71\]"),
    ("w_in_vs_x", ValueError, r"w_in is \[M, 39, F\] but x has D=37"),
    ("mixed_dtypes", TypeError, r"w_out has dtype torch.float16 but x has torch.float32"),
    ("x_fp16_weights_fp32", TypeError, r"dtype torch.float32 but x has torch.float16"),
    ("meta_device", ValueError, r"tensors are on different devices"),
])
def test_bad_input_fails_before_launch(monkeypatch, case, error, message):
    monkeypatch.setenv("OMNI_BACKEND", "triton")

    def no_launch(*_args):
        raise AssertionError("a kernel launched for invalid input")

    monkeypatch.setattr(ffn_op, "_forward", no_launch)
    inp = _bad(case)
    with pytest.raises(error, match=message):
        routed_ffn(inp.pop("x"), inp.pop("modality"), inp.pop("w_in"), inp.pop("w_out"), **inp)


@triton.jit
def _raster_probe(Offsets, Out, M, n_cols, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    m, start, end, col = ffn_fwd.raster(tl.program_id(0), Offsets, M, n_cols, BLOCK_M, GROUP_M)
    row = Out + tl.program_id(0) * 4
    tl.store(row, m)
    tl.store(row + 1, start)
    tl.store(row + 2, end)
    tl.store(row + 3, col)


def test_raster_covers_every_tile_once_grouped_per_modality():
    """Each (modality, row tile, column tile) gets exactly one program of the 1-D grid, spare
    programs get an empty range, and inside a modality GROUP_M row tiles share a column."""
    counts, block_m, group_m, n_cols = [5, 0, 23, 9], 2, 3, 4
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    M = len(counts)
    grid = (triton.cdiv(sum(counts), block_m) + M - 1) * n_cols
    out = torch.full((grid, 4), -1, dtype=torch.int32)
    _raster_probe[(grid,)](offsets, out, M, n_cols, BLOCK_M=block_m, GROUP_M=group_m)
    live = [tuple(r) for r in out.tolist() if r[1] < r[2]]
    want = {(m, int(offsets[m]) + t * block_m, min(int(offsets[m + 1]), int(offsets[m]) + (t + 1) * block_m), c)
            for m in range(M) for t in range(triton.cdiv(counts[m], block_m)) for c in range(n_cols)}
    assert sorted(live) == sorted(want)
    # ids are modality after modality; the first group_m row tiles of modality 2 sweep column 0 first
    first = [r for r in out.tolist() if r[0] == 2][:group_m]
    assert [r[3] for r in first] == [0] * group_m
    assert [r[1] for r in first] == [int(offsets[2]) + t * block_m for t in range(group_m)]
