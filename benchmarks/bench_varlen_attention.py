"""GPU benchmark: omni-core's varlen attention against its peers on a ONE-PEACE-like pack.

    .venv/bin/pytest benchmarks/bench_varlen_attention.py --benchmark-group-by=param:direction

The pack mixes 64 images (257 tokens), 256 captions (8-70 tokens) and 32 audio clips
(50-750 tokens), 24 heads of dim 64. Each peer runs the same pack, forward only and
forward + backward:

* ``omni`` — this kernel, with the relative-position bias and without it;
* ``flash_attn`` — ``flash_attn_varlen_func`` (no bias: flash-attn has none);
* ``xformers`` — ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (no bias);
* ``flex`` — ``torch.nn.attention.flex_attention`` with the sequences as a block mask and
  the same bias as a ``score_mod``;
* ``sdpa`` — ``scaled_dot_product_attention`` on nested (jagged) tensors, no bias.

Throughput is reported in ``extra_info`` as TFLOP/s of the useful work: 4·Σ L²·Dh·H FLOPs
forward (QKᵀ and PV), 2.5 times that for the backward (5 matmuls), so 3.5 times for
forward + backward. Peers that are not installed are skipped, and everything is skipped
without a CUDA GPU (never passed).

Decoder rows (``test_causal_gqa_throughput``): a pack of 48 sequences of 128-2048 tokens,
32 query heads over 8 key/value heads, causal, head dims 64, 80 (padded to 128 inside the
kernel: this row is the measurement that decides whether a 64+16 column split is worth
it) and 128; omni against ``flash_attn_varlen_func(causal=True)``. FLOPs count the pairs
the causal mask keeps, Σ L(L+1)/2.

Backward-path rows (``test_backward_path_crossover``): the fused and the two-kernel backward on
sequences of 256-2048 tokens, the GPU check of the dispatch rule's length threshold.

Decode rows (``test_decode_throughput``): one new token for 16 sequences against caches of
512-16384 tokens (32 query heads over 8 key heads, dim 128), omni's split-KV kernel
(``ops.attention_with_kvcache``) against ``flash_attn_with_kvcache``; ``extra_info``
reports the cache bandwidth (bytes of K and V read / time), the bound of a decode step.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HEADS, HEAD_DIM, REL_RANGE = 24, 64, 64
MODALITIES = 3  # 0 text, 1 image, 2 audio


def one_peace_pack(seed: int = 0) -> dict:
    """Lengths, cu_seqlens and a relative-position bias (one modality per sequence)."""
    g = torch.Generator().manual_seed(seed)
    lengths = ([(0, int(n)) for n in torch.randint(8, 71, (256,), generator=g)] + [(1, 257)] * 64
               + [(2, int(n)) for n in torch.randint(50, 751, (32,), generator=g)])
    order = torch.randperm(len(lengths), generator=g).tolist()
    lengths = [lengths[i] for i in order]
    modality = torch.cat([torch.full((n,), m) for m, n in lengths])
    position = torch.cat([torch.arange(n, dtype=torch.int32) for _, n in lengths])
    cu = torch.tensor([0, *torch.tensor([n for _, n in lengths]).cumsum(0).tolist()], dtype=torch.int32)
    P = max(n for _, n in lengths)
    rel = (torch.arange(P)[None, :] - torch.arange(P)[:, None]).clamp(-REL_RANGE, REL_RANGE) + REL_RANGE
    lut = torch.stack([rel + m * (2 * REL_RANGE + 1) for m in range(MODALITIES)]).to(torch.int32)
    table = torch.randn(MODALITIES * (2 * REL_RANGE + 1), HEADS) * 0.1
    dev = "cuda"
    return {"lengths": [n for _, n in lengths], "cu": cu.to(dev), "modality": modality.to(dev),
            "position": position.to(dev), "lut": lut.to(dev), "table": table.to(dev),
            "max_seqlen": P, "T": int(cu[-1])}


def flops(pack: dict, backward: bool) -> float:
    fwd = 4.0 * sum(n * n for n in pack["lengths"]) * HEAD_DIM * HEADS
    return fwd * (3.5 if backward else 1.0)


def _omni(pack, with_bias):
    from omni_core.kernels.varlen_attention import varlen_attention_triton

    bias = (pack["table"], pack["lut"], pack["modality"], pack["position"]) if with_bias else (None,) * 4
    return lambda q, k, v: varlen_attention_triton(q, k, v, pack["cu"], pack["max_seqlen"], None, *bias)


def _flash_attn(pack):
    flash_attn = pytest.importorskip("flash_attn")
    return lambda q, k, v: flash_attn.flash_attn_varlen_func(
        q, k, v, pack["cu"], pack["cu"], pack["max_seqlen"], pack["max_seqlen"])


def _xformers(pack):
    xops = pytest.importorskip("xformers.ops")
    mask = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(pack["lengths"])
    return lambda q, k, v: xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask)[0]


def _flex(pack):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    T = pack["T"]
    seq_id = torch.repeat_interleave(torch.arange(len(pack["lengths"]), device="cuda"),
                                     torch.tensor(pack["lengths"], device="cuda"))
    mod, pos, lut, table = pack["modality"], pack["position"], pack["lut"], pack["table"]

    def same_sequence(b, h, q_idx, kv_idx):
        return seq_id[q_idx] == seq_id[kv_idx]

    def bias(score, b, h, q_idx, kv_idx):
        entry = lut[mod[q_idx], pos[q_idx], pos[kv_idx]]
        keep = (mod[q_idx] == mod[kv_idx]) & (entry >= 0)
        return score + torch.where(keep, table[entry.clamp(min=0), h], 0.0).to(score.dtype)

    block_mask = flex.create_block_mask(same_sequence, None, None, T, T, device="cuda")
    attend = torch.compile(flex.flex_attention)

    def run(q, k, v):
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
        return attend(q4, k4, v4, score_mod=bias, block_mask=block_mask)[0].transpose(0, 1)

    return run


def _sdpa(pack):
    offsets = pack["cu"].long()

    def run(q, k, v):
        nested = [torch.nested.nested_tensor_from_jagged(t, offsets=offsets).transpose(1, 2) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*nested)
        return out.transpose(1, 2).values()

    return run


PEERS = {
    "omni_bias": lambda pack: _omni(pack, True),
    "omni": lambda pack: _omni(pack, False),
    "flash_attn": _flash_attn,
    "xformers": _xformers,
    "flex_bias": _flex,
    "sdpa": _sdpa,
}


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("peer", list(PEERS))
def test_varlen_attention_throughput(benchmark, peer, direction):
    pack = one_peace_pack()
    attend = PEERS[peer](pack)
    q, k, v = (torch.randn(pack["T"], HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=direction == "fwd_bwd") for _ in range(3))
    dout = torch.randn_like(q)

    def step():
        out = attend(q, k, v)
        if direction == "fwd_bwd":
            out.backward(dout)
        torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(step, rounds=10, warmup_rounds=3)
    assert out.shape == q.shape and torch.isfinite(out).all()
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["tflops"] = flops(pack, direction == "fwd_bwd") / seconds / 1e12
    benchmark.extra_info["tokens"] = pack["T"]
    assert math.isfinite(benchmark.extra_info["tflops"])


# ----------------------------------------------------------------------------- decoders

DEC_HEADS, DEC_KV_HEADS = 32, 8


def decoder_lengths(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(n) for n in torch.randint(128, 2049, (48,), generator=g)]


def _omni_causal():
    from omni_core.ops import varlen_attention

    return lambda q, k, v, cu, L: varlen_attention(q, k, v, cu, L, causal=True)


def _flash_causal():
    flash_attn = pytest.importorskip("flash_attn")
    return lambda q, k, v, cu, L: flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True)


CAUSAL_PEERS = {"omni": _omni_causal, "flash_attn": _flash_causal}


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("peer", list(CAUSAL_PEERS))
def test_causal_gqa_throughput(benchmark, peer, direction, head_dim, monkeypatch):
    monkeypatch.setenv("OMNI_BACKEND", "triton")
    attend = CAUSAL_PEERS[peer]()
    lengths = decoder_lengths()
    T, L = sum(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    grad = direction == "fwd_bwd"
    q = torch.randn(T, DEC_HEADS, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    k, v = (torch.randn(T, DEC_KV_HEADS, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
            for _ in range(2))
    dout = torch.randn_like(q)

    def step():
        out = attend(q, k, v, cu, L)
        if grad:
            out.backward(dout)
        torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(step, rounds=10, warmup_rounds=3)
    assert out.shape == q.shape and torch.isfinite(out).all()
    useful = 4.0 * sum(n * (n + 1) // 2 for n in lengths) * head_dim * DEC_HEADS * (3.5 if grad else 1.0)
    benchmark.extra_info["tflops"] = useful / benchmark.stats.stats.median / 1e12


# ----------------------------------------------------------------------------- backward paths

@pytest.mark.parametrize("path", ["fused", "two_kernel"])
@pytest.mark.parametrize("length", [256, 512, 1024, 2048])
def test_backward_path_crossover(benchmark, length, path, monkeypatch):
    """The attention backward on each path (the fused kernel forced, or the two kernels) for
    sequences of one length, 24 heads of dim 64, 64k tokens, bf16: the measurement that checks
    the dispatch rule's FUSED_MIN_SEQLEN_K, which comes from the traffic model
    (``python benchmarks/traffic.py --attention-sweep``: fused / two-kernel H100 time 1.15,
    1.11, 0.93, 0.83 at these lengths). ``extra_info`` has the backward's useful TFLOP/s."""
    from omni_core.kernels.varlen_attention import op as attention_op

    monkeypatch.setattr(attention_op, "FUSED_MIN_SEQLEN_K", 0 if path == "fused" else 1 << 30)
    n = (1 << 16) // length
    cu = torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(n * length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = attention_op.varlen_attention_triton(q, k, v, cu, length, None, None, None, None, None)
    dout = torch.randn_like(out)

    def step():
        q.grad = k.grad = v.grad = None
        out.backward(dout, retain_graph=True)
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=3)
    useful = 2.5 * 4.0 * n * length * length * HEAD_DIM * HEADS  # 5 matmuls over the pairs
    benchmark.extra_info["tflops"] = useful / benchmark.stats.stats.median / 1e12
    assert torch.isfinite(q.grad).all()


