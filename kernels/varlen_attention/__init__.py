"""Varlen attention with a gathered relative-position bias, in Triton.

This implements :func:`omni_core.ops.varlen_attention` (see ``omni_core/ops/attention.py``
for the contract): packed ``q [Tq, H, Dh]`` split into sequences by ``cu_seqlens`` and
``k, v [Tk, Hk, Dh]`` split by ``cu_seqlens_k`` (the same pack for self-attention); query
sequence b attends only to key sequence b, optionally with the bottom-right causal mask
(row i sees key j iff ``j <= i + Lk - Lq``); query head h reads key head ``h // (H / Hk)``;
when a bias is given (self-attention only), the logit of query ``i`` and key ``j`` gets
``bias_table[bias_lut[m, pos[i], pos[j]], h]`` (or, with the compact relative LUT
``[M, 2P-1]``, ``bias_table[bias_lut[m, pos[j] - pos[i] + P - 1], h]``; with the CLS-aware
compact ``[M, 2P+2]`` the same between positions >= 1 and columns ``2P-1``, ``2P``, ``2P+1``
when the query, the key or both are position 0) if both tokens carry modality ``m`` and
that LUT entry is ``>= 0``.

How it works
------------
* **Schedule.** Every program owns one (query block or key block, sequence, head). The
  grid is ``(T // BLOCK + B, H)``: dimension 0 is flattened over the (sequence, block) pairs,
  longest sequence first, each program finding its pair by a binary search over on-device
  offsets (``common._scheduled_tile``; no host sync, no grid dimension bounded by B); a spare
  program returns at once, and the inner loop runs only over the blocks of the same
  sequence, so no key block of another sequence is ever visited and no ``[T, T]`` mask exists.
  With ``causal`` the loops stop at (forward, dq) or start from (dk/dv) the diagonal block,
  so about half the blocks of a causal sequence are never visited.
* **Rows without keys** (an empty key sequence, causal rows with ``i + Lk - Lq < 0``) keep a
  running max of -inf; the kernel shifts them by 0 instead (exp2 stays 0, never NaN) and
  writes output 0 and lse -inf, as flash-attn. The backward reads lse -inf as +inf so their
  probabilities are 0.
* **Grouped-query heads.** The forward and dq programs read key head ``h // GROUP``. The
  dk/dv program owns one *key* head and loops over the GROUP query heads that share it,
  so the group's gradients are summed in registers, without atomics or a reduction pass.
* **Bias.** Gathered per tile: ``modality`` and ``position`` of the rows and columns index
  ``bias_lut``, whose entry indexes ``bias_table``. Neither ``[T, T]`` nor ``[H, L, L]`` is
  ever materialised. A tile without a same-modality pair (text rows against image keys of
  a joint sequence) loads no LUT or table entry. The compact LUTs (``[M, 2P-1]``, and
  ``[M, 2P+2]`` for ONE-PEACE's tables with their CLS row, column and corner; BEiT's 2-D
  image table is relative over positions respaced by ``relpos.grid_positions``) are O(P)
  where ``[M, P, P]`` is O(P^2), so their gathers hit a few cache lines. The form is the
  constexpr ``LUT_FORM`` (``common.lut_form`` reads it from the shape).
* **Forward.** Online softmax in base 2 (``exp2`` is one instruction); the row
  log-sum-exp (base 2) is saved for the backward and returned (natural log) on request.
* **Backward.** ``delta = rowsum(dO * O)`` (a preprocess kernel), then the probabilities are
  recomputed from the saved log-sum-exp, on one of two paths (``op.fused_backward``). For
  packs with a key sequence of ``op.FUSED_MIN_SEQLEN_K`` (768) keys or more, FlashAttention-2's
  fused kernel: one program per (key block, key head) accumulates ``dk, dv`` over the query
  blocks (and the query heads of its group) and adds each tile's ``dq`` into an fp32 scratch
  by atomics (cast after the launch): 5 GEMMs per tile pair. Shorter packs, and any pack with
  ``deterministic=True`` (or ``torch.use_deterministic_algorithms``), take two atomic-free
  kernels: dk/dv per key block, dq per query block summed in order (7 GEMMs: S and dP are
  computed twice), bit-repeatable; for short keys the two GEMMs cost less than the fused
  path's fp32 dq scratch traffic (the traffic model's crossover is near 800 keys on H100).
  When ``bias_table`` needs no gradient the bias-gradient code is
  compiled out (``BIAS_GRAD=False``) and no scratch is allocated.
* **Bias gradient: no atomics, deterministic on both paths.** The kernel that holds ``dS``
  (the fused one, or the deterministic path's dq kernel) reduces each tile along its token
  diagonals (all pairs of a diagonal read one entry of a relative LUT), merges diagonals
  that share an entry, and adds the sums into a private row per key block (fused) or query
  block; the rows are summed after the launch (``bias_grad.py``). Bit-identical from run to run.
* **Head dims**: any multiple of 8 from 8 to 256, padded inside the kernel (masked loads and
  stores, no copies) to the next power of two, at least 16 (``tl.dot``'s minimum K). Why
  80 and 96 pad to 128 rather than split into 64+16 / 64+32 columns: a split needs two
  accumulators and two PV dots (plus two QK^T dots summed) per tile, which Triton compiles
  to two MMA chains with their own register tiles; the padded columns cost MMA issue slots
  (33-60% more tensor-core work on QK^T and PV) but no memory traffic, since the padding
  is masked at the load. The split trades those wasted MMA slots for more registers
  (which force smaller tiles without spills); which wins is a GPU measurement this
  project has not made yet (no GPU on the development machines), so the simpler padded
  kernel stays until ``benchmarks/bench_varlen_attention.py`` (which has D=80/96 rows) says
  otherwise.
* **Precision.** fp16/bf16 operands feed the tensor cores with fp32 accumulation; fp32
  uses IEEE fp32 dots on the CUDA cores (TF32 would miss fp32 accuracy), with small tiles.

Files
-----
* ``common.py`` — constants, the one interpreter switch (``INTERPRET``) and the ``@triton.jit``
  helpers every kernel shares (sequence bounds, masks, bias gather, interpreter-safe dot/cast);
* ``fwd.py`` — the forward kernel;
* ``bwd.py`` — the delta preprocess, the fused backward, and the dk/dv and dq kernels of the
  deterministic path;
* ``bias_grad.py`` — the bias gradient: in-tile diagonal reduction, private rows, scratch;
* ``configs.py`` — tile configs per head-dim tier, autotuning, the AOT report configs;
* ``op.py`` — input checks, launchers, the ``torch.library`` custom ops, the public entry.

The launcher checks only what it can without a host sync (ranks, dtypes, devices, head
dim, bias with cross-attention); the value checks (``cu_seqlens`` ends, LUT ranges) are
done by the callers :func:`omni_core.ops.varlen_attention` and :mod:`omni_core.compat`
before any launch.
"""

from omni_core.kernels.varlen_attention.common import DTYPES, INTERPRET, LN2, LOG2E, MAX_HEAD_DIM
from omni_core.kernels.varlen_attention.configs import aot_configs
from omni_core.kernels.varlen_attention.op import varlen_attention_triton

__all__ = ["DTYPES", "INTERPRET", "LN2", "LOG2E", "MAX_HEAD_DIM", "aot_configs", "varlen_attention_triton"]
