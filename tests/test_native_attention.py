"""The native CPU varlen attention (``csrc/varlen_attention*.cpp``) against the float64
reference: the kernel contract of ARCHITECTURE.md.

Every case checks the output and all four gradients (dq, dk, dv, d bias_table); the modes
(causal, cross-attention, grouped-query heads, a returned and differentiated lse) are checked
the same way, alone and combined. In float64
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
from omni_core.ops.attention import lut_columns, lut_positions

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
                                               pack["lut"], pack["modality"], pack["position"], out_buf=out,
                                               lse_buf=lse)
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


# name: (query lengths, key lengths or None for self-attention, H, Hk, Dh, causal, bias kind).
# Causal with more queries than keys leaves the first rows without a key (output 0, lse
# -inf); empty key sequences do the same for cross-attention.
MODE_CASES = {
    "causal_bias": ([1, 2, 61, 0, 67, 37], None, 2, 2, 64, True, "joint"),
    "causal_long": ([1031, 3], None, 1, 1, 32, True, None),  # several key and query blocks
    "gqa": ([5, 97, 1, 64], None, 6, 2, 24, False, "single"),
    "mqa_causal": ([13, 29, 1], None, 4, 1, 16, True, None),
    "cross": ([5, 0, 9, 3, 70], [7, 4, 0, 3, 600], 2, 2, 16, False, None),
    "cross_causal_gqa": ([9, 20, 3, 1], [4, 25, 0, 1], 4, 2, 8, True, None),
}


def run_mode(fn, pack: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """Output, lse and the gradients of q, k, v (and the table) of a loss that uses both the
    output and the lse, in ``dtype``."""
    q, k, v = (pack[n].to(dtype, copy=True).requires_grad_() for n in "qkv")
    table = pack["table"]
    if table is not None:
        table = table.to(dtype, copy=True).requires_grad_()
    out, lse = fn(q, k, v, pack["cu"], pack["max_seqlen"], None, table, pack["lut"], pack["modality"],
                  pack["position"], causal=pack["causal"], cu_seqlens_k=pack["cu_k"], max_seqlen_k=pack["max_k"],
                  return_lse=True)
    seen = torch.isfinite(lse)  # rows that see no key have lse -inf and no gradient through it
    loss = (out * pack["dout"].to(dtype)).sum() + (torch.where(seen, lse, 0) * pack["dlse"].to(lse.dtype)).sum()
    loss.backward()
    grads = [q.grad, k.grad, v.grad] + ([table.grad] if table is not None else [])
    return [t.detach() for t in [out, torch.where(seen, lse, 0), *grads]]


def make_mode_pack(lengths, key_lengths, H, Hk, D, causal, bias, seed):
    pack = make_pack(lengths, H, D, bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if key_lengths is None:
        pack.update(cu_k=None, max_k=None)
        pack["k"], pack["v"] = pack["k"][:, :Hk].contiguous(), pack["v"][:, :Hk].contiguous()
    else:
        Tk = sum(key_lengths)
        pack.update(k=torch.randn(Tk, Hk, D, generator=g), v=torch.randn(Tk, Hk, D, generator=g),
                    cu_k=torch.tensor([0, *torch.tensor(key_lengths).cumsum(0).tolist()], dtype=torch.int32),
                    max_k=max(key_lengths))
    pack.update(causal=causal, dlse=torch.randn(H, sum(lengths), generator=g))
    return pack


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_modes_match_float64_reference(case):
    pack = make_mode_pack(*MODE_CASES[case], seed=zlib.crc32(case.encode()))
    ref = run_mode(varlen_attention_reference, pack, torch.float64)
    names = ["out", "lse", "dq", "dk", "dv", "dtable"]
    for name, x, r in zip(names, run_mode(native_attention.native_varlen_attention, pack, torch.float64), ref):
        assert rel_err(x, r, pack["dout"]) < 1e-12, f"{case} float64 {name}: {rel_err(x, r, pack['dout']):.2e}"
    torch32 = run_mode(varlen_attention_reference, pack, torch.float32)
    native32 = run_mode(native_attention.native_varlen_attention, pack, torch.float32)
    for name, x, t, r in zip(names, native32, torch32, ref):
        bound = min(2 * rel_err(t, r, pack["dout"]) + FLOOR, CAP) if r.norm() > 0 else CAP
        assert rel_err(x, r, pack["dout"]) <= bound, f"{case} float32 {name}: {rel_err(x, r):.2e} > {bound:.2e}"


def test_rows_without_keys_are_zero_with_lse_minus_inf():
    """Poisoned buffers: a causal row before the first key and a query of an empty key
    sequence are written too (0, lse -inf), and their gradients are 0, not NaN."""
    q, k, v = torch.randn(6, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cu, cu_k = torch.tensor([0, 4, 6], dtype=torch.int32), torch.tensor([0, 3, 3], dtype=torch.int32)
    out, lse = torch.full_like(q, float("nan")), torch.full((6, 2), float("nan"))
    torch.ops.omni_native.varlen_attention_fwd(q, k, v, cu, 0.3, None, None, None, None, cu_seqlens_k=cu_k,
                                               causal=True, out_buf=out, lse_buf=lse)
    # sequence 0: 4 queries, 3 keys, bottom-right: query 0 sees none; sequence 1 has no keys
    assert out[[0, 4, 5]].eq(0).all() and lse[[0, 4, 5]].eq(float("-inf")).all()
    assert out[1:4].ne(0).all() and lse[1:4].isfinite().all()
    qg = q.clone().requires_grad_()
    got = native_attention.native_varlen_attention(qg, k, v, cu, 4, 0.3, causal=True, cu_seqlens_k=cu_k,
                                                   max_seqlen_k=3)
    got.sum().backward()
    assert qg.grad.isfinite().all() and qg.grad[[0, 4, 5]].eq(0).all()


def test_dispatch_runs_every_mode_natively(monkeypatch):
    """Causal, cross-attention, GQA and lse calls on CPU run the native kernel, by default and
    when it is forced."""
    pack = make_mode_pack([6, 11], [4, 9], 4, 2, 16, True, None, seed=4)
    calls = []
    apply = native_attention._NativeVarlenAttention.apply
    monkeypatch.setattr(native_attention._NativeVarlenAttention, "apply", lambda *a: calls.append(a) or apply(*a))
    for forced in (None, "native"):
        if forced:
            monkeypatch.setenv("OMNI_BACKEND", forced)
        else:
            monkeypatch.delenv("OMNI_BACKEND", raising=False)
        out, lse = varlen_attention(pack["q"], pack["k"], pack["v"], pack["cu"], 11, causal=True,
                                    cu_seqlens_k=pack["cu_k"], max_seqlen_k=9, return_lse=True)
        want = varlen_attention_reference(pack["q"], pack["k"], pack["v"], pack["cu"], 11, causal=True,
                                          cu_seqlens_k=pack["cu_k"], max_seqlen_k=9, return_lse=True)
        torch.testing.assert_close(out, want[0])
        torch.testing.assert_close(lse, want[1])
    assert len(calls) == 2


def dispatched(q, k, v, cu, max_seqlen, scale, table, lut, modality, position):
    """``ops.varlen_attention`` (whichever backend dispatch picks) with ``run``'s positional arguments."""
    return varlen_attention(q, k, v, cu, max_seqlen, softmax_scale=scale, bias_table=table, bias_lut=lut,
                            modality=modality, position=position)


