"""
Varlen attention, launchers and the torch.library custom ops
============================================================

``_launch_fwd``/``_launch_bwd`` check, allocate and launch (kernels in ``fwd.py``/``bwd.py``,
tiles in ``configs.py``); one custom op each way, so autograd and ``torch.compile`` see one
op; :func:`varlen_attention_triton` is the "triton" backend of ``ops.varlen_attention``.
"""

from __future__ import annotations

import math

import torch
import triton
from omni_core.kernels.varlen_attention.bias_grad import bias_grad_buffer, finish_bias_grad
from omni_core.kernels.varlen_attention.bwd import _bwd_delta_kernel
from omni_core.kernels.varlen_attention.common import (
    DTYPES,
    INTERPRET,
    LN2,
    LOG2E,
    LUT_DENSE,
    MAX_HEAD_DIM,
    _d_pad,
    lut_form,
    schedule,
    scheduled_programs,
)
from omni_core.kernels.varlen_attention.configs import (
    DELTA_BLOCK_T,
    DQ_BIAS_GRAD_CONFIGS,
    FUSED_BIAS_GRAD_CONFIGS,
    _bwd_dkdv,
    _bwd_dq,
    _bwd_fused,
    _fwd,
    _tier,
    bias_grad_block,
    seqlen_bucket,
)

__all__ = ["varlen_attention_triton"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
           cu_seqlens_k: torch.Tensor | None, bias: tuple[torch.Tensor | None, ...]) -> None:
    """Structural checks that need no host sync; raise before any launch."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, Dh], got shape {tuple(t.shape)}")
    shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if v.shape != k.shape or k.shape[2] != q.shape[2] or (cu_seqlens_k is None and k.shape[0] != q.shape[0]):
        raise ValueError(f"q, k, v shapes disagree: {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q, k, v shapes disagree: {shapes}: Hk={k.shape[1]} must divide H={q.shape[1]}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"varlen_attention_triton supports fp16, bf16, fp32 (all alike); got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    Dh = q.shape[2]
    if Dh % 8 or not 8 <= Dh <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {Dh} is not supported by the Triton kernel: it must be a multiple of 8 "
                         f"from 8 to {MAX_HEAD_DIM} (as flash-attn)")
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is not None and (cu.dtype != torch.int32 or cu.dim() != 1):
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_k is not None and cu_seqlens_k.shape != cu_seqlens.shape:
        raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens {tuple(cu_seqlens.shape)}, "
                         f"got {tuple(cu_seqlens_k.shape)}")
    given = [t for t in bias if t is not None]
    if given and cu_seqlens_k is not None:
        raise ValueError("the relative-position bias is a self-attention feature: it cannot be combined "
                         "with cu_seqlens_k (cross-attention)")
    if given and len(given) != 4:
        raise ValueError("the bias needs bias_table, bias_lut, modality and position together")
    compact = given and given[1].dim() == 2 and (given[1].shape[1] % 2 == 1 or given[1].shape[1] >= 4)
    if given and not (given[1].dim() == 3 or compact):
        raise ValueError(f"bias_lut must be [M, P, P], the compact relative [M, 2P-1] or the CLS-aware "
                         f"[M, 2P+2], got {tuple(given[1].shape)}")
    if given and (given[1].numel() >= 2**31 or given[0].numel() >= 2**31):
        raise ValueError("bias_lut and bias_table must each hold fewer than 2**31 entries (int32 offsets)")
    extra = [cu_seqlens_k] if cu_seqlens_k is not None else []
    devices = {t.device for t in (q, k, v, cu_seqlens, *extra, *given)}
    if len(devices) > 1:
        raise ValueError(f"tensors are on different devices: {sorted(map(str, devices))}")
    device = q.device
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise ValueError(f"the Triton kernel needs CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every kernel-written output (the tests swap in NaN-filled tensors so
    that an element the kernel fails to write shows up)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _bias_args(bias_table, bias_lut, modality, position, like: torch.Tensor):
    """Kernel bias arguments (table, lut, modality, position, P) and the constexprs
    HAS_BIAS, LUT_FORM; dummies (never read) when there is no bias. P is the number of
    positions (see :func:`~omni_core.kernels.varlen_attention.common.lut_form`)."""
    if bias_table is None:
        dummy_f = like.new_empty(1, dtype=torch.float32)
        dummy_i = like.new_empty(1, dtype=torch.int32)
        return (dummy_f, dummy_i, dummy_i, dummy_i, 1), {"HAS_BIAS": False, "LUT_FORM": LUT_DENSE}
    form, P = lut_form(bias_lut)
    return ((bias_table.contiguous(), bias_lut.contiguous(), modality.to(torch.int32).contiguous(),
             position.contiguous(), P), {"HAS_BIAS": True, "LUT_FORM": form})


def _launch_fwd(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, scale, causal, bias_table, bias_lut, modality,
                position):
    T, H, Dh = q.shape
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((H, T), torch.float32, q.device)
    if T == 0 or max_seqlen == 0:
        return out, lse
    (table, lut, mod, pos, P), bias_flags = _bias_args(bias_table, bias_lut, modality, position, q)
    order, cu_sched, B, steps = schedule(cu_seqlens)

    def grid(meta):
        return (scheduled_programs(T, B, meta["BLOCK_M"]), H)

    _fwd[_tier(Dh, DTYPES[q.dtype])][grid](
        q, k, v, out, lse, cu_seqlens, cu_seqlens_k, table, lut, mod, pos, order, cu_sched,
        scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        T, H, P, H // k.shape[1], B, steps, seqlen_bucket(max_seqlen),
        HEAD_DIM=Dh, D_PAD=_d_pad(Dh), **bias_flags, CAUSAL=causal,
        UPCAST=INTERPRET, IEEE=q.dtype == torch.float32,
    )
    return out, lse


def _delta(do: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) per (head, token), fp32 ``[H, T]`` like the lse (``_bwd_delta_kernel``)."""
    T, H, Dh = out.shape
    delta = _empty((H, T), torch.float32, out.device)
    if T > 0:
        block_t = DELTA_BLOCK_T[_d_pad(Dh) > 128]
        _bwd_delta_kernel[(triton.cdiv(T, block_t), H)](
            out, do, delta, *_strides(out), *_strides(do), T,
            HEAD_DIM=Dh, D_PAD=_d_pad(Dh), BLOCK_T=block_t, num_warps=4,
        )
    return delta


