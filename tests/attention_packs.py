"""Random packed attention inputs shared by the attention tests (Triton kernel, native CPU)."""

import torch

from omni_core.ops.attention import lut_columns


def make_pack(lengths: list[int], H: int, D: int, bias: str | None, seed: int = 0, lut: str = "random") -> dict:
    """Random inputs (fp32) for one pack; with a bias, a LUT with about 20% entries of -1:
    ``lut="random"`` draws every (modality, query position, key position) entry; "relative"
    draws one entry per (modality, position difference), as every LUT a model builds, and
    gives it as ``[M, P, P]``; "compact" gives that LUT as ``[M, 2P-1]``; "cls_compact" draws
    the CLS-aware compact ``[M, 2P+2]`` (position 0 reads its own three columns)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pack = {"q": torch.randn(T, H, D, generator=g), "k": torch.randn(T, H, D, generator=g),
            "v": torch.randn(T, H, D, generator=g), "cu": cu, "max_seqlen": max(lengths),
            "dout": torch.randn(T, H, D, generator=g)}
    if bias is None:
        pack.update(table=None, lut=None, modality=None, position=None)
        return pack
    M, NB = 3, 29
    modality, position = [], []
    for L in lengths:
        cut = int(torch.randint(0, L + 1, (1,), generator=g)) if bias == "joint" else L
        first, second = torch.randperm(M, generator=g)[:2].tolist()
        modality += [first] * cut + [second] * (L - cut)
        position += list(range(cut)) + list(range(L - cut))
    P = max(lengths) + 2
    shape = {"random": (M, P, P), "cls_compact": (M, 2 * P + 2)}.get(lut, (M, 2 * P - 1))
    entries = torch.randint(0, NB, shape, generator=g, dtype=torch.int32)
    entries[torch.rand(shape, generator=g) < 0.2] = -1
    if lut == "relative":
        pos = torch.arange(P)
        entries = entries[:, pos[None, :] - pos[:, None] + P - 1]
    pack.update(table=torch.randn(NB, H, generator=g), lut=entries, modality=torch.tensor(modality),
                position=torch.tensor(position, dtype=torch.int32))
    return pack


def bias_grad_abs_sums(pack: dict, causal: bool = False) -> torch.Tensor:
    """``[NB, H]`` float64: for every bias_table entry and head, the sum of |dS| over the
    (query, key) pairs that read it, from a dense float64 attention per sequence.

    The bias gradient is a sum of dS terms that nearly cancel (every row of dS sums to 0),
    so its relative error is set by the summation's condition ||sum |dS| || / ||sum dS||,
    not by the precision alone: a result whose terms each carry relative error d is off
    by at most d * ||sum |dS| ||. The tests scale their bound for d bias_table with it."""
    q, k, v, do = (pack[n].double() for n in ("q", "k", "v", "dout"))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # grouped-query heads
    table, lut, modality, position = pack["table"].double(), pack["lut"], pack["modality"], pack["position"]
    sums = torch.zeros(table.shape, dtype=torch.float64)
    bounds = pack["cu"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        L = end - start
        mod, pos = modality[start:end].long(), position[start:end].long()
        if lut.dim() == 2:
            entry = lut[mod[:, None], lut_columns(lut, pos[:, None], pos[None, :])].long()
        else:
            entry = lut[mod[:, None], pos[:, None], pos[None, :]].long()
        keep = (mod[:, None] == mod[None, :]) & (entry >= 0)
        bias = (table[entry.clamp(min=0)] * keep[..., None]).permute(2, 0, 1).clone().requires_grad_()
        logits = torch.einsum("ihd,jhd->hij", q[start:end], k[start:end]) / q.shape[-1] ** 0.5 + bias
        if causal:
            logits = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        torch.einsum("hij,jhd->ihd", logits.softmax(-1), v[start:end]).backward(do[start:end])
        sums.index_add_(0, entry[keep], bias.grad.abs().permute(1, 2, 0)[keep])
    return sums