def _omni_decode():
    from omni_core.ops import attention_with_kvcache

    return lambda q, kc, vc, seqlens: attention_with_kvcache(q, kc, vc, seqlens, causal=True)


def _flash_decode():
    flash_attn = pytest.importorskip("flash_attn")
    return lambda q, kc, vc, seqlens: flash_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens,
                                                                         causal=True)


DECODE_PEERS = {"omni": _omni_decode, "flash_attn": _flash_decode}


@pytest.mark.parametrize("peer", list(DECODE_PEERS))
def test_decode_throughput(benchmark, peer, monkeypatch):
    monkeypatch.setenv("OMNI_BACKEND", "triton")
    attend = DECODE_PEERS[peer]()
    B, S, D = 16, 16384, 128
    g = torch.Generator().manual_seed(0)
    seqlens = torch.randint(512, S + 1, (B,), generator=g, dtype=torch.int32).cuda()
    q = torch.randn(B, 1, DEC_HEADS, D, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(B, S, DEC_KV_HEADS, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def step():
        out = attend(q, k_cache, v_cache, seqlens)
        torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    assert out.shape == q.shape and torch.isfinite(out).all()
    cache_bytes = 2 * int(seqlens.sum()) * DEC_KV_HEADS * D * 2
    benchmark.extra_info["cache_GBps"] = cache_bytes / benchmark.stats.stats.median / 1e9