# The fused backward saves 2 of the 7 GEMMs of a tile pair but moves more bytes: its dq goes
# through an fp32 scratch (zero-fill, atomic read-modify-writes, a cast pass), where the dq
# kernel reads q, dO, k, v and writes dq once. The saved GEMMs grow with the key length, the
# extra bytes do not: in the traffic model (bf16, head dim 64, 2048 tokens of 2 heads,
# sequences of one length L; fused / two-kernel modelled time) L 256: 1.15 (H100) / 1.12
# (A100), 512: 1.11 / 0.93, 1024: 0.93 / 0.83, 2048: 0.83 / 0.77 — the H100 crossover is
# near 800 keys (A100 near 420). ONE-PEACE's packs (sequences of a few hundred tokens) stay
# on the two kernels.
FUSED_MIN_SEQLEN_K = 768


def fused_backward(deterministic: bool, max_seqlen_k: int) -> bool:
    """The dispatch rule of the backward: the fused kernel (5 GEMMs a tile pair, dq by fp32
    atomics) when not ``deterministic`` and the longest key sequence has at least
    ``FUSED_MIN_SEQLEN_K`` keys; else the two atomic-free kernels (7 GEMMs, dq summed in
    order, bit-repeatable as flash-attn's ``deterministic=True``)."""
    return not deterministic and max_seqlen_k >= FUSED_MIN_SEQLEN_K