@pytest.mark.parametrize("lut", ["compact", "cls_compact"])
@pytest.mark.parametrize("case", ["odd_joint", "one_long_prime"])
def test_compact_luts(monkeypatch, case, lut):
    """The compact LUTs ([M, 2P-1] and the CLS-aware [M, 2P+2]) run natively (dispatch keeps
    CPU calls on the native kernel): float64 within 1e-12 of the reference, and bit for bit
    the native run through the dense [M, P, P] LUT holding the same entries (d bias_table:
    to fp32 rounding)."""
    lengths, H, D, bias = CASES[case]
    pack = make_pack(lengths, H, D, bias, seed=zlib.crc32(lut.encode()), lut=lut)
    assert "relative_lut" in native_attention.native_varlen_attention.modes
    pos = torch.arange(lut_positions(pack["lut"]))
    dense = {**pack, "lut": pack["lut"][:, lut_columns(pack["lut"], pos[:, None], pos[None, :])].contiguous()}
    calls = []
    apply = native_attention._NativeVarlenAttention.apply
    monkeypatch.setattr(native_attention._NativeVarlenAttention, "apply", lambda *a: calls.append(a) or apply(*a))
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    compact64 = run(dispatched, pack, torch.float64)
    assert len(calls) == 1
    for name, x, r in zip(["out", "dq", "dk", "dv", "dtable"], compact64, run(varlen_attention_reference, pack,
                                                                               torch.float64), strict=True):
        assert rel_err(x, r, pack["dout"]) < 1e-12, f"{case} {lut} float64 {name}"
    *same, dtable = run(dispatched, pack, torch.float32)
    *dense_same, dense_dtable = run(dispatched, dense, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(same, dense_same, strict=True))
    # d bias_table sums per-thread partial tables whose work items are handed out dynamically,
    # so its fp32 rounding varies from run to run (dense against dense too): equal to rounding.
    assert rel_err(dtable, dense_dtable.double()) < 1e-6


