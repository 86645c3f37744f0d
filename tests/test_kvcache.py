"""``ops.attention_with_kvcache``: the reference against the packed cross-attention
formulation, the Triton split-KV kernel (interpreter) against float64, in-place append,
bad input, and a greedy generation loop that must pick the same tokens as recomputing
full causal attention at every step."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from omni_core.kernels import decode_attention as da  # noqa: E402

from omni_core import ops  # noqa: E402

DEVICE = "cpu" if da.INTERPRET else "cuda"
CAPS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FLOORS = {torch.float32: 1e-7, torch.float16: 5e-5, torch.bfloat16: 5e-4}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_cache(B, Lq, H, Hk, D, S, lengths, new, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = {"q": torch.randn(B, Lq, H, D, generator=g), "k_cache": torch.randn(B, S, Hk, D, generator=g),
         "v_cache": torch.randn(B, S, Hk, D, generator=g),
         "cache_seqlens": torch.tensor(lengths, dtype=torch.int32)}
    if new:
        t["k"], t["v"] = torch.randn(B, new, Hk, D, generator=g), torch.randn(B, new, Hk, D, generator=g)
    return {n: (x.to(dtype) if x.is_floating_point() else x) for n, x in t.items()}


def as_cross_attention(c: dict, causal: bool):
    """The same step as packed cross-attention: queries [B*Lq], keys = each cache's valid rows."""
    B, Lq, H, D = c["q"].shape
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    lengths = c["cache_seqlens"].tolist()
    if "k" in c:
        for b in range(B):
            k_cache[b, lengths[b]:lengths[b] + c["k"].shape[1]] = c["k"][b]
            v_cache[b, lengths[b]:lengths[b] + c["k"].shape[1]] = c["v"][b]
        lengths = [n + c["k"].shape[1] for n in lengths]
    k = torch.cat([k_cache[b, :n] for b, n in enumerate(lengths)])
    v = torch.cat([v_cache[b, :n] for b, n in enumerate(lengths)])
    cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out, lse = ops.varlen_attention_reference(c["q"].reshape(B * Lq, H, D), k, v, cu_q, Lq, causal=causal,
                                              cu_seqlens_k=cu_k, max_seqlen_k=max(lengths), return_lse=True)
    return out.view(B, Lq, H, D), lse.view(H, B, Lq).transpose(0, 1)


def run_step(c: dict, dtype: torch.dtype, causal: bool, **kw):
    t = {n: (x.to(DEVICE, dtype, copy=True) if x.is_floating_point() else x.to(DEVICE)) for n, x in c.items()}
    new = {n: t.pop(n) for n in ("k", "v") if n in t}
    out, lse = ops.attention_with_kvcache(t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"], causal=causal,
                                          return_lse=True, **new, **kw)
    return out.cpu(), lse.cpu(), t["k_cache"].cpu()


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_packed_cross_attention(causal):
    c = make_cache(3, 3, 4, 2, 8, 12, [0, 5, 9], new=3 if causal else 0, seed=0)
    out, lse, k_cache = run_step(c, torch.float64, causal)
    ref, ref_lse = as_cross_attention(c, causal)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    if causal:  # the new rows were written in place; the rows past them are untouched
        assert torch.equal(k_cache[1, 5:8], c["k"][1]) and torch.equal(k_cache[1, 8:], c["k_cache"][1, 8:])


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