def _launch_bwd(do, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, scale, causal,
                bias_table, bias_lut, modality, position, bias_grad, deterministic):
    """Gradients (dq, dk, dv, d bias_table), on the path ``fused_backward`` picks."""
    T, H, Dh = q.shape
    B = cu_seqlens.numel() - 1
    do = do.contiguous()
    dk, dv = (_empty(k.shape, k.dtype, k.device) for _ in range(2))
    delta = _delta(do, out.contiguous())
    (table, lut, mod, pos, P), bias_flags = _bias_args(bias_table, bias_lut, modality, position, q)
    bias_grad = bias_flags["HAS_BIAS"] and bias_grad
    NB = table.shape[0] if bias_flags["HAS_BIAS"] else 1
    tier = _tier(Dh, DTYPES[q.dtype])
    common = dict(HEAD_DIM=Dh, D_PAD=_d_pad(Dh), **bias_flags, CAUSAL=causal, UPCAST=INTERPRET,
                  IEEE=q.dtype == torch.float32)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    group = H // k.shape[1]
    Tk = k.shape[0]
    if fused_backward(deterministic, max_seqlen_k):
        # The bias gradient's private rows: one per program, a key block (BLOCK_N) each.
        programs = scheduled_programs(Tk, B, bias_grad_block(FUSED_BIAS_GRAD_CONFIGS, tier, 1))
        dbias_scratch = bias_grad_buffer(programs, NB, H, bias_grad and Tk > 0, q.device, _empty)
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        if Tk > 0 and max_seqlen_k > 0:  # also with no query rows: dk, dv are written (zeros)
            order, cu_sched, _, steps = schedule(cu_seqlens_k)
            _bwd_fused[bias_grad][tier][lambda meta: (scheduled_programs(Tk, B, meta["BLOCK_N"]), k.shape[1])](
                q, k, v, do, dq_acc, dk, dv, lse, delta, cu_seqlens, cu_seqlens_k, table, lut, mod, pos, order,
                cu_sched, dbias_scratch, scale * LOG2E, scale, *strides, T, H, P, group, NB, B, steps,
                seqlen_bucket(max_seqlen_k), BIAS_GRAD=bias_grad, **common,
            )
        dq = dq_acc.to(q.dtype)
    else:
        dq = _empty(q.shape, q.dtype, q.device)
        programs = scheduled_programs(T, B, bias_grad_block(DQ_BIAS_GRAD_CONFIGS, tier, 0))
        dbias_scratch = bias_grad_buffer(programs, NB, H, bias_grad and T > 0, q.device, _empty)
        _launch_bwd_deterministic(q, k, v, do, dq, dk, dv, lse, delta, cu_seqlens, cu_seqlens_k, max_seqlen,
                                  max_seqlen_k, scale, (table, lut, mod, pos, P, NB), dbias_scratch, bias_grad,
                                  strides, common)
    if not bias_grad:
        return dq, dk, dv, q.new_empty(0)
    if T == 0:  # nothing launched, no row written
        return dq, dk, dv, torch.zeros_like(bias_table)
    return dq, dk, dv, finish_bias_grad(dbias_scratch, bias_table.dtype)


def _launch_bwd_deterministic(q, k, v, do, dq, dk, dv, lse, delta, cu_seqlens, cu_seqlens_k, max_seqlen,
                              max_seqlen_k, scale, bias, dbias_scratch, bias_grad, strides, common):
    """The two atomic-free kernels: dk/dv per key block, then dq (and the bias gradient) per query block."""
    T, H, Dh = q.shape
    B = cu_seqlens.numel() - 1
    table, lut, mod, pos, P, NB = bias
    tier = _tier(Dh, DTYPES[q.dtype])
    group = H // k.shape[1]
    Tk = k.shape[0]
    if Tk > 0 and max_seqlen_k > 0:
        order, cu_sched, _, steps = schedule(cu_seqlens_k)
        _bwd_dkdv[tier][lambda meta: (scheduled_programs(Tk, B, meta["BLOCK_N"]), k.shape[1])](
            q, k, v, do, dk, dv, lse, delta, cu_seqlens, cu_seqlens_k, table, lut, mod, pos, order, cu_sched,
            scale * LOG2E, scale, *strides, T, H, P, group, B, steps, seqlen_bucket(max_seqlen_k), **common,
        )
    if T > 0 and max_seqlen > 0:
        order, cu_sched, _, steps = schedule(cu_seqlens)
        _bwd_dq[bias_grad][tier][lambda meta: (scheduled_programs(T, B, meta["BLOCK_M"]), H)](
            q, k, v, do, dq, lse, delta, cu_seqlens, cu_seqlens_k, table, lut, mod, pos, order, cu_sched,
            dbias_scratch, scale * LOG2E, scale, *strides, T, H, P, group, NB, B, steps, seqlen_bucket(max_seqlen),
            BIAS_GRAD=bias_grad,
            **common,
        )


