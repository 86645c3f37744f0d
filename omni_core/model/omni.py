"""``OmniModel``: ONE-PEACE-style adapters + a shared stack of pre-LN blocks over one
packed token stream + per-modality final norms and projection heads.

The model calls only :mod:`omni_core.ops` (through :mod:`omni_core.nn`); kernels are
chosen by dispatch. Presets run from ``tiny`` (a training step in about a second on
2 CPU cores) to ``one-peace-4b`` (instantiate it on ``device="meta"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from omni_core import ops
from omni_core.model.adapters import AudioAdapter, ImageAdapter, TextAdapter
from omni_core.model.relpos import beit_lut_2d, bucket_lut_1d, stack_luts
from omni_core.nn import ModalityLayerNorm, ModalityRoutedFFN, VarlenAttention

TEXT, IMAGE, AUDIO = 0, 1, 2
MODALITIES = ("text", "image", "audio")


@dataclass(frozen=True)
class OmniConfig:
    dim: int
    depth: int
    heads: int
    ffn_hidden: int
    embed_dim: int  # width of the contrastive projection heads
    vocab_size: int = 1000
    text_max_len: int = 72
    text_bucket: int = 16
    image_size: int = 64
    stem_channels: int = 64
    audio_front_end: str = "conv"
    audio_channels: int = 128
    audio_mel_downsample: int = 1  # stride-2 convs after the log-mel (mel front end only)
    audio_max_frames: int = 750  # 15 s at 50 frames/s
    audio_bucket: int = 32
    audio_pos_kernel: int = 31
    audio_pos_groups: int = 8
    geglu: bool = True
    sub_ln: bool = True
    layer_scale_init: float | None = 1e-6
    drop_path: float = 0.0
    init_std: float = 0.02


PRESETS: dict[str, OmniConfig] = {
    "tiny": OmniConfig(dim=192, depth=4, heads=3, ffn_hidden=384, embed_dim=128, vocab_size=1000,
                       image_size=64, stem_channels=48, audio_front_end="mel", audio_channels=128,
                       audio_mel_downsample=3, audio_pos_kernel=15, layer_scale_init=0.1),
    "small": OmniConfig(dim=384, depth=8, heads=6, ffn_hidden=1024, embed_dim=256, vocab_size=8000,
                        image_size=128, stem_channels=96, audio_channels=256, layer_scale_init=0.1),
    "base": OmniConfig(dim=768, depth=12, heads=12, ffn_hidden=2048, embed_dim=512, vocab_size=50000,
                       image_size=224, stem_channels=192, audio_channels=512, layer_scale_init=1e-5,
                       drop_path=0.1),
    "one-peace-4b": OmniConfig(dim=1536, depth=40, heads=24, ffn_hidden=6144, embed_dim=1536,
                               vocab_size=50000, image_size=256, stem_channels=384, audio_channels=512,
                               audio_pos_kernel=95, audio_pos_groups=16, layer_scale_init=1e-6,
                               drop_path=0.4),
}


@dataclass(frozen=True)
class SegmentRef:
    """One segment of a sequence: sample ``index`` of ``modality``; ``keep`` lists the
    positions a masked view keeps (CLS included), ``None`` keeps all."""

    modality: int
    index: int
    keep: torch.Tensor | None = None


@dataclass
class ModalInputs:
    text: list[torch.Tensor] = field(default_factory=list)  # token ids per caption (no CLS)
    image: torch.Tensor | None = None  # [N, 3, H, W]
    audio: list[torch.Tensor] = field(default_factory=list)  # 16 kHz waveforms


class Block(nn.Module):
    """Pre-LN block: shared attention (sub-LN, relative bias), modality-routed FFN."""

    def __init__(self, cfg: OmniConfig, bias_rows: int, drop_path: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = VarlenAttention(cfg.dim, cfg.heads, bias_rows, sub_ln=cfg.sub_ln)
        self.ffn_norm = ModalityLayerNorm(len(MODALITIES), cfg.dim)
        self.ffn = ModalityRoutedFFN(len(MODALITIES), cfg.dim, cfg.ffn_hidden, cfg.geglu, cfg.sub_ln,
                                     cfg.init_std)
        scale = cfg.layer_scale_init
        self.gamma_attn = nn.Parameter(torch.full((cfg.dim,), scale)) if scale else None
        self.gamma_ffn = nn.Parameter(torch.full((cfg.dim,), scale)) if scale else None
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, batch: ops.PackedBatch, bias_lut: torch.Tensor) -> torch.Tensor:
        h = self.attn(ops.layer_norm(x, self.attn_norm.weight, self.attn_norm.bias), batch, bias_lut)
        x = x + self._residual(h, self.gamma_attn, batch)
        h = self.ffn(self.ffn_norm(x, batch.modality), batch.modality)
        return x + self._residual(h, self.gamma_ffn, batch)

    def _residual(self, h: torch.Tensor, gamma: torch.Tensor | None, batch: ops.PackedBatch) -> torch.Tensor:
        if gamma is not None:
            h = h * gamma
        if not self.training or self.drop_path == 0.0:
            return h
        # Drop path per sequence (a sample), as in the padded original.
        keep = 1.0 - self.drop_path
        seq_mask = torch.bernoulli(torch.full((batch.num_sequences,), keep, device=h.device)) / keep
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        return h * seq_mask.repeat_interleave(lengths)[:, None].to(h.dtype)


class OmniModel(nn.Module):
    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = TextAdapter(cfg.vocab_size, cfg.dim, cfg.text_max_len)
        self.image = ImageAdapter(cfg.image_size, cfg.dim, cfg.stem_channels)
        self.audio = AudioAdapter(cfg.dim, cfg.audio_channels, cfg.audio_front_end, cfg.audio_pos_kernel,
                                  cfg.audio_pos_groups, cfg.audio_mel_downsample)
        grid = cfg.image_size // 16
        bias_lut, offsets = stack_luts([
            bucket_lut_1d(cfg.text_max_len + 1, cfg.text_bucket),
            beit_lut_2d(grid, grid),
            bucket_lut_1d(cfg.audio_max_frames + 1, cfg.audio_bucket),
        ])
        self.register_buffer("bias_lut", bias_lut, persistent=False)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, offsets[-1], r) for r in rates)
        self.final_norm = ModalityLayerNorm(len(MODALITIES), cfg.dim)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.embed_dim, bias=False) for _ in MODALITIES)
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    @classmethod
    def from_preset(cls, name: str, device: torch.device | str | None = None, **overrides) -> OmniModel:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        with torch.device(device or "cpu"):
            return cls(replace(PRESETS[name], **overrides))

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    # The three stages of a forward pass: embed each modality once, pack the views'
    # sequences into one stream, run the shared stack over it.
    def embed(self, inputs: ModalInputs) -> list[list[torch.Tensor]]:
        return [self.text(inputs.text), self.image(inputs.image), self.audio(inputs.audio)]

    def pack(self, embedded: list[list[torch.Tensor]], sequences: list[list[SegmentRef]]) -> ops.PackedBatch:
        segs = []
        for seq in sequences:
            row = []
            for ref in seq:
                tokens = embedded[ref.modality][ref.index]
                position = None
                if ref.keep is not None:
                    tokens, position = tokens[ref.keep], ref.keep.to(torch.int32)
                row.append(ops.Segment(ref.modality, tokens, position))
            segs.append(row)
        return ops.PackedBatch.from_segments(segs, num_modalities=len(MODALITIES))

    def encode(self, batch: ops.PackedBatch) -> torch.Tensor:
        x = batch.x
        for block in self.blocks:
            x = block(x, batch, self.bias_lut)
        return self.final_norm(x, batch.modality)

    def forward(self, inputs: ModalInputs, sequences: list[list[SegmentRef]]) -> tuple[torch.Tensor, ops.PackedBatch]:
        batch = self.pack(self.embed(inputs), sequences)
        return self.encode(batch), batch

    def project(self, cls_features: torch.Tensor, modality: int) -> torch.Tensor:
        """CLS features → the modality's projection → L2-normalised embedding."""
        return F.normalize(self.heads[modality](cls_features), dim=-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
