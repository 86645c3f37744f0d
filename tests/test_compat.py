"""``omni_core.compat``: flash-attn's and xformers' entry points, with xformers' real mask
classes. Results are compared with ``ops.varlen_attention_reference`` called with the
packing written out by hand, so what is tested is each adapter's mapping of its library's
conventions (layouts, masks, causal alignment, LSE shape) onto the op."""

from __future__ import annotations

import math

import pytest
import torch
from xformers.ops.fmha import attn_bias as xb

from omni_core import compat, ops


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# The wrappers map arguments; the op they call may run on another backend than the reference
# (the native CPU kernel since it took every mode), so float64 agreement is to the kernel
# contract's 1e-12, not bitwise.
F64 = dict(rtol=0, atol=1e-12)

def reference(q, k, v, q_lens, k_lens, causal, scale=None, lse=False):
    cross = {} if q_lens == k_lens else {"cu_seqlens_k": cu(k_lens), "max_seqlen_k": max(k_lens)}
    return ops.varlen_attention_reference(q, k, v, cu(q_lens), max(q_lens), scale, causal=causal,
                                          return_lse=lse, **cross)


# ----------------------------------------------------------------------------- flash-attn


def test_flash_varlen_causal_cross_gqa_with_lse():
    q_lens, k_lens = [3, 1, 6], [5, 0, 6]
    q, k, v = rand(10, 4, 16), rand(11, 2, 16), rand(11, 2, 16)
    out, lse, probs = compat.flash_attn_varlen_func(q, k, v, cu(q_lens), cu(k_lens), 6, 6, causal=True,
                                                    return_attn_probs=True)
    ref, ref_lse = reference(q, k, v, q_lens, k_lens, True, lse=True)
    assert probs is None and lse.shape == (4, 10)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(lse, ref_lse, **F64)


def test_flash_varlen_equal_packs_are_self_attention_so_the_bias_works():
    q, k, v = rand(9, 2, 8), rand(9, 2, 8), rand(9, 2, 8)
    bias = dict(bias_table=rand(5, 2), bias_lut=torch.randint(-1, 5, (1, 9, 9), dtype=torch.int32),
                modality=torch.zeros(9, dtype=torch.int32), position=torch.arange(9, dtype=torch.int32) % 6)
    out = compat.flash_attn_varlen_func(q, k, v, cu([6, 3]), cu([6, 3]), 6, 6, causal=True, **bias)
    ref = ops.varlen_attention_reference(q, k, v, cu([6, 3]), 6, None, *bias.values(), causal=True)
    torch.testing.assert_close(out, ref, **F64)


def test_flash_attn_func_padded_batch():
    q, k, v = rand(2, 3, 4, 8), rand(2, 5, 1, 8), rand(2, 5, 1, 8)
    out, lse, _ = compat.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, return_attn_probs=True)
    ref, ref_lse = reference(q.reshape(6, 4, 8), k.reshape(10, 1, 8), v.reshape(10, 1, 8), [3, 3], [5, 5], True,
                             scale=0.3, lse=True)
    assert out.shape == (2, 3, 4, 8) and lse.shape == (2, 4, 3)
    torch.testing.assert_close(out, ref.view(2, 3, 4, 8), **F64)
    torch.testing.assert_close(lse, ref_lse.view(4, 2, 3).transpose(0, 1), **F64)


def test_flash_attn_with_kvcache_matches_the_op():
    q, k_cache, v_cache = rand(2, 1, 4, 8), rand(2, 7, 2, 8), rand(2, 7, 2, 8)
    k, v = rand(2, 1, 2, 8), rand(2, 1, 2, 8)
    mine = (k_cache.clone(), v_cache.clone())
    out, lse = compat.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3, causal=True,
                                              return_softmax_lse=True)
    ref, ref_lse = ops.attention_with_kvcache(q, *mine, torch.tensor([3, 3], dtype=torch.int32), k=k, v=v,
                                              return_lse=True)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(lse, ref_lse, **F64)
    assert torch.equal(k_cache, mine[0]) and torch.equal(k_cache[:, 3], k[:, 0])


def _varlen(**kw):
    x = rand(4, 2, 8)
    return compat.flash_attn_varlen_func(x, x, x, cu([4]), cu([4]), 4, 4, **kw)


def _padded(**kw):
    x = rand(1, 4, 2, 8)
    return compat.flash_attn_func(x, x, x, **kw)


def _kvcache(**kw):
    return compat.flash_attn_with_kvcache(rand(1, 1, 2, 8), rand(1, 4, 2, 8), rand(1, 4, 2, 8), cache_seqlens=2,
                                          **kw)


