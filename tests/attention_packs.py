"""Random packed attention inputs shared by the attention tests (Triton kernel, native CPU)."""

import torch


def make_pack(lengths: list[int], H: int, D: int, bias: str | None, seed: int = 0) -> dict:
    """Random inputs (fp32) for one pack; with a bias, a LUT with about 20% entries of -1."""
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
    lut = torch.randint(0, NB, (M, P, P), generator=g, dtype=torch.int32)
    lut[torch.rand(M, P, P, generator=g) < 0.2] = -1
    pack.update(table=torch.randn(NB, H, generator=g), lut=lut, modality=torch.tensor(modality),
                position=torch.tensor(position, dtype=torch.int32))
    return pack
