"""The torch references of the two public ops against independent dense formulations."""

import math

import pytest
import torch
import torch.nn.functional as F

from omni_core import ops
from omni_core.ops.dispatch import BackendUnavailable


def dense_attention(q, k, v, cu, scale, table=None, lut=None, modality=None, position=None):
    """Every token against every token, with a block-diagonal mask: O(T^2), no grouping."""
    T = q.shape[0]
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
    logits = torch.einsum("ihd,jhd->hij", q, k) * scale
    if table is not None:
        m, p = modality.long(), position.long()
        entry = lut[m[:, None], p[:, None], p[None, :]].long()
        use = (m[:, None] == m[None, :]) & (entry >= 0)
        logits = logits + torch.where(use[None], table[entry.clamp(min=0)].permute(2, 0, 1), 0.0)
    logits = logits.masked_fill(seq[None, :, None] != seq[None, None, :], float("-inf"))
    return torch.einsum("hij,jhd->ihd", torch.softmax(logits, -1), v)[:T]


def random_pack(lengths, H=2, Dh=8, M=3, P=12, NB=20, dtype=torch.float64):
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(T, H, Dh, dtype=dtype, requires_grad=True) for _ in range(3))
    table = torch.randn(NB, H, dtype=dtype, requires_grad=True)
    lut = torch.randint(-1, NB, (M, P, P), dtype=torch.int32)
    modality = torch.randint(0, M, (T,), dtype=torch.int32)
    position = torch.randint(0, P, (T,), dtype=torch.int32)
    return q, k, v, cu, max(lengths), table, lut, modality, position


@pytest.mark.parametrize("lengths", [(1,), (5, 1, 7, 3, 3, 3), (13,), (3, 3, 3, 11)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_varlen_attention_matches_dense(lengths, with_bias):
    q, k, v, cu, L, table, lut, modality, position = random_pack(lengths)
    bias = dict(bias_table=table, bias_lut=lut, modality=modality, position=position) if with_bias else {}
    out = ops.varlen_attention(q, k, v, cu, L, **bias)
    ref = dense_attention(q, k, v, cu, 1 / math.sqrt(8), *((table, lut, modality, position) if with_bias else ()))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    leaves = (q, k, v, table) if with_bias else (q, k, v)
    go = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_varlen_attention_bias_gradcheck():
    q, k, v, cu, L, table, lut, modality, position = random_pack((4, 3), H=2, Dh=4, P=5, NB=6)

    def f(q, k, v, table):
        return ops.varlen_attention(q, k, v, cu, L, bias_table=table, bias_lut=lut, modality=modality,
                                    position=position)

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_bias_applies_only_within_one_modality():
    """A joint sequence: text (m=0) then image (m=1); a huge bias on every LUT entry must
    change text↔text and image↔image logits but never text↔image ones."""
    T, H = 6, 1
    q = torch.zeros(T, H, 4, dtype=torch.float64)
    v = torch.randn(T, H, 4, dtype=torch.float64)
    cu = torch.tensor([0, T], dtype=torch.int32)
    modality = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)
    position = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)
    lut = torch.full((2, 3, 3), -1, dtype=torch.int32)
    lut[0, :, 0] = 0  # text queries → text key 0 gets bias row 0
    table = torch.tensor([[50.0]], dtype=torch.float64)
    out = ops.varlen_attention(q, q, v, cu, T, bias_table=table, bias_lut=lut, modality=modality,
                               position=position)
    torch.testing.assert_close(out[:3, 0], v[0, 0].expand(3, 4))  # text attends to text key 0
    torch.testing.assert_close(out[3:, 0], v[:, 0].mean(0).expand(3, 4))  # image: uniform, no bias