@pytest.mark.parametrize("call, kwargs, message", [
    (_varlen, {"dropout_p": 0.1}, "dropout_p"),
    (_varlen, {"window_size": (8, 0)}, "sliding window"),
    (_varlen, {"softcap": 30.0}, "softcap"),
    (_varlen, {"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
    (_varlen, {"block_table": torch.zeros(1, 1, dtype=torch.int32)}, "paged KV"),
    (_padded, {"dropout_p": 0.5}, "dropout_p"),
    (_padded, {"window_size": (-1, 3)}, "sliding window"),
    (_kvcache, {"rotary_cos": torch.ones(4, 4), "rotary_sin": torch.ones(4, 4)}, "rotary"),
    (_kvcache, {"block_table": torch.zeros(1, 1, dtype=torch.int32)}, "paged KV"),
    (_kvcache, {"cache_leftpad": torch.zeros(1, dtype=torch.int32)}, "cache_leftpad"),
    (_kvcache, {"cache_batch_idx": torch.zeros(1, dtype=torch.int32)}, "cache_batch_idx"),
])
def test_unsupported_flash_features_are_named(call, kwargs, message):
    with pytest.raises(NotImplementedError, match=message):
        call(**kwargs)


# ----------------------------------------------------------------------------- xformers


def test_xformers_no_mask_is_one_sequence_per_batch_element():
    q, k, v = rand(2, 3, 2, 8), rand(2, 6, 2, 8), rand(2, 6, 2, 8)
    out = compat.memory_efficient_attention(q, k, v, scale=0.2, op=object())
    ref = reference(q.reshape(6, 2, 8), k.reshape(12, 2, 8), v.reshape(12, 2, 8), [3, 3], [6, 6], False, 0.2)
    torch.testing.assert_close(out, ref.view(2, 3, 2, 8), **F64)


@pytest.mark.parametrize("mask_class, q_lens, k_lens, causal", [
    ("BlockDiagonalMask", [3, 1, 5], [2, 6, 1], False),
    ("BlockDiagonalCausalMask", [3, 1, 5], [3, 1, 5], True),
    ("BlockDiagonalCausalFromBottomRightMask", [3, 1, 5], [4, 1, 9], True),
])
def test_xformers_block_diagonal_masks(mask_class, q_lens, k_lens, causal):
    mask = getattr(xb, mask_class).from_seqlens(q_lens, k_lens)
    q, k, v = rand(1, sum(q_lens), 2, 8), rand(1, sum(k_lens), 2, 8), rand(1, sum(k_lens), 2, 8)
    out = compat.memory_efficient_attention(q, k, v, attn_bias=mask)
    ref = reference(q[0], k[0], v[0], q_lens, k_lens, causal)
    torch.testing.assert_close(out[0], ref, **F64)


def test_xformers_grouped_query_layout():
    """[B, M, G, H, K] with keys expanded over H: query head (g, h) reads key head g."""
    q = rand(1, 7, 2, 3, 8)
    k, v = rand(1, 7, 2, 1, 8).expand(1, 7, 2, 3, 8), rand(1, 7, 2, 1, 8).expand(1, 7, 2, 3, 8)
    mask = xb.BlockDiagonalCausalMask.from_seqlens([4, 3])
    out = compat.memory_efficient_attention(q, k, v, attn_bias=mask)
    ref = reference(q[0].reshape(7, 6, 8), k[0, :, :, 0], v[0, :, :, 0], [4, 3], [4, 3], True)
    assert out.shape == q.shape
    torch.testing.assert_close(out[0].reshape(7, 6, 8), ref, **F64)


@pytest.mark.parametrize("make, message", [
    (lambda: xb.BlockDiagonalMask.from_seqlens([3, 4]).make_local_attention(2),
     "BlockDiagonalCausalLocalAttentionMask"),
    (lambda: xb.BlockDiagonalCausalMask.from_seqlens([3, 4], [4, 4]), "unequal query and key lengths"),
    (lambda: torch.zeros(1, 2, 7, 7, dtype=torch.float64), "Tensor"),
])
def test_xformers_refuses_other_masks(make, message):
    q = rand(1, 7, 2, 8)
    k = rand(1, 8, 2, 8) if "unequal" in message else q
    with pytest.raises(NotImplementedError, match=message):
        compat.memory_efficient_attention(q, k, k, attn_bias=make())
    with pytest.raises(NotImplementedError, match="dropout"):
        compat.memory_efficient_attention(q, q, q, p=0.1)


def test_xformers_mask_cu_seqlens_stay_on_device_across_calls(monkeypatch):
    """One device copy of the mask's cu_seqlens for every layer of a batch, so the op's
    memoised layout checks (keyed on that tensor) run once."""
    import omni_core.integrations.xformers as xf

    seen = []

    def spy(q, k, v, cu_seqlens, max_seqlen, **kw):
        seen.append(cu_seqlens)
        return ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, **kw)

    monkeypatch.setattr(xf, "varlen_attention", spy)
    mask = xb.BlockDiagonalMask.from_seqlens([2, 5])
    q = rand(1, 7, 2, 8)
    for _ in range(3):
        compat.memory_efficient_attention(q, q, q, attn_bias=mask)
    assert seen[0] is seen[1] is seen[2] and seen[0].dtype == torch.int32
    assert math.isclose(float(seen[0][-1]), 7)
