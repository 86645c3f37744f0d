"""Greedy and beam search over toy decoders that implement the IncrementalDecoder protocol:
a transition table (known answers) and a tiny random causal transformer run two ways, over a
KV cache and by recomputing the prefix (the searches must agree)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from omni_core.generate import beam_search, generate, greedy, length_penalty, sample

BOS, EOS = 0, 1


def fresh_seed() -> int:
    """New random decoder weights every run (conftest seeds torch's generator with 0)."""
    return int.from_bytes(os.urandom(4), "little")


class TableDecoder:
    """Next-token log-probabilities from the last token: ``table[last] -> [V]``. Counts steps."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int, eos: int | None = EOS) -> None:
        self.vocab_size, self.bos_id, self.eos_id = vocab, BOS, eos
        self.logits = torch.full((vocab, vocab), -1e9, dtype=torch.float64)
        for last, nxt in table.items():
            for tok, p in nxt.items():
                self.logits[last, tok] = math.log(p)
        self.fed = 0

    def start(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(rows).clone()

    def step(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self.fed += tokens.numel()
        return self.logits[tokens]

    def select(self, state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return state[rows]


# BOS -> 2 (0.6) or 3 (0.4); after 2 every continuation is unlikely, after 3 one is sure:
# greedy takes 2 (0.6 * 0.4 = 0.24 for "2 4"), beam finds "3 5" (0.4 * 0.9 = 0.36).
TABLE = {BOS: {2: 0.6, 3: 0.4}, 2: {4: 0.4, 5: 0.3, 6: 0.3}, 3: {5: 0.9, 6: 0.1},
         4: {EOS: 1.0}, 5: {EOS: 1.0}, 6: {EOS: 1.0}}


def test_known_answers_greedy_vs_beam() -> None:
    dec = TableDecoder(TABLE, 7)
    g = greedy(dec, torch.tensor([0]), max_len=10)[0]
    assert g.tokens == [2, 4] and g.finished and g.logprob == pytest.approx(math.log(0.24))
    best = beam_search(dec, torch.tensor([0]), max_len=10, beam=2, alpha=0.0, n_best=2)[0]
    assert [h.tokens for h in best] == [[3, 5], [2, 4]]
    assert best[0].logprob == pytest.approx(math.log(0.36)) and best[0].finished


def test_sampling_frequencies_top_k_and_seed() -> None:
    """Sampled first tokens follow the table's probabilities; top_k=1 is greedy; top_k=2 never
    draws the third most likely token; a seeded generator repeats its draws."""
    table = {BOS: {2: 0.5, 3: 0.3, 4: 0.2}, 2: {EOS: 1.0}, 3: {EOS: 1.0}, 4: {EOS: 1.0}}
    dec = TableDecoder(table, 5)
    rows = torch.zeros(4000, dtype=torch.long)
    first = torch.tensor([h.tokens[0] for h in sample(dec, rows, 3, generator=torch.Generator().manual_seed(1))])
    for tok, p in ((2, 0.5), (3, 0.3), (4, 0.2)):
        assert abs((first == tok).double().mean().item() - p) < 0.03  # ~4 standard errors at n=4000
    two = sample(dec, rows[:500], 3, top_k=2, generator=torch.Generator().manual_seed(2))
    assert {h.tokens[0] for h in two} == {2, 3}
    hot = sample(dec, rows[:500], 3, temperature=0.05, generator=torch.Generator().manual_seed(3))
    assert all(h.tokens == [2] for h in hot)  # a low temperature concentrates on the mode
    assert [h.tokens for h in sample(TableDecoder(TABLE, 7), rows[:3], 10, top_k=1)] == [[2, 4]] * 3
    h = sample(dec, rows[:1], 3, generator=torch.Generator().manual_seed(4))[0]
    assert h.finished and h.logprob == pytest.approx(math.log(table[BOS][h.tokens[0]]))
    again = [sample(dec, rows[:50], 3, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert [x.tokens for x in again[0]] == [x.tokens for x in again[1]]
    with pytest.raises(ValueError, match="top_k"):
        sample(dec, rows[:1], 3, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(dec, rows[:1], 3, temperature=0.0)
    with pytest.raises(ValueError, match="not both"):
        generate(dec, rows[:1], 3, beam=2, top_k=2)


def test_max_len_and_no_eos() -> None:
    cycle = {BOS: {2: 1.0}, 2: {3: 1.0}, 3: {2: 1.0}}
    dec = TableDecoder(cycle, 4, eos=None)
    assert greedy(dec, torch.tensor([0, 1]), max_len=5)[0].tokens == [2, 3, 2, 3, 2]
    assert dec.fed == 2 * 5  # BOS + 4 tokens per row: the last token is never fed
    hyps = beam_search(dec, torch.tensor([0]), max_len=5, beam=2)[0]
    assert hyps[0].tokens == [2, 3, 2, 3, 2] and not hyps[0].finished


def test_length_penalty_prefers_longer() -> None:
    # "2" then EOS: p = 0.5; "3 4 4" then EOS: p = 0.5 * 0.9^3 = 0.3645. alpha 0 takes the short one,
    # a strong length penalty the long one (GNMT: ((5 + n) / 6)^alpha with n counting the EOS).
    table = {BOS: {2: 0.5, 3: 0.5}, 2: {EOS: 1.0}, 3: {4: 0.9, EOS: 0.1}, 4: {4: 0.9, EOS: 0.1}}
    dec = TableDecoder(table, 5)
    assert beam_search(dec, torch.tensor([0]), 4, beam=2, alpha=0.0)[0][0].tokens == [2]
    long = [h for h in beam_search(dec, torch.tensor([0]), 4, beam=2, alpha=3.0, n_best=2)[0]]
    s_short = math.log(0.5) / length_penalty(2, 3.0)
    assert long[0].score > s_short and len(long[0].tokens) > 1
    assert length_penalty(3, 1.0) == pytest.approx(8 / 6)


def test_rows_finish_at_different_times() -> None:
    # row-dependent decoder: the table is shifted by the row index, so rows end after 1, 2, 3 tokens
    class Rows(TableDecoder):
        def step(self, state, tokens):
            self.fed += tokens.numel()
            out = torch.full((tokens.numel(), self.vocab_size), -1e9, dtype=torch.float64)
            for i, (r, t) in enumerate(zip(state.tolist(), tokens.tolist())):
                length = 0 if t == BOS else t - 1
                out[i, EOS if length >= r + 1 else length + 2] = 0.0
            return out

    dec = Rows({}, 8)
    assert generate(dec, torch.tensor([0, 2, 1]), max_len=10) == [[2], [2, 3, 4], [2, 3]]
    assert dec.fed == 2 + 4 + 3  # a row that ended leaves the batch
    assert generate(dec, torch.tensor([0, 2, 1]), max_len=10, beam=3) == [[2], [2, 3, 4], [2, 3]]


# ---------------------------------------------------------------- a tiny causal transformer
@dataclass
class _Cache:
    rows: torch.Tensor
    k: torch.Tensor  # [B, t, D]
    v: torch.Tensor


@dataclass
class _Prefix:
    rows: torch.Tensor
    tokens: torch.Tensor  # [B, t]


class TinyTransformer:
    """One causal attention layer + MLP in float64; each row adds its sample's memory vector."""

    def __init__(self, vocab: int, dim: int, samples: int, use_cache: bool, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        w = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        self.emb, self.pos, self.mem = w(vocab, dim), w(16, dim) * 0.5, w(samples, dim)
        self.wq, self.wk, self.wv, self.wo = (w(dim, dim) / dim**0.5 for _ in range(4))
        self.out = w(dim, vocab) * 2 / dim**0.5
        self.vocab_size, self.bos_id, self.eos_id, self.use_cache = vocab, BOS, EOS, use_cache

    def _embed(self, rows: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.emb[tokens] + self.pos[pos] + self.mem[rows]

    def _head(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        att = torch.softmax((x @ self.wq)[:, None] @ k.transpose(1, 2) / k.shape[-1] ** 0.5, -1)
        h = x + (att @ v)[:, 0] @ self.wo
        return torch.tanh(h) @ self.out

    def start(self, rows):
        rows = torch.as_tensor(rows)
        if self.use_cache:
            return _Cache(rows, torch.zeros(len(rows), 0, self.wk.shape[0], dtype=torch.float64),
                          torch.zeros(len(rows), 0, self.wk.shape[0], dtype=torch.float64))
        return _Prefix(rows, torch.zeros(len(rows), 0, dtype=torch.long))

    def step(self, state, tokens):
        if self.use_cache:
            x = self._embed(state.rows, tokens, torch.full_like(tokens, state.k.shape[1]))
            state.k = torch.cat([state.k, (x @ self.wk)[:, None]], 1)
            state.v = torch.cat([state.v, (x @ self.wv)[:, None]], 1)
            return self._head(x, state.k, state.v)
        state.tokens = torch.cat([state.tokens, tokens[:, None]], 1)
        t = state.tokens.shape[1]
        xs = self._embed(state.rows[:, None], state.tokens, torch.arange(t)[None])  # recompute all
        return self._head(xs[:, -1], xs @ self.wk, xs @ self.wv)

    def select(self, state, rows):
        if self.use_cache:
            return _Cache(state.rows[rows], state.k[rows], state.v[rows])
        return _Prefix(state.rows[rows], state.tokens[rows])


@pytest.mark.parametrize("run", range(3))
@pytest.mark.parametrize("beam,alpha", [(1, 0.0), (3, 1.0), (4, 0.6)])
def test_cached_equals_recomputed(run: int, beam: int, alpha: float) -> None:
    seed = fresh_seed()
    rows = torch.tensor([0, 3, 1, 2, 3])
    runs = []
    for use_cache in (True, False):
        dec = TinyTransformer(vocab=11, dim=16, samples=4, use_cache=use_cache, seed=seed)
        runs.append(beam_search(dec, rows, max_len=12, beam=beam, alpha=alpha, n_best=beam))
    for cached, recomputed in zip(*runs):
        assert [h.tokens for h in cached] == [h.tokens for h in recomputed], f"seed {seed}"
        assert [h.score for h in cached] == pytest.approx([h.score for h in recomputed], rel=1e-10)


@pytest.mark.parametrize("run", range(2))
def test_beam_one_equals_greedy(run: int) -> None:
    seed = fresh_seed()
    dec = TinyTransformer(vocab=9, dim=12, samples=3, use_cache=True, seed=seed)
    rows = torch.tensor([0, 1, 2, 2])
    g = greedy(dec, rows, max_len=10)
    b = beam_search(dec, rows, max_len=10, beam=1, alpha=0.0)
    assert [h.tokens for h in g] == [hyps[0].tokens for hyps in b], f"seed {seed}"
    assert [h.logprob for h in g] == pytest.approx([hyps[0].logprob for hyps in b])


def test_beam_is_at_least_as_likely_as_greedy() -> None:
    dec = TinyTransformer(vocab=9, dim=12, samples=3, use_cache=True, seed=fresh_seed())
    rows = torch.tensor([0, 1, 2])
    g = greedy(dec, rows, max_len=8)
    b = beam_search(dec, rows, max_len=8, beam=5, alpha=0.0)
    for gh, bh in zip(g, b):
        assert bh[0].logprob >= gh.logprob - 1e-9


def test_bad_arguments() -> None:
    dec = TableDecoder(TABLE, 7)
    with pytest.raises(ValueError, match="max_len"):
        greedy(dec, torch.tensor([0]), max_len=0)
    with pytest.raises(ValueError, match="beam width 8 exceeds"):
        beam_search(dec, torch.tensor([0]), 5, beam=8)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(dec, torch.tensor([0]), 5, beam=2, n_best=3)
