"""The native CPU varlen attention (``csrc/varlen_attention*.cpp``) against the float64
reference: the kernel contract of ARCHITECTURE.md.

Every case checks the output and all four gradients (dq, dk, dv, d bias_table). In float64
the kernel must match the reference to rounding; in float32 its error ||x - ref|| / ||ref||
against float64 must be at most twice that of the torch reference run in float32, plus a tiny
floor, and under 1e-5. The forward writes into NaN-poisoned buffers, so an element it does not
write fails. Both compiled instruction sets this CPU can run are checked (AVX2 through
ATEN_CPU_CAPABILITY in a subprocess, which is how torch lowers its own dispatch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
from attention_packs import make_pack

from omni_core.ops import dispatch, native_attention, varlen_attention, varlen_attention_reference

try:
    native_attention.capability()
except dispatch.BackendUnavailable as err:  # pragma: no cover - only without a built extension
    pytest.skip(f"native attention not built: {err}", allow_module_level=True)

CAP, FLOOR = 1e-5, 1e-7

# name: (sequence lengths, heads, head dim, bias kind). "joint" sequences switch modality
# mid-sequence; positions restart at 0 in every modality segment.
CASES = {
    "length_one": ([1], 1, 16, "single"),
    "odd_joint": ([1, 2, 61, 0, 3, 67, 37], 2, 64, "joint"),
    "one_long_prime": ([1, 1031], 1, 80, "joint"),  # two key blocks of 516, 17 query blocks
    "many_tiny": ([3, 1, 2, 5] * 10 + [131], 2, 32, "single"),
    "no_bias": ([5, 97, 1, 64], 3, 24, None),
    "odd_head_dim": ([13, 29], 2, 7, "joint"),
}


def run(fn, pack: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """Output and gradients (q, k, v[, table]) of ``fn`` on the pack in ``dtype``."""
    q, k, v = (pack[n].to(dtype, copy=True).requires_grad_() for n in "qkv")
    table = pack["table"]
    if table is not None:
        table = table.to(dtype, copy=True).requires_grad_()
    out = fn(q, k, v, pack["cu"], pack["max_seqlen"], None, table, pack["lut"], pack["modality"],
             pack["position"])
    out.backward(pack["dout"].to(dtype))
    grads = [q.grad, k.grad, v.grad] + ([table.grad] if table is not None else [])
    return [t.detach() for t in [out, *grads]]


def rel_err(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||x - ref|| / ||ref||. A gradient that vanishes analytically (a lone length-1
    sequence's dq and dk are exactly 0) has no relative error: it is measured against
    ``scale``, the norm of the output gradient it was computed from."""
    denominator = ref.norm() if scale is None or ref.norm() > 0 else scale.norm().double()
    return float((x.double() - ref).norm() / denominator.clamp_min(1e-30))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case, seed):
    pack = make_pack(*CASES[case], seed=zlib.crc32(case.encode()) + seed)
    ref = run(varlen_attention_reference, pack, torch.float64)
    native64 = run(native_attention.native_varlen_attention, pack, torch.float64)
    names = ["out", "dq", "dk", "dv", "dtable"]
    dout = pack["dout"]
    for name, x, r in zip(names, native64, ref):
        assert rel_err(x, r, dout) < 1e-12, f"{case} float64 {name}: {rel_err(x, r, dout):.2e}"
    torch32 = run(varlen_attention_reference, pack, torch.float32)
    native32 = run(native_attention.native_varlen_attention, pack, torch.float32)
    for name, x, t, r in zip(names, native32, torch32, ref):
        # An analytically zero gradient: torch's softmax backward gets exactly 0 there, while
        # FlashAttention's rowsum(dO * O) leaves fp32 rounding (~1 ulp of dout): only the cap.
        bound = min(2 * rel_err(t, r, dout) + FLOOR, CAP) if r.norm() > 0 else CAP
        assert rel_err(x, r, dout) <= bound, f"{case} float32 {name}: {rel_err(x, r, dout):.2e} > {bound:.2e}"


def test_forward_writes_every_element():
    pack = make_pack([1, 70, 257, 3], 2, 64, "joint", seed=1)
    T, H, _ = pack["q"].shape
    out = torch.full_like(pack["q"], float("nan"))
    lse = torch.full((T, H), float("nan"))
    torch.ops.omni_native.varlen_attention_fwd(pack["q"], pack["k"], pack["v"], pack["cu"], 0.125, pack["table"],
                                               pack["lut"], pack["modality"], pack["position"], out, lse)
    ref = varlen_attention_reference(*(pack[n].double() for n in "qkv"), pack["cu"], pack["max_seqlen"], 0.125,
                                     pack["table"].double(), pack["lut"], pack["modality"], pack["position"])
    assert rel_err(out, ref) < CAP
    assert not lse.isnan().any()