@torch.library.custom_op("omni_core::varlen_attention", mutates_args=())
def _varlen_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen: int, max_seqlen_k: int, softmax_scale: float, causal: bool, bias_table: torch.Tensor | None,
    bias_lut: torch.Tensor | None, modality: torch.Tensor | None, position: torch.Tensor | None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out [T, H, Dh], lse [H, T] fp32, base 2). ``deterministic`` picks the
    backward's path (see ``_launch_bwd``)."""
    return _launch_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens_k, max_seqlen,
                       softmax_scale, causal, bias_table, bias_lut, modality, position)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, softmax_scale, causal, bias_table, bias_lut,
      modality, position, deterministic=False):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("omni_core::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, bias_table: torch.Tensor | None, bias_lut: torch.Tensor | None,
    modality: torch.Tensor | None, position: torch.Tensor | None, bias_grad: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv, d bias_table); d bias_table is empty without a bias or when
    ``bias_grad`` is off (bias_table needs no gradient: the bias-gradient work is skipped)."""
    return _launch_bwd(do, q.contiguous(), k.contiguous(), v.contiguous(), out, lse, cu_seqlens, cu_seqlens_k,
                       max_seqlen, max_seqlen_k, softmax_scale, causal, bias_table, bias_lut, modality, position,
                       bias_grad, deterministic)


@_varlen_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, softmax_scale, causal,
      bias_table, bias_lut, modality, position, bias_grad, deterministic):
    dbias = torch.empty_like(bias_table) if bias_table is not None and bias_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, scale, causal, bias_table, bias_lut, modality,
     position, deterministic) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, cu_seqlens_k, bias_table, bias_lut, modality, position)
    ctx.max_seqlen, ctx.max_seqlen_k, ctx.scale, ctx.causal = max_seqlen, max_seqlen_k, scale, causal
    ctx.deterministic = deterministic


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, cu_seqlens_k, bias_table, bias_lut, modality, position = ctx.saved_tensors
    bias_grad = bias_table is not None and ctx.needs_input_grad[9]
    dq, dk, dv, dbias = _varlen_attention_backward_op(
        dout, q, k, v, out, lse, cu_seqlens, cu_seqlens_k, ctx.max_seqlen, ctx.max_seqlen_k, ctx.scale,
        ctx.causal, bias_table, bias_lut, modality, position, bias_grad, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, (dbias if bias_grad else None), None, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)



def varlen_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None,
    bias_table: torch.Tensor | None,
    bias_lut: torch.Tensor | None,
    modality: torch.Tensor | None,
    position: torch.Tensor | None,
    *,
    causal: bool = False,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The "triton" backend of :func:`omni_core.ops.varlen_attention` (same arguments, the
    first ten positional). Differentiable in q, k, v and ``bias_table``; one op for
    torch.compile. With ``return_lse`` also the natural-log LSE ``[H, T]`` fp32 (not
    differentiable, as flash-attn's).

    The backward of packs with a key sequence of ``FUSED_MIN_SEQLEN_K`` or more is
    FlashAttention-2's fused kernel, whose ``dq`` is summed by fp32 atomics (on a GPU, its
    last bits vary from run to run); shorter packs, and every pack with ``deterministic=True``
    (flash-attn's flag) or under ``torch.use_deterministic_algorithms(True)``, take the two
    atomic-free kernels, bit-repeatable (see ``fused_backward``). ``dk``, ``dv`` and
    ``d bias_table`` are bit-repeatable on both paths."""
    _check(q, k, v, cu_seqlens, cu_seqlens_k, (bias_table, bias_lut, modality, position))
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    elif max_seqlen_k is None:
        raise ValueError("max_seqlen_k is required with cu_seqlens_k")
    out, lse = _varlen_attention_op(q, k, v, cu_seqlens, cu_seqlens_k, int(max_seqlen), int(max_seqlen_k), scale,
                                    bool(causal), bias_table, bias_lut, modality, position,
                                    bool(deterministic) or torch.are_deterministic_algorithms_enabled())
    return (out, lse * LN2) if return_lse else out


# "deterministic": the op takes a ``deterministic`` keyword (backends without it are deterministic).
varlen_attention_triton.modes = frozenset({"causal", "cross", "gqa", "lse", "relative_lut", "deterministic"})