# name: (B, Lq, H, Hk, D, S, cache lengths, new rows, causal, splits)
KERNEL_CASES = {
    "decode_gqa_8_2_d72_splits3": (3, 1, 8, 2, 72, 200, [0, 37, 150], 1, True, 3),
    "lq4_mqa_4_1_d16_rows_without_keys": (3, 4, 4, 1, 16, 140, [2, 90, 130], 0, True, 2),
    "noncausal_d256_auto_split": (2, 2, 2, 2, 256, 80, [9, 71], 2, False, 0),
    "d8_empty_cache": (2, 1, 2, 1, 8, 16, [0, 5], 0, True, 1),
}


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(da, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_triton_split_kv_kernel(case, dtype, poisoned, monkeypatch):
    B, Lq, H, Hk, D, S, lengths, new, causal, splits = KERNEL_CASES[case]
    seed = random.SystemRandom().randrange(2**31)
    c = make_cache(B, Lq, H, Hk, D, S, lengths, new, seed, torch.float32)
    monkeypatch.setenv("OMNI_BACKEND", "triton")
    if splits:
        kernel = da.decode_attention_triton
        monkeypatch.setattr(da, "num_splits_for", lambda *a: splits)
    else:
        kernel = None
    out, lse, _ = run_step(c, dtype, causal)
    monkeypatch.setenv("OMNI_BACKEND", "reference")
    rounded = {n: (x.to(dtype).double() if x.is_floating_point() else x) for n, x in c.items()}
    ref, ref_lse, _ = run_step(rounded, torch.float64, causal)
    base, _, _ = run_step(c, dtype, causal)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"seed {seed}: lse -inf rows"
    assert rel_err(lse[~empty], ref_lse[~empty]) <= CAPS[dtype]
    bound = min(2 * rel_err(base, ref) + FLOORS[dtype], CAPS[dtype])
    assert rel_err(out, ref) <= bound, f"seed {seed}: error {rel_err(out, ref):.3e} > {bound:.3e}"
    assert kernel is None or kernel is da.decode_attention_triton


def _good():
    return {n: x.float() if x.is_floating_point() else x
            for n, x in make_cache(2, 1, 4, 2, 16, 10, [3, 9], 1, seed=1).items()}


@pytest.mark.parametrize("spoil, error, message", [
    (lambda c: c.update(cache_seqlens=torch.tensor([3, 10], dtype=torch.int32)), ValueError, r"\[0, 9\]"),
    (lambda c: c.update(cache_seqlens=torch.tensor([3, 9])), TypeError, "int32"),
    (lambda c: c.update(k_cache=torch.randn(2, 10, 3, 16)), ValueError, "caches must both"),
    (lambda c: c.update(q=torch.randn(2, 1, 3, 16)), ValueError, "must divide"),
    (lambda c: c.pop("v"), ValueError, "together"),
    (lambda c: c.update(q=c["q"].half()), TypeError, "share a dtype"),
    (lambda c: c.update(q=torch.randn(2, 1, 4, 12), k_cache=torch.randn(2, 10, 2, 12),
                        v_cache=torch.randn(2, 10, 2, 12), k=torch.randn(2, 1, 2, 12),
                        v=torch.randn(2, 1, 2, 12)), ValueError, "head dim 12"),
])
def test_bad_input_fails_before_write_or_launch(spoil, error, message, monkeypatch):
    monkeypatch.setattr(da, "_split_kernel", None)  # any launch would fail loudly
    monkeypatch.setenv("OMNI_BACKEND", "triton")
    c = _good()
    spoil(c)
    before = c["k_cache"].clone()
    with pytest.raises(error, match=message):
        ops.attention_with_kvcache(c["q"], c["k_cache"], c["v_cache"], c["cache_seqlens"], k=c.get("k"),
                                   v=c.get("v"))
    assert torch.equal(c["k_cache"], before)


# ----------------------------------------------------------------------------- generation


class TinyDecoder(torch.nn.Module):
    """One causal attention layer with grouped-query heads and a tied output head."""

    def __init__(self, vocab=50, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.hk, self.dh = heads, kv_heads, dim // heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(64, dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.dh)
        self.o = torch.nn.Linear(dim, dim)

    def project(self, tokens, start):
        x = self.emb(tokens) + self.pos(torch.arange(start, start + tokens.shape[1]))
        B, L = tokens.shape
        k, v = self.kv(x).view(B, L, 2, self.hk, self.dh).unbind(2)
        return x, self.q(x).view(B, L, self.h, self.dh), k, v

    def logits(self, x, attn):
        return (x + self.o(attn.flatten(-2))) @ self.emb.weight.T


def generate_recompute(model, prompt, steps):
    """Full causal attention over the whole sequence at every step (packed varlen op)."""
    tokens = prompt
    for _ in range(steps):
        B, L = tokens.shape
        x, q, k, v = model.project(tokens, 0)
        cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32)
        attn = ops.varlen_attention(q.reshape(B * L, model.h, -1), k.reshape(B * L, model.hk, -1),
                                    v.reshape(B * L, model.hk, -1), cu, L, causal=True).view(B, L, model.h, -1)
        tokens = torch.cat([tokens, model.logits(x, attn)[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens


def generate_cached(model, prompt, steps):
    """Prefill the cache with the prompt, then one token per step through the cache."""
    B, L = prompt.shape
    k_cache = torch.zeros(B, L + steps, model.hk, model.dh)
    v_cache = torch.zeros_like(k_cache)
    seqlens = torch.zeros(B, dtype=torch.int32)
    tokens, new = prompt, prompt
    for _ in range(steps):
        x, q, k, v = model.project(new, int(seqlens[0]))
        attn = ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v, causal=True)
        seqlens += new.shape[1]
        new = model.logits(x, attn)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, new], 1)
    return tokens


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_generation_with_cache_picks_the_same_tokens(backend, monkeypatch):
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    model = TinyDecoder().eval()
    prompt = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        expected = generate_recompute(model, prompt, 8)
        monkeypatch.setenv("OMNI_BACKEND", backend)
        got = generate_cached(model, prompt, 8)
    assert torch.equal(got, expected)