def dense_modes(q, k, v, cu_q, cu_k, scale, causal, table=None, lut=None, modality=None, position=None):
    """Sequence by sequence, heads repeated for grouped queries, explicit masks: the contract's
    modes written out plainly. Returns (out, lse [H, Tq])."""
    H, G = q.shape[1], q.shape[1] // k.shape[1]
    outs, lses = [], []
    for b in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        qb = q[q0:q1]
        kb, vb = (t[k0:k1].repeat_interleave(G, dim=1) for t in (k, v))
        logits = torch.einsum("ihd,jhd->hij", qb, kb) * scale
        if table is not None:
            m, p = modality[q0:q1].long(), position[q0:q1].long()
            entry = lut[m[:, None], p[:, None], p[None, :]].long()
            use = (m[:, None] == m[None, :]) & (entry >= 0)
            logits = logits + torch.where(use[None], table[entry.clamp(min=0)].permute(2, 0, 1), 0.0)
        Lq, Lk = q1 - q0, k1 - k0
        if causal:
            allowed = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
            logits = logits.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(logits, -1) if Lk else torch.full((H, Lq), float("-inf"), dtype=q.dtype)
        probs = torch.nan_to_num(torch.softmax(logits, -1), nan=0.0)  # rows without keys: 0
        outs.append(torch.einsum("hij,jhd->ihd", probs, vb))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


MODE_CASES = {  # name: (query lengths, key lengths or None for self-attention, H, Hk, causal, bias)
    "causal_self": ((5, 1, 7, 3), None, 2, 2, True, False),
    "causal_bias": ((5, 1, 7, 3), None, 2, 2, True, True),
    "cross_empty_keys": ((4, 3, 5), (6, 0, 2), 2, 2, False, False),
    "causal_lq_gt_lk": ((7, 4, 2), (3, 0, 5), 2, 1, True, False),
    "causal_lq_lt_lk": ((2, 1, 4), (9, 5, 4), 4, 2, True, False),
    "gqa_8_to_2": ((3, 6), None, 8, 2, False, False),
    "mqa_4_to_1_bias": ((3, 6), None, 4, 1, False, True),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_varlen_attention_modes_match_dense(case):
    q_lens, k_lens, H, Hk, causal, with_bias = MODE_CASES[case]
    q, _, _, cu, L, table, lut, modality, position = random_pack(q_lens, H=H)
    cross = k_lens is not None
    k_lens = k_lens or q_lens
    k, v = (torch.randn(sum(k_lens), Hk, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = dict(causal=causal, return_lse=True)
    if cross:
        kwargs.update(cu_seqlens_k=cu_k, max_seqlen_k=max(k_lens))
    bias = (table, lut, modality, position) if with_bias else ()
    if with_bias:
        kwargs.update(bias_table=table, bias_lut=lut, modality=modality, position=position)
    out, lse = ops.varlen_attention(q, k, v, cu, L, **kwargs)
    ref, ref_lse = dense_modes(q, k, v, cu, cu_k, 1 / math.sqrt(8), causal, *bias)
    assert lse.shape == (H, q.shape[0]) and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    leaves = (q, k, v, table) if with_bias else (q, k, v)
    go = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_varlen_attention_rows_without_keys_are_zero_with_finite_gradients():
    q = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cu, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 0, 2], dtype=torch.int32)
    out, lse = ops.varlen_attention(q, k, v, cu, 3, cu_seqlens_k=cu_k, max_seqlen_k=2, causal=True,
                                    return_lse=True)
    # sequence 0 has no keys; in sequence 1 (Lq=3, Lk=2) query 0 sees no key (j <= 0 - 1)
    assert torch.equal(out[[0, 1, 2]], torch.zeros(3, 2, 8, dtype=torch.float64))
    assert torch.isneginf(lse[:, [0, 1, 2]]).all() and torch.isfinite(lse[:, [3, 4]]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))

    def f(q, k, v):
        return ops.varlen_attention(q, k, v, cu, 3, cu_seqlens_k=cu_k, max_seqlen_k=2, causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("change, message", [
    (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32), max_seqlen_k=10), r"B\+1=3"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32)), "max_seqlen_k is required"),
    (dict(k=torch.randn(10, 3, 8, dtype=torch.float64), v=torch.randn(10, 3, 8, dtype=torch.float64)),
     "must divide"),
])
def test_varlen_attention_rejects_bad_modes(change, message):
    q, k, v, cu, L, *_ = random_pack((4, 6))
    args = dict(k=k, v=v)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.varlen_attention(q, args.pop("k"), args.pop("v"), cu, L, **args)


def test_bias_with_cu_seqlens_k_is_a_clear_error():
    q, k, v, cu, L, table, lut, modality, position = random_pack((4, 6))
    with pytest.raises(ValueError, match="self-attention feature: bias_table"):
        ops.varlen_attention(q, k, v, cu, L, cu_seqlens_k=cu, max_seqlen_k=L, bias_table=table, bias_lut=lut,
                             modality=modality, position=position)


