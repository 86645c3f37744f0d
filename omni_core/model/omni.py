"""``OmniModel``: ONE-PEACE-style adapters + a shared stack of pre-LN blocks over one
packed token stream + per-modality final norms and projection heads.

The model calls only :mod:`omni_core.ops` (through :mod:`omni_core.nn`); kernels are
chosen by dispatch. Presets run from ``tiny`` (a training step in about a second on
2 CPU cores) to ``one-peace-4b`` (instantiate it on ``device="meta"``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from omni_core import ops
from omni_core.model.adapters import ONE_PEACE_AUDIO_CONVS, AudioAdapter, ImageAdapter, TextAdapter
from omni_core.model.relpos import (
    MAX_POSITION,
    beit_lut_2d,
    bucket_lut_1d,
    grid_positions,
    stack_cls_relative,
    stack_luts,
)
from omni_core.nn import ModalityLayerNorm, ModalityRoutedFFN, VarlenAttention
from omni_core.ops.attention import backend_implements

TEXT, IMAGE, AUDIO = 0, 1, 2
MODALITIES = ("text", "image", "audio")


@dataclass(frozen=True)
class OmniConfig:
    """Architecture of an :class:`OmniModel` (ONE-PEACE's, at any size)."""

    dim: int
    depth: int
    heads: int
    ffn_hidden: int
    embed_dim: int  # width of the contrastive projection heads (ONE-PEACE: = dim)
    vocab_size: int = 1000
    text_positions: int = 72  # rows of the text position table: CLS + up to 70 ids + EOS
    text_bucket: int = 16
    image_size: int = 64
    stem_channels: int = 64
    audio_front_end: str = "conv"
    audio_channels: int = 128
    audio_conv_layers: tuple[tuple[int, int], ...] = ONE_PEACE_AUDIO_CONVS  # (kernel, stride), conv only
    audio_mel_downsample: int = 1  # stride-2 convs after the log-mel (mel front end only)
    audio_max_frames: int = 750  # 15 s at 50 frames/s
    audio_bucket: int = 32
    audio_pos_depth: int = 5  # positional conv stack: depth blocks of kernel max(3, width // depth)
    audio_pos_width: int = 95
    audio_pos_groups: int = 16
    geglu: bool = True
    sub_ln: bool = True
    layer_scale_init: float | None = 1e-6
    drop_path: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # A config read back from JSON carries lists; keep the conv spec hashable and comparable.
        object.__setattr__(self, "audio_conv_layers", tuple(tuple(layer) for layer in self.audio_conv_layers))
        longest = max(self.text_positions, (self.image_size // 16) ** 2 + 1, self.audio_max_frames + 1)
        if longest > MAX_POSITION:
            raise ValueError(f"a modality segment of {longest} positions exceeds the {MAX_POSITION} "
                             f"positions of the relative-position buckets")


PRESETS: dict[str, OmniConfig] = {
    "tiny": OmniConfig(dim=192, depth=4, heads=3, ffn_hidden=384, embed_dim=128, vocab_size=1000,
                       image_size=64, stem_channels=48, audio_front_end="mel", audio_channels=128,
                       audio_mel_downsample=3, audio_pos_depth=2, audio_pos_width=30, audio_pos_groups=8,
                       layer_scale_init=0.1),
    "small": OmniConfig(dim=384, depth=8, heads=6, ffn_hidden=1024, embed_dim=256, vocab_size=8000,
                        image_size=128, stem_channels=96, audio_channels=256, audio_pos_groups=8,
                        layer_scale_init=0.1),
    "base": OmniConfig(dim=768, depth=12, heads=12, ffn_hidden=2048, embed_dim=512, vocab_size=50000,
                       image_size=224, stem_channels=192, audio_channels=512, layer_scale_init=1e-5,
                       drop_path=0.1),
    # ONE-PEACE's released model (finetune_3B.yaml; /work/shared/ONE-PEACE.md): load_one_peace
    # reproduces this config from the released checkpoint.
    "one-peace-4b": OmniConfig(dim=1536, depth=40, heads=24, ffn_hidden=6144, embed_dim=1536,
                               vocab_size=50264, text_positions=514, text_bucket=256, image_size=256,
                               stem_channels=384, audio_channels=512, audio_bucket=512, audio_pos_depth=5,
                               audio_pos_width=95, audio_pos_groups=16, layer_scale_init=1e-6,
                               drop_path=0.4),
    # The released architecture at a width that runs on a laptop (tests, smoke runs).
    "one-peace-tiny": OmniConfig(dim=64, depth=2, heads=4, ffn_hidden=128, embed_dim=64, vocab_size=1000,
                                 text_positions=72, text_bucket=16, image_size=64, stem_channels=16,
                                 audio_channels=32, audio_bucket=32, audio_pos_depth=2, audio_pos_width=10,
                                 audio_pos_groups=4, layer_scale_init=0.1),
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
    """ONE-PEACE's pre-LN layer: shared attention (sub-LN, relative bias from the caller's
    table), one shared pre-FFN LayerNorm, the modality-routed GeGLU FFN, layer scale."""

    def __init__(self, cfg: OmniConfig, drop_path: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = VarlenAttention(cfg.dim, cfg.heads, sub_ln=cfg.sub_ln)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.ffn = ModalityRoutedFFN(len(MODALITIES), cfg.dim, cfg.ffn_hidden, cfg.geglu, cfg.sub_ln,
                                     cfg.init_std)
        scale = cfg.layer_scale_init
        self.gamma_attn = nn.Parameter(torch.full((cfg.dim,), scale)) if scale else None
        self.gamma_ffn = nn.Parameter(torch.full((cfg.dim,), scale)) if scale else None
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, batch: ops.PackedBatch, bias_lut: torch.Tensor,
                bias_table: torch.Tensor) -> torch.Tensor:
        h = self.attn(_ln(x, self.attn_norm), batch, bias_lut, bias_table)
        x = x + self._residual(h, self.gamma_attn, batch)
        h = self.ffn(_ln(x, self.ffn_norm), batch.modality)
        return x + self._residual(h, self.gamma_ffn, batch)

    def _residual(self, h: torch.Tensor, gamma: torch.Tensor | None, batch: ops.PackedBatch) -> torch.Tensor:
        if gamma is not None:
            h = h * gamma  # layer scale multiplies the branch, not the sum
        if not self.training or self.drop_path == 0.0:
            return h
        # Drop path per sequence (a sample), as in the padded original.
        keep = 1.0 - self.drop_path
        seq_mask = torch.bernoulli(torch.full((batch.num_sequences,), keep, device=h.device)) / keep
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        return h * seq_mask.repeat_interleave(lengths)[:, None].to(h.dtype)


def _ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)


class OmniModel(nn.Module):
    """ONE-PEACE's encoder over one packed token stream.

    ``embed`` runs the adapters once per sample; ``pack`` lays the views' segments out as one
    stream (a masked view's kept tokens keep their original positions; audio segments get
    their positional convolution here, over the frames they keep); ``encode`` runs the stack
    and the per-modality final norms; ``project`` maps CLS features to embeddings.
    ``embed_texts`` / ``embed_images`` / ``embed_audio`` are ONE-PEACE's feature-extraction API.
    """

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = TextAdapter(cfg.vocab_size, cfg.dim, cfg.text_positions, cfg.heads, cfg.text_bucket)
        self.image = ImageAdapter(cfg.image_size, cfg.dim, cfg.stem_channels, cfg.heads)
        self.audio = AudioAdapter(cfg.dim, cfg.heads, cfg.audio_bucket, cfg.audio_channels, cfg.audio_front_end,
                                  cfg.audio_conv_layers, cfg.audio_pos_depth, cfg.audio_pos_width,
                                  cfg.audio_pos_groups, cfg.audio_mel_downsample, cfg.audio_max_frames)
        self.register_buffer("bias_lut", bias_lut(cfg), persistent=False)
        self.register_buffer("bias_lut_compact", bias_lut_compact(cfg), persistent=False)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.final_norm = ModalityLayerNorm(len(MODALITIES), cfg.dim)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.embed_dim) for _ in MODALITIES)
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    @classmethod
    def from_preset(cls, name: str, device: torch.device | str | None = None, **overrides) -> OmniModel:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        with torch.device(device or "cpu"):
            return cls(replace(PRESETS[name], **overrides))

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def rebuild_buffers(self) -> None:
        """Recompute the non-persistent buffers (bias LUT, mel filters) on the parameters'
        device: for a model built on ``meta`` whose weights were then assigned."""
        device = self.logit_scale.device
        self.bias_lut = bias_lut(self.cfg).to(device)
        self.bias_lut_compact = bias_lut_compact(self.cfg).to(device)
        self.audio.rebuild_buffers(device)

    def bias_table(self) -> torch.Tensor:
        """``[NB, H]``: the text, image and audio relative-position tables, concatenated (the
        rows ``bias_lut`` indexes); built once per pass and shared by every layer."""
        return torch.cat([self.text.bias_table, self.image.bias_table, self.audio.bias_table])

    # The three stages of a forward pass: embed each modality once, pack the views'
    # sequences into one stream, run the shared stack over it.
    def embed(self, inputs: ModalInputs) -> list[list[torch.Tensor]]:
        """Per modality, per sample: text and image tokens ``[L, D]`` (CLS first, positions
        added); audio ``[cls; f]`` WITHOUT positions (``pack`` adds them per segment)."""
        return [self.text(inputs.text), self.image(inputs.image), self.audio(inputs.audio)]

    def segment_tokens(self, embedded: list[list[torch.Tensor]],
                       refs: list[SegmentRef]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(tokens, positions or None)`` of each segment, as ``pack`` lays them out.

        Text/image: the kept rows of the embedded tokens. Audio: CLS + ``cls_pos`` and the kept
        frames plus the positional stack run over those kept frames alone (ONE-PEACE's masked
        view; all frames when unmasked). ``keep`` lists original positions, CLS (0) included
        and, for audio, first and sorted. All audio segments run the stack in one batched call.
        """
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        audio_at, audio_raw = [], []
        for k, ref in enumerate(refs):
            tokens, position = embedded[ref.modality][ref.index], None
            if ref.keep is not None:
                keep = ref.keep.to(device=tokens.device, dtype=torch.long)
                if ref.modality == AUDIO and (keep.numel() == 0 or int(keep[0]) != 0
                                              or bool((keep[1:] <= keep[:-1]).any())):
                    raise ValueError(f"audio segment {ref.index}: keep must start with 0 (CLS) and "
                                     f"increase strictly, got {keep.tolist()}")
                tokens, position = tokens.index_select(0, keep), keep.to(torch.int32)
            if ref.modality == AUDIO:
                audio_at.append(k)
                audio_raw.append(tokens)
            out.append((tokens, position))
        for k, tokens in zip(audio_at, self.audio.add_positions(audio_raw)):
            out[k] = (tokens, out[k][1])
        return out

    def pack(self, embedded: list[list[torch.Tensor]], sequences: list[list[SegmentRef]]) -> ops.PackedBatch:
        flat = [ref for seq in sequences for ref in seq]
        segments = iter(self.segment_tokens(embedded, flat))
        rows = [[ops.Segment(ref.modality, *next(segments)) for ref in seq] for seq in sequences]
        return ops.PackedBatch.from_segments(rows, num_modalities=len(MODALITIES))

    def encode(self, batch: ops.PackedBatch) -> torch.Tensor:
        """The stack over a packed batch. Where the attention backend takes it, the bias is
        read through the compact LUT (:func:`bias_lut_compact`, image positions respaced):
        the same entries as ``bias_lut``, O(P) instead of O(P^2) bytes to gather."""
        x, table = batch.x, self.bias_table()
        attn_batch, lut = batch, self.bias_lut
        if backend_implements("relative_lut", x.device):
            spaced = grid_positions(batch.position, self.cfg.image_size // 16)
            attn_batch = replace(batch, position=torch.where(batch.modality == IMAGE, spaced, batch.position))
            lut = self.bias_lut_compact
        for block in self.blocks:
            x = block(x, attn_batch, lut, table)
        return self.final_norm(x, batch.modality)

    def forward(self, inputs: ModalInputs, sequences: list[list[SegmentRef]]) -> tuple[torch.Tensor, ops.PackedBatch]:
        batch = self.pack(self.embed(inputs), sequences)
        return self.encode(batch), batch

    def project(self, cls_features: torch.Tensor, modality: int) -> torch.Tensor:
        """CLS features → the modality's projection (with bias) → L2-normalised embedding."""
        return F.normalize(self.heads[modality](cls_features), dim=-1)

    # ONE-PEACE's feature-extraction API: one packed pass per call, eval mode, no gradients.
    def embed_texts(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """``[N, E]`` embeddings of captions given as 1-D BPE ids ending with EOS (no BOS; the
        model adds CLS)."""
        return self._embed_unimodal(TEXT, ModalInputs(text=[t.flatten().long() for t in ids]), len(ids))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` embeddings of ``[N, 3, H, W]`` images normalised with CLIP's mean/std."""
        return self._embed_unimodal(IMAGE, ModalInputs(image=images), images.shape[0])

    def embed_audio(self, waveforms: list[torch.Tensor]) -> torch.Tensor:
        """``[N, E]`` embeddings of raw 1-D 16 kHz waveforms, each prepared as ONE-PEACE's hub
        does (:func:`prepare_waveform`). Each clip gets the embedding it has alone."""
        waves = [prepare_waveform(w) for w in waveforms]
        return self._embed_unimodal(AUDIO, ModalInputs(audio=waves), len(waves))

    @torch.no_grad()
    def _embed_unimodal(self, modality: int, inputs: ModalInputs, n: int) -> torch.Tensor:
        if n == 0:
            return torch.empty(0, self.cfg.embed_dim)
        was_training = self.training
        self.eval()
        try:
            features, batch = self(inputs, [[SegmentRef(modality, i)] for i in range(n)])
        finally:
            self.train(was_training)
        return self.project(features[batch.cu_seqlens[:-1].long()], modality)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def bias_lut(cfg: OmniConfig) -> torch.Tensor:
    """``[3, P, P]`` LUT into :meth:`OmniModel.bias_table` (text, image, audio rows in that order)."""
    grid = cfg.image_size // 16
    lut, _ = stack_luts([bucket_lut_1d(cfg.text_positions, cfg.text_bucket), beit_lut_2d(grid, grid),
                         bucket_lut_1d(cfg.audio_max_frames + 1, cfg.audio_bucket)])
    return lut


def bias_lut_compact(cfg: OmniConfig) -> torch.Tensor:
    """The CLS-aware compact ``[3, 2P+2]`` form of :func:`bias_lut`, with image positions read
    through :func:`~omni_core.model.relpos.grid_positions`: O(P) where the dense LUT is O(P^2)."""
    grid = cfg.image_size // 16
    device = torch.get_default_device()  # meta for a model built on meta; the checks need values
    with torch.device("cpu"):
        lut, _ = stack_cls_relative([bucket_lut_1d(cfg.text_positions, cfg.text_bucket), beit_lut_2d(grid, grid),
                                     bucket_lut_1d(cfg.audio_max_frames + 1, cfg.audio_bucket)],
                                    [None, grid, None])
    return lut.to(device)


def prepare_waveform(wave: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """ONE-PEACE's hub audio pre-processing: LayerNorm over the whole clip (no affine, eps
    1e-5), keep the first 15 s, tile a clip shorter than 1 s up to exactly 1 s."""
    wave = wave.flatten()
    if not wave.dtype.is_floating_point:
        raise TypeError(f"waveforms must be floating point, got {wave.dtype}")
    if wave.numel() == 0:
        raise ValueError("an audio waveform is empty")
    wave = F.layer_norm(wave, wave.shape)
    wave = wave[: 15 * sample_rate]
    if wave.numel() < sample_rate:
        wave = wave.repeat(math.ceil(sample_rate / wave.numel()))[:sample_rate]
    return wave
