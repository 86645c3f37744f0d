"""``omni model plan``: per-GPU memory of a training run, and the largest token budget that fits.

Parameter counts come from the preset built on the meta device (no memory, no hard-coded
sizes). Memory per GPU, for AdamW (fp32 moments) and G GPUs:

* ``fsdp`` (FSDP2, bf16 params / fp32 reduce): fp32 parameter shards 4P/G, fp32 gradient shards
  4P/G, AdamW moments 8P/G, plus the unsharded bf16 working copies: the root's parameters
  (adapters, heads; kept through forward and backward) and two blocks at a time (the running one
  and the prefetched one), with one block's unsharded bf16 gradients.
* ``ddp``: a full fp32 replica (4P), fp32 gradients (4P) and DDP's gradient buckets (4P), AdamW
  8P, and autocast's bf16 weight copies (2P).

Activations per token, counted from what autograd keeps for backward in this model's block
(pre-LN attention with sub-LN and layer scale, modality-routed GeGLU FFN with sub-LN; the fused
attention keeps q, k, v, out and the log-sum-exp, O(T)): 11·D + 5·F elements per layer, plus the
image stem (the 16×16 input pixels and the hMLP stem's conv/LN/GELU maps, 768 + 60·C per image
token), one block's backward temporaries (2·F + 2·D) and the final norm (D). With activation
checkpointing each layer keeps only its input (D) and one block is rebuilt at a time. The token
mix defaults to image–text pairs (stage 1: ``text_tokens`` per caption and one image each).
Activations are bf16 on GPU (2 bytes) and fp32 on CPU (4 bytes, as the CPU check measures).

Backward also builds each routed FFN weight's gradient per modality and stacks it (two
weight-sized temporaries at the start of backward), and the text embedding's gradient densely
(vocab × D) before adding it to the gradient buffer, at the end of backward, when only the
adapters' activations are still alive: token-independent transients. The plan counts them with
the gradients, on top of the activations (conservative; under a GiB for one-peace-4b); the CPU
check uses the peak as it happens: max(activations + FFN weight gradients, embedding gradient +
image-stem activations). The backward-temporary term was fitted on three measurements (the
calibration set: ``tiny`` 8 pairs with and without checkpointing, ``small`` 2 pairs); the test
checks the estimate against those and against held-out shapes never used to fit it (other
widths, depths, image sizes, caption lengths and token counts; measured 0.89-1.24 of the peak).

A fixed share of each GPU (``reserve``, default 10 %) is left for the CUDA context, NCCL buffers,
kernel workspaces and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from omni_core.model.omni import PRESETS, OmniModel

GiB = 1024**3


@dataclass(frozen=True)
class Plan:
    preset: str
    gpus: int
    gpu_mem_gib: float
    dist: str
    checkpoint_activations: bool
    parameters: int
    tokens_per_gpu: int
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    activation_bytes_per_token: float
    reserve_bytes: float
    total_bytes: float
    fits: bool
    max_tokens_per_gpu: int

    def table(self) -> str:
        rows = [("parameters", self.param_bytes), ("gradients", self.grad_bytes),
                ("optimizer (AdamW fp32)", self.optimizer_bytes),
                (f"activations ({self.tokens_per_gpu:,} tokens)", self.activation_bytes),
                ("reserve (context, workspace, fragmentation)", self.reserve_bytes),
                ("total", self.total_bytes)]
        head = (f"{self.preset}: {self.parameters:,} parameters ({self.parameters / 1e9:.2f} B) on {self.gpus} x "
                f"{self.gpu_mem_gib:g} GiB, {self.dist}"
                f"{', activation checkpointing' if self.checkpoint_activations else ''}")
        lines = [head, "per GPU:"] + [f"  {name:<46}{b / GiB:9.2f} GiB" for name, b in rows]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  -> {verdict}; activations {self.activation_bytes_per_token / 1024:.1f} KiB/token; "
                     f"largest token budget that fits: {self.max_tokens_per_gpu:,} tokens per GPU")
        return "\n".join(lines)


def token_mix(preset: str, text_tokens: int = 24) -> float:
    """Fraction of image tokens in an image–text step (stage 1): per pair, a caption of
    ``text_tokens`` + CLS and an image of (size/16)² patches + CLS."""
    cfg = PRESETS[preset]
    image = (cfg.image_size // 16) ** 2 + 1
    return image / (image + text_tokens + 1)


def activation_elements_per_token(preset: str, checkpoint_activations: bool, image_fraction: float) -> float:
    """Elements autograd keeps per token of an image–text step at the peak (start of backward)."""
    cfg = PRESETS[preset]
    D, F, L = cfg.dim, cfg.ffn_hidden, cfg.depth
    block = 11 * D + 5 * F + cfg.heads  # + log-sum-exp per head
    stem = stem_elements(cfg.stem_channels)
    backward_temps = 2 * F + 2 * D
    layers = L * D + block if checkpoint_activations else L * block
    return layers + backward_temps + D + image_fraction * stem


def stem_elements(stem_channels: int) -> int:
    """Per image token: its 16×16×3 pixels (kept by conv1), 16 positions × C after conv1, LN and
    GELU, 4 positions × C after conv2, LN and GELU."""
    return 16 * 16 * 3 + (3 * 16 + 3 * 4) * stem_channels


def ffn_weight_grad_elements(preset: str) -> int:
    """The routed FFN builds each weight's gradient per modality and stacks it: the per-modality
    pieces and the stacked [M, D, F] tensor are alive together before it joins the buffer."""
    cfg = PRESETS[preset]
    return 2 * 3 * cfg.dim * cfg.ffn_hidden


def embedding_grad_elements(preset: str) -> int:
    cfg = PRESETS[preset]
    return cfg.vocab_size * cfg.dim


def split_parameters(model: OmniModel) -> tuple[int, int, int]:
    """(all, in one block (the largest), outside the blocks)."""
    total = model.num_parameters()
    per_block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    in_blocks = sum(p.numel() for b in model.blocks for p in b.parameters())
    return total, per_block, total - in_blocks


def plan(preset: str, gpus: int, gpu_mem_gib: float, tokens_per_gpu: int | None = None, dist: str = "fsdp",
         checkpoint_activations: bool = False, text_tokens: int = 24, reserve: float = 0.10) -> Plan:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if gpus < 1 or gpu_mem_gib <= 0 or not 0 <= reserve < 1:
        raise ValueError("need --gpus >= 1, --gpu-mem > 0 and 0 <= reserve < 1")
    if dist not in ("fsdp", "ddp"):
        raise ValueError(f"--dist must be fsdp or ddp, got {dist!r}")
    P, P_block, P_root = split_parameters(OmniModel.from_preset(preset, device="meta"))
    embedding_grad = 2 * (embedding_grad_elements(preset) + ffn_weight_grad_elements(preset))
    if dist == "fsdp":
        params = 4 * P / gpus + 2 * P_root + 2 * 2 * P_block
        grads = 4 * P / gpus + 2 * P_block + embedding_grad
    else:
        params = 4 * P + 2 * P
        grads = 4 * P + 4 * P + embedding_grad
    optimizer = 8 * P / (gpus if dist == "fsdp" else 1)
    per_token = 2 * activation_elements_per_token(preset, checkpoint_activations, token_mix(preset, text_tokens))
    capacity = gpu_mem_gib * GiB
    reserved = reserve * capacity
    free = capacity - reserved - params - grads - optimizer
    max_tokens = max(0, int(free // per_token))
    tokens = max_tokens if tokens_per_gpu is None else tokens_per_gpu
    total = params + grads + optimizer + tokens * per_token + reserved
    return Plan(preset, gpus, gpu_mem_gib, dist, checkpoint_activations, P, tokens, params, grads, optimizer,
                tokens * per_token, per_token, reserved, total, total <= capacity, max_tokens)


# ---------------------------------------------------------------- the CPU check
def cpu_activation_estimate(preset: str, tokens: int, image_fraction: float, checkpoint_activations: bool,
                            **overrides) -> float:
    """Bytes the estimate predicts a fp32 CPU step allocates beyond its parameters and gradient
    buffers: activations plus the dense embedding-gradient transient (the check below)."""
    cfg = PRESETS[preset].__class__(**{**asdict(PRESETS[preset]), **overrides})
    PRESETS["_check"] = cfg
    try:
        activations = (tokens * activation_elements_per_token("_check", checkpoint_activations, image_fraction)
                       + ffn_weight_grad_elements("_check"))
        at_the_end = embedding_grad_elements("_check") + tokens * image_fraction * stem_elements(cfg.stem_channels)
        return 4 * max(activations, at_the_end)
    finally:
        del PRESETS["_check"]


def measured_activation_peak(preset: str, pairs: int, text_tokens: int = 24, checkpoint_activations: bool = False,
                             **overrides) -> tuple[float, int, float]:
    """(peak bytes allocated during one fp32 forward + backward of an image–text step on CPU,
    tokens, image fraction). Measured with torch.profiler's memory tracking ("Total Allocated"
    of the allocation events recorded while profiling, relative to the start), after a warm-up
    step so gradient buffers already exist."""
    import json as _json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from omni_core.model.omni import IMAGE, TEXT, ModalInputs, SegmentRef
    from omni_core.train.dist import checkpoint_blocks

    torch.manual_seed(0)
    model = OmniModel.from_preset(preset, **overrides)
    if checkpoint_activations:
        checkpoint_blocks(model.blocks)
    size = model.cfg.image_size
    inputs = ModalInputs(text=[torch.randint(0, model.cfg.vocab_size - 1, (text_tokens,)) for _ in range(pairs)],
                         image=torch.randn(pairs, 3, size, size), audio=[])
    sequences = [[SegmentRef(m, i)] for m in (TEXT, IMAGE) for i in range(pairs)]

    def step() -> None:
        feats, batch = model(inputs, sequences)
        cls = feats[batch.cu_seqlens[:-1].long()]
        t, i = model.project(cls[:pairs], TEXT), model.project(cls[pairs:], IMAGE)
        (model.logit_scale.exp() * t @ i.t()).logsumexp(-1).mean().backward()

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = _json.load(open(f.name))["traceEvents"]
    peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    image = (size // 16) ** 2 + 1
    tokens = pairs * (image + text_tokens + 1)
    return float(peak), tokens, image / (image + text_tokens + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni model plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB")
    p.add_argument("--tokens-per-gpu", type=int, help="token budget of a step per GPU (default: the largest that fits)")
    p.add_argument("--dist", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("--text-tokens", type=int, default=24, help="average caption length (token mix)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    result = plan(a.preset, a.gpus, a.gpu_mem, a.tokens_per_gpu, a.dist, a.checkpoint_activations, a.text_tokens)
    print(json.dumps(asdict(result), indent=2) if a.json else result.table())
    return 0