def test_modes_a_backend_lacks_run_on_the_reference(monkeypatch):
    """The dispatch rule: a mode the chosen backend does not list in ``modes`` runs on the
    reference, unless that backend was forced (then it is an error naming the mode)."""
    from omni_core.ops import dispatch

    calls = []

    def plain_backend(*args):
        calls.append(len(args))
        return ops.varlen_attention_reference(*args)

    monkeypatch.setitem(dispatch._LOADERS, ("varlen_attention", "native"), lambda: plain_backend)
    monkeypatch.delenv("OMNI_BACKEND", raising=False)
    q, k, v, cu, L, *_ = random_pack((4, 6))
    ops.varlen_attention(q, k, v, cu, L)
    assert calls == [10]
    ops.varlen_attention(q, k, v, cu, L, causal=True)
    assert calls == [10]
    monkeypatch.setenv("OMNI_BACKEND", "native")
    with pytest.raises(BackendUnavailable, match="does not implement causal, lse"):
        ops.varlen_attention(q, k, v, cu, L, causal=True, return_lse=True)


def naive_routed_ffn(x, modality, w_in, w_out, b_in, b_out, w_gate, ln_w, ln_b, eps=1e-5):
    """Run every modality's FFN on every token, then keep each token's own result."""
    u = torch.einsum("td,mdf->mtf", x, w_in) + (b_in[:, None] if b_in is not None else 0)
    h = F.gelu(torch.einsum("td,mdf->mtf", x, w_gate)) * u if w_gate is not None else F.gelu(u)
    if ln_w is not None:
        h = F.layer_norm(h, (h.shape[-1],), eps=eps) * ln_w[:, None] + (ln_b[:, None] if ln_b is not None else 0)
    y = torch.einsum("mtf,mfd->mtd", h, w_out) + (b_out[:, None] if b_out is not None else 0)
    return y.gather(0, modality.long()[None, :, None].expand(1, *y.shape[1:]))[0]


def ffn_params(M, D, Fh, variant, dtype=torch.float64):
    def p(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    geglu, sub_ln = variant in ("geglu", "geglu_ln"), variant == "geglu_ln"
    return dict(w_in=p(M, D, Fh), w_out=p(M, Fh, D), b_in=None if geglu else p(M, Fh), b_out=p(M, D),
                w_gate=p(M, D, Fh) if geglu else None, ln_weight=p(M, Fh) if sub_ln else None,
                ln_bias=p(M, Fh) if sub_ln else None)


@pytest.mark.parametrize("variant", ["gelu", "geglu", "geglu_ln"])
@pytest.mark.parametrize("modality_ids", [[0, 2, 1, 0, 0, 2, 1], [1], [2, 2, 0]])
def test_routed_ffn_matches_naive(variant, modality_ids):
    M, D, Fh = 3, 5, 7
    x = torch.randn(len(modality_ids), D, dtype=torch.float64, requires_grad=True)
    modality = torch.tensor(modality_ids, dtype=torch.int32)
    w = ffn_params(M, D, Fh, variant)
    out = ops.routed_ffn(x, modality, **w)
    ref = naive_routed_ffn(x, modality, w["w_in"], w["w_out"], w["b_in"], w["b_out"], w["w_gate"],
                           w["ln_weight"], w["ln_bias"])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    leaves = [x] + [t for t in w.values() if t is not None]
    go = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_routed_ffn_absent_modality_gets_zero_gradient():
    w = ffn_params(3, 4, 6, "geglu_ln")
    x = torch.randn(5, 4, dtype=torch.float64)
    out = ops.routed_ffn(x, torch.tensor([0, 0, 2, 0, 2]), **w)
    out.sum().backward()
    for name in ("w_in", "w_gate", "w_out", "b_out", "ln_weight", "ln_bias"):
        grad = w[name].grad
        assert grad is not None and torch.count_nonzero(grad[1]) == 0, name
        assert torch.count_nonzero(grad[0]) > 0, name


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.randn(9, 2, 8, dtype=torch.float64)), "shapes disagree"),
    (dict(q=torch.randn(10, 16)), r"must be \[T, H, Dh\]"),
    (dict(cu_seqlens=torch.tensor([0, 4, 10])), "int32"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), "ends at 9"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
    (dict(max_seqlen=3), "max_seqlen"),
    (dict(bias_lut=torch.full((3, 12, 12), 99, dtype=torch.int32)), "bias_lut entries"),
    (dict(bias_lut=torch.zeros(3, 12, 12, dtype=torch.int64)), "int32"),
    (dict(modality=torch.full((10,), 7, dtype=torch.int32)), r"\[0, 3\)"),
    (dict(position=torch.full((10,), 12, dtype=torch.int32)), "positions must lie"),
    (dict(bias_table=torch.randn(20, 3, dtype=torch.float64)), "NB, H=2"),
    (dict(position=None), "missing"),
    (dict(v=torch.randn(10, 2, 8, dtype=torch.float32)), "dtypes disagree"),
    (dict(k=torch.randn(10, 2, 8, dtype=torch.float64, device="meta")), "different devices"),
])
def test_varlen_attention_rejects_bad_input(change, message):
    q, k, v, cu, L, table, lut, modality, position = random_pack((4, 6))
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=L, bias_table=table, bias_lut=lut,
                modality=modality, position=position)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.varlen_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens"),
                             args.pop("max_seqlen"), **args)


