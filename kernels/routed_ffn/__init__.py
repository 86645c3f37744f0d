"""
Modality-routed FFN as grouped GEMMs
====================================

Implements ``omni_core.ops.routed_ffn`` (see ``omni_core/ops/ffn.py`` for the contract): token
``t`` of modality ``m`` goes through FFN ``m``::

    u = x @ w_in[m] + b_in[m]
    h = gelu(x @ w_gate[m]) * u          (GeGLU, ONE-PEACE)    or    h = gelu(u)
    h = layer_norm(h) * ln_weight[m] + ln_bias[m]               (optional sub-LN over F)
    y = h @ w_out[m] + b_out[m]

The routing plan groups tokens stably by modality: ``perm[r]`` is the packed index of the
r-th grouped row and ``offsets[m]:offsets[m+1]`` are modality m's grouped rows. Nothing is
ever copied into grouped order: GEMMs *gather* their A rows and *scatter* their output rows
through ``perm``, so the hidden activations are the only tensors that live in grouped order.
Each GEMM is ONE launch for all modalities; each program finds its modality, rows and
column tile from the device-side offsets (``fwd.raster``): no host sync, no host schedule.

Files:

* ``fwd.py`` — GEMM-1 with the GeGLU / GELU epilogue and the sub-LN statistics, and the
  grouped GEMM (LayerNorm applied in its loads) that the forward and backward share;
* ``bwd.py`` — the fused hidden backward (LN + GeGLU) and the grouped weight gradients;
* ``configs.py`` — A100 and H100 tile configs, autotuning, the launch helper, AOT configs;
* ``op.py`` — launchers, the ``torch.library`` custom ops and the public entry points.

What the backward keeps, and why. Saved: the GEMM-1 outputs ``U`` and ``G`` (pre-activation,
``[T, F]`` each in the input dtype) and the LN statistics ``mean``/``rstd`` (fp32, 8 bytes a
token). Recomputed: ``H = act(U, G)`` and ``HN = LN(H)``, elementwise, inside the fused
backward kernel that also runs the LN and GeGLU backward. Re-deriving U and G would cost a
second GEMM-1 (``4 T D F`` FLOPs, two thirds of the forward) to save ``2 T F`` elements;
re-deriving H and HN costs a few FLOPs per element on data the backward kernel loads anyway.

``[T, F]`` passes (ONE-PEACE's GeGLU + sub-LN): the forward writes U, G, H and reads H once
(GEMM-2 normalises it in its loads: no LayerNorm pass, HN never stored); the backward writes
dHN, reads U, G, dHN in the hidden kernel (twice: two sweeps, the second from L2 where the
program's rows fit), writes HN, dU, dG, and the GEMMs read HN, dU, dG (dU and dG twice: dx
and the paired weight gradient). Autograd zero-fills nothing (``set_materialize_grads(False)``).

Precision: every GEMM accumulates in fp32; U, G, H, HN, dU, dG are rounded to the input
dtype between steps, as the same-precision torch implementation rounds them. fp32 GEMMs use
``input_precision="ieee"`` (no TF32) so fp32 matches a fp32 reference. Under the interpreter
half-precision tiles are upcast to fp32 before ``tl.dot`` (its bf16 dot is wrong) and bf16
stores round to nearest even explicitly (its cast truncates); both are constexpr branches that
compiled code never sees.
"""

from omni_core.kernels.routed_ffn.configs import aot_configs
from omni_core.kernels.routed_ffn.op import group_by_modality, routed_ffn_grouped, routed_ffn_triton

__all__ = ["aot_configs", "group_by_modality", "routed_ffn_grouped", "routed_ffn_triton"]