def test_no_table_gradient_when_not_required():
    pack = make_pack([9, 4], 2, 16, "single", seed=2)
    q = pack["q"].clone().requires_grad_()
    out = native_attention.native_varlen_attention(q, pack["k"], pack["v"], pack["cu"], 9, None, pack["table"],
                                                   pack["lut"], pack["modality"], pack["position"])
    out.sum().backward()
    assert q.grad is not None and pack["table"].grad is None


def test_bfloat16_computes_in_float32():
    pack = make_pack([33, 7], 2, 32, "joint", seed=3)
    ref = run(varlen_attention_reference, pack, torch.float64)
    native = run(native_attention.native_varlen_attention, pack, torch.bfloat16)
    assert native[0].dtype == torch.bfloat16
    for x, r in zip(native, ref):
        assert rel_err(x, r) < 3e-2


def test_dispatch_picks_native_on_cpu(monkeypatch):
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    name, impl = dispatch.resolve("varlen_attention", torch.device("cpu"))
    assert (name, impl) == ("native", native_attention.native_varlen_attention)


def test_other_modes_run_the_reference(monkeypatch):
    """The native kernel implements plain self-attention only: a causal call goes to the
    reference automatically, and is an error when the native backend is forced."""
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    pack = make_pack([6, 11], 2, 16, None, seed=4)
    calls = []
    monkeypatch.setattr(native_attention._NativeVarlenAttention, "apply",
                        lambda *a: calls.append(a) or pytest.fail("native ran a causal call"))
    out = varlen_attention(pack["q"], pack["k"], pack["v"], pack["cu"], 11, causal=True)
    want = varlen_attention_reference(pack["q"], pack["k"], pack["v"], pack["cu"], 11, causal=True)
    torch.testing.assert_close(out, want)
    monkeypatch.setenv("OMNI_BACKEND", "native")
    with pytest.raises(dispatch.BackendUnavailable, match="causal"):
        varlen_attention(pack["q"], pack["k"], pack["v"], pack["cu"], 11, causal=True)
    assert not calls


@pytest.mark.parametrize("bad, match", [
    ({"q": torch.randn(5, 2, 8, dtype=torch.float64)}, "dtypes disagree"),
    ({"q": torch.randn(5, 2)}, r"\[T, H, Dh\]"),
    ({"cu": torch.tensor([0, 2, 4], dtype=torch.int32)}, "cu_seqlens"),
    ({"cu": torch.tensor([0, 2, 5])}, "int32"),
    ({"position": torch.tensor([0, 1, 9, 0, 1], dtype=torch.int32)}, "positions"),
    ({"modality": torch.tensor([0, 0, 7, 0, 0])}, "modality"),
    ({"table": torch.randn(4, 3)}, "bias_table"),
])
def test_bad_input_is_rejected_before_running(bad, match):
    args = {"q": torch.randn(5, 2, 8), "k": torch.randn(5, 2, 8), "v": torch.randn(5, 2, 8),
            "cu": torch.tensor([0, 2, 5], dtype=torch.int32), "table": torch.randn(4, 2),
            "lut": torch.zeros(2, 3, 3, dtype=torch.int32), "modality": torch.tensor([0, 0, 1, 1, 1]),
            "position": torch.tensor([0, 1, 0, 1, 2], dtype=torch.int32)}
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.omni_native.varlen_attention_fwd(args["q"], args["k"], args["v"], args["cu"], 1.0, args["table"],
                                                   args["lut"], args["modality"], args["position"])


AVX2_CHECK = """
import torch
from omni_core.ops import native_attention, varlen_attention_reference
from tests.test_native_attention import make_pack, run, rel_err
assert native_attention.capability() == "AVX2", native_attention.capability()
pack = make_pack([1, 70, 131], 2, 64, "joint", seed=5)
ref = run(varlen_attention_reference, pack, torch.float64)
for x, r in zip(run(native_attention.native_varlen_attention, pack, torch.float32), ref):
    assert rel_err(x, r) < 1e-5, rel_err(x, r)
for x, r in zip(run(native_attention.native_varlen_attention, pack, torch.float64), ref):
    assert rel_err(x, r) < 1e-12, rel_err(x, r)
"""


@pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="CPU has no AVX2")
def test_avx2_build_matches_reference():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the tests folder too: the test module imports the shared pack maker (tests/attention_packs.py)
    path = os.pathsep.join([root, os.path.join(root, "tests")])
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_torch_compile_traces_the_native_ops():
    pack = make_pack([20, 1, 30], 2, 16, "joint", seed=6)
    q = pack["q"].clone().requires_grad_()

    def attend(q):
        return varlen_attention(q, pack["k"], pack["v"], pack["cu"], 30, bias_table=pack["table"],
                                bias_lut=pack["lut"], modality=pack["modality"], position=pack["position"])

    out = torch.compile(attend, backend="aot_eager")(q)  # dynamo + fake tensors + AOT autograd
    out.backward(pack["dout"])
    want = run(varlen_attention_reference, pack, torch.float64)
    assert rel_err(out.detach(), want[0]) < CAP and rel_err(q.grad, want[1]) < CAP