@pytest.mark.parametrize("change, message", [
    (dict(modality=torch.tensor([0, 3, 1])), r"\[0, 3\)"),
    (dict(modality=torch.tensor([0, 1])), r"\[T=3\]"),
    (dict(w_out=torch.randn(3, 6, 5, dtype=torch.float64)), "w_out must be"),
    (dict(w_gate=torch.randn(2, 4, 6, dtype=torch.float64)), "w_gate must be"),
    (dict(b_out=torch.randn(3, 4, dtype=torch.float32)), "dtype"),
    (dict(x=torch.randn(3, 5, dtype=torch.float64)), "x has D=5"),
    (dict(ln_weight=None), "ln_bias was given without ln_weight"),
    (dict(w_in=torch.randn(3, 4, 6, dtype=torch.float64, device="meta")), "different devices"),
])
def test_routed_ffn_rejects_bad_input(change, message):
    args = dict(x=torch.randn(3, 4, dtype=torch.float64), modality=torch.tensor([0, 2, 1]),
                **ffn_params(3, 4, 6, "geglu_ln"))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.routed_ffn(args.pop("x"), args.pop("modality"), args.pop("w_in"), args.pop("w_out"), **args)


def test_forced_backend_that_cannot_run_is_an_error(monkeypatch):
    x = torch.randn(3, 4)
    w = ffn_params(2, 4, 6, "gelu", torch.float32)
    monkeypatch.setenv("OMNI_BACKEND", "native")
    with pytest.raises(BackendUnavailable, match="native"):
        ops.routed_ffn(x, torch.tensor([0, 1, 1]), **w)
    monkeypatch.setenv("OMNI_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="CUDA tensors or TRITON_INTERPRET=1"):
        ops.routed_ffn(x, torch.tensor([0, 1, 1]), **w)
    monkeypatch.setenv("OMNI_BACKEND", "cuda-magic")
    with pytest.raises(BackendUnavailable, match="is not one of"):
        ops.routed_ffn(x, torch.tensor([0, 1, 1]), **w)


def test_reference_runs_in_every_dtype():
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q, k, v, cu, L, *_ = random_pack((3, 2), dtype=dtype)
        assert ops.varlen_attention(q, k, v, cu, L).dtype == dtype


def test_layout_checks_rerun_after_an_in_place_edit():
    """Value checks run once per batch, but editing a layout tensor in place re-checks it."""
    q, k, v, cu, L, table, lut, modality, position = random_pack((4, 6))
    bias = dict(bias_table=table, bias_lut=lut, modality=modality, position=position)
    ops.varlen_attention(q, k, v, cu, L, **bias)
    position[0] = 12
    with pytest.raises(ValueError, match="positions must lie"):
        ops.varlen_attention(q, k, v, cu, L, **bias)
    position[0] = 0
    cu[1] = 7
    with pytest.raises(ValueError, match="non-decreasing|max_seqlen"):
        ops.varlen_attention(q, k, v, cu, L, **bias)