@pytest.mark.parametrize("bad, match", [
    ({"q": torch.randn(5, 2, 8, dtype=torch.float64)}, "dtypes disagree"),
    ({"q": torch.randn(5, 2)}, r"\[T, H, Dh\]"),
    ({"cu": torch.tensor([0, 2, 4], dtype=torch.int32)}, "cu_seqlens"),
    ({"cu": torch.tensor([0, 2, 5])}, "int32"),
    ({"position": torch.tensor([0, 1, 9, 0, 1], dtype=torch.int32)}, "positions"),
    ({"modality": torch.tensor([0, 0, 7, 0, 0])}, "modality"),
    ({"table": torch.randn(4, 3)}, "bias_table"),
    ({"k": torch.randn(5, 3, 8), "v": torch.randn(5, 3, 8)}, "must divide"),
    ({"cu_k": torch.tensor([0, 5], dtype=torch.int32), "table": None}, "cu_seqlens_k must have"),
    ({"cu_k": torch.tensor([0, 3, 4], dtype=torch.int32), "table": None}, "cu_seqlens_k must run from 0"),
    ({"cu_k": torch.tensor([0, 3, 5], dtype=torch.int32)}, "self-attention"),
])
def test_bad_input_is_rejected_before_running(bad, match):
    args = {"q": torch.randn(5, 2, 8), "k": torch.randn(5, 2, 8), "v": torch.randn(5, 2, 8),
            "cu": torch.tensor([0, 2, 5], dtype=torch.int32), "table": torch.randn(4, 2),
            "lut": torch.zeros(2, 3, 3, dtype=torch.int32), "modality": torch.tensor([0, 0, 1, 1, 1]),
            "position": torch.tensor([0, 1, 0, 1, 2], dtype=torch.int32), "cu_k": None}
    args.update(bad)
    bias = [args[n] if args["table"] is not None else None for n in ("table", "lut", "modality", "position")]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.omni_native.varlen_attention_fwd(args["q"], args["k"], args["v"], args["cu"], 1.0, *bias,
                                                   cu_seqlens_k=args["cu_k"])


def test_bad_lut_entry_is_an_error():
    """The LUT is checked where the kernel reads it (not scanned whole per call): an entry
    outside [-1, NB) that a pair reads is still an error, forward and backward."""
    pack = make_pack([4, 3], 2, 8, "single", seed=7)
    lut = pack["lut"].clone()
    lut[pack["modality"][0], 1, 2] = pack["table"].shape[0]  # read by query 1, key 2 of the first sequence
    with pytest.raises(RuntimeError, match="bias_lut entries"):
        torch.ops.omni_native.varlen_attention_fwd(pack["q"], pack["k"], pack["v"], pack["cu"], 1.0, pack["table"], lut,
                                                   pack["modality"], pack["position"])
    out, lse = torch.ops.omni_native.varlen_attention_fwd(pack["q"], pack["k"], pack["v"], pack["cu"], 1.0,
                                                          pack["table"], pack["lut"], pack["modality"],
                                                          pack["position"])
    with pytest.raises(RuntimeError, match="bias_lut entries"):
        torch.ops.omni_native.varlen_attention_bwd(pack["dout"], pack["q"], pack["k"], pack["v"], out, lse, pack["cu"],
                                                   1.0, pack["table"], lut, pack["modality"], pack["position"], True)


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
