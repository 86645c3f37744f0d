"""Greedy search, top-k sampling and beam search over an incremental decoder (OPT's text and image decoders).

The search code only sees the :class:`~omni_core.model.opt.IncrementalDecoder` protocol:

    state = dec.start(rows)            # rows: which encoded sample each search row decodes for
    logits = dec.step(state, tokens)   # feed one token per row, get [B, V] logits of the next one
    state = dec.select(state, keep)    # reorder / drop rows (beams that survive, rows that ended)

so the same search runs over a KV cache or over recomputation of the whole prefix, and over any
toy decoder in the tests. A sequence starts from ``dec.bos_id``; it ends when the decoder emits
``dec.eos_id`` (the EOS is not part of the returned tokens) or after ``max_len`` tokens. The
image decoder has no EOS and always writes ``max_len`` = 64 tokens. BOS is never generated.

Beam search keeps ``beam`` live hypotheses per row and ranks finished ones by
``sum log p / lp(len)`` with GNMT's length penalty ``lp(n) = ((5 + n) / 6) ** alpha`` (the form
the OPT release's beam search uses; ``n`` counts the EOS). A row stops once it holds ``beam``
finished hypotheses and no live one can still beat the worst of them: a live score only falls
as tokens are added, so its best possible normalised score is bounded. Rows that have stopped
leave the decoder's batch (``select``), so a batch costs what its longest row costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omni_core.model.opt import IncrementalDecoder


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, BOS and EOS excluded
    logprob: float  # sum of the log-probabilities of the tokens (EOS included when finished)
    score: float  # logprob / length penalty: what ranks hypotheses
    finished: bool  # ended with EOS (False: stopped at max_len)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + n) / 6) ** alpha; alpha = 0 ranks by total log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def _check(dec: IncrementalDecoder, rows: torch.Tensor, max_len: int, beam: int) -> torch.Tensor:
    rows = torch.as_tensor(rows, dtype=torch.long).flatten()
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if beam < 1:
        raise ValueError(f"beam width must be >= 1, got {beam}")
    if beam > dec.vocab_size:
        raise ValueError(f"beam width {beam} exceeds the vocabulary of {dec.vocab_size}")
    return rows


def _log_probs(dec: IncrementalDecoder, logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    if 0 <= dec.bos_id < logp.shape[-1]:
        logp[:, dec.bos_id] = -torch.inf  # a decoder never writes its start token
    return logp


def _one_path(dec: IncrementalDecoder, rows: torch.Tensor, max_len: int,
              choose: Callable[[torch.Tensor], torch.Tensor]) -> list[Hypothesis]:
    """One hypothesis per row, ``choose(logp [B, V]) -> tokens [B]`` picking each next token."""
    out = [Hypothesis([], 0.0, 0.0, False) for _ in range(rows.numel())]
    active = torch.arange(rows.numel())
    state = dec.start(rows)
    last = torch.full((rows.numel(),), dec.bos_id, dtype=torch.long)
    for t in range(max_len):
        logp = _log_probs(dec, dec.step(state, last))
        tok = choose(logp)
        picked = logp.gather(1, tok[:, None]).squeeze(1)
        ended = torch.zeros_like(tok, dtype=torch.bool) if dec.eos_id is None else tok == dec.eos_id
        for i, r in enumerate(active.tolist()):
            out[r].logprob += picked[i].item()
            if ended[i]:
                out[r].finished = True
            else:
                out[r].tokens.append(tok[i].item())
        keep = (~ended).nonzero().flatten()
        if not keep.numel() or t + 1 == max_len:
            break
        if keep.numel() < active.numel():
            state, active, tok = dec.select(state, keep), active[keep], tok[keep]
        last = tok
    for h in out:
        h.score = h.logprob
    return out


@torch.no_grad()
def greedy(dec: IncrementalDecoder, rows: torch.Tensor, max_len: int) -> list[Hypothesis]:
    """The most likely next token at each step, for every row of ``rows``."""
    return _one_path(dec, _check(dec, rows, max_len, 1), max_len, lambda logp: logp.argmax(dim=-1))


@torch.no_grad()
def sample(dec: IncrementalDecoder, rows: torch.Tensor, max_len: int, top_k: int | None = None,
           temperature: float = 1.0, generator: torch.Generator | None = None) -> list[Hypothesis]:
    """Ancestral sampling: each next token drawn from ``softmax(logits / temperature)`` restricted
    to the ``top_k`` most likely (all when None), as image-token generators (DALL·E, VQGAN)
    decode; ``generator`` makes the draw reproducible. ``logprob`` is the model's (untempered)
    log-probability of the sampled tokens."""
    rows = _check(dec, rows, max_len, 1)
    if top_k is not None and not 1 <= top_k <= dec.vocab_size:
        raise ValueError(f"top_k must be in [1, {dec.vocab_size}], got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def choose(logp: torch.Tensor) -> torch.Tensor:
        scaled = logp / temperature
        if top_k is not None:
            kth = scaled.topk(top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, -torch.inf)
        return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(1)

    return _one_path(dec, rows, max_len, choose)


@dataclass
class _Row:
    """Search bookkeeping of one row."""

    finished: list[Hypothesis] = field(default_factory=list)
    done: bool = False


@torch.no_grad()
def beam_search(dec: IncrementalDecoder, rows: torch.Tensor, max_len: int, beam: int = 4,
                alpha: float = 1.0, n_best: int = 1) -> list[list[Hypothesis]]:
    """The ``n_best`` highest-scoring hypotheses (best first) of a width-``beam`` search per row."""
    rows = _check(dec, rows, max_len, beam)
    if not 1 <= n_best <= beam:
        raise ValueError(f"n_best must be in [1, beam={beam}], got {n_best}")
    B = rows.numel()
    book = [_Row() for _ in range(B)]
    active = list(range(B))  # rows still searching; beams of active[i] are decoder rows i*beam ... +beam
    state = dec.start(rows.repeat_interleave(beam))
    cum = torch.full((B, beam), -torch.inf, dtype=torch.float64)
    cum[:, 0] = 0.0  # all beams start identical: keep one, or the top-k would repeat it
    seqs = torch.empty(B, beam, 0, dtype=torch.long)
    last = torch.full((B * beam,), dec.bos_id, dtype=torch.long)
    for t in range(max_len):
        logp = _log_probs(dec, dec.step(state, last)).view(len(active), beam, -1)
        V = logp.shape[-1]
        cand = (cum[:, :, None] + logp).view(len(active), -1)
        top, idx = cand.topk(min(2 * beam, cand.shape[1]), dim=-1)  # enough that `beam` of them are not EOS
        new_cum = torch.full((len(active), beam), -torch.inf, dtype=torch.float64)
        src = torch.zeros(len(active), beam, dtype=torch.long)
        tok = torch.zeros(len(active), beam, dtype=torch.long)
        last_step = t + 1 == max_len
        for i, r in enumerate(active):
            k = 0
            for score, j in zip(top[i].tolist(), idx[i].tolist()):
                if score == -torch.inf or k == beam:
                    break
                b, w = divmod(j, V)
                prefix = seqs[i, b].tolist()
                if dec.eos_id is not None and w == dec.eos_id:
                    _offer(book[r], Hypothesis(prefix, score, score / length_penalty(t + 1, alpha), True), beam)
                    continue
                if last_step:  # out of room: the live hypothesis stops here unfinished
                    _offer(book[r], Hypothesis(prefix + [w], score, score / length_penalty(t + 1, alpha), False),
                           beam)
                new_cum[i, k], src[i, k], tok[i, k] = score, b, w
                k += 1
            book[r].done = last_step or _settled(book[r], new_cum[i].max().item(), t + 1, max_len, alpha, beam)
        if last_step:
            break
        keep = [i for i, r in enumerate(active) if not book[r].done]
        if not keep:
            break
        keep_t = torch.tensor(keep)
        gather = (keep_t[:, None] * beam + src[keep_t]).flatten()
        state = dec.select(state, gather)
        seqs = torch.cat([seqs[keep_t[:, None], src[keep_t]], tok[keep_t, :, None]], dim=-1)
        cum, last = new_cum[keep_t], tok[keep_t].flatten()
        active = [active[i] for i in keep]
    return [sorted(b.finished, key=lambda h: -h.score)[:n_best] for b in book]


def _offer(row: _Row, hyp: Hypothesis, beam: int) -> None:
    """Keep the ``beam`` best finished hypotheses of a row."""
    row.finished.append(hyp)
    if len(row.finished) > beam:
        row.finished.remove(min(row.finished, key=lambda h: h.score))


def _settled(row: _Row, best_live: float, length: int, max_len: int, alpha: float, beam: int) -> bool:
    """No live hypothesis (best cumulative log-prob ``best_live``, ``length`` tokens so far) can
    still enter the row's ``beam`` finished ones."""
    if best_live == -torch.inf:  # nothing left alive
        return True
    if len(row.finished) < beam:
        return False
    # log-probs only fall as tokens are added; the penalty is largest at one end of the range
    bound = best_live / max(length_penalty(length + 1, alpha), length_penalty(max_len, alpha))
    return bound <= min(h.score for h in row.finished)


def generate(dec: IncrementalDecoder, rows: torch.Tensor, max_len: int, beam: int = 1,
             alpha: float = 1.0, top_k: int | None = None, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Token lists, one per row: sampled when ``top_k`` is given (see :func:`sample`), else
    greedy for ``beam`` = 1, else the best of a beam search."""
    if top_k is not None:
        if beam != 1:
            raise ValueError(f"sampling draws one sequence per row: give top_k or beam > 1, not both (beam={beam})")
        return [h.tokens for h in sample(dec, rows, max_len, top_k, temperature, generator)]
    if beam == 1:
        return [h.tokens for h in greedy(dec, rows, max_len)]
    return [hyps[0].tokens for hyps in beam_search(dec, rows, max_len, beam, alpha)]
