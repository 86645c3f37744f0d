"""Modality adapters: raw inputs → per-sample token embeddings ``[L, D]`` (CLS first).

Each adapter works on a whole batch of its modality at once and returns one tensor per
sample, so a sample embedded once can appear in several views of a step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni_core import ops


class TextAdapter(nn.Module):
    """Token embedding, a learned CLS and learned absolute positions."""

    def __init__(self, vocab_size: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.cls = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(torch.randn(max_len + 1, dim) * 0.02)
        nn.init.normal_(self.embed.weight, std=0.02)

    def num_tokens(self, ids: torch.Tensor) -> int:
        return ids.numel() + 1

    def forward(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        if not ids:
            return []
        flat = torch.cat(ids)
        if flat.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"text token ids must be int32/int64, got {flat.dtype}")
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
            raise ValueError(f"text token ids must lie in [0, {self.vocab_size}), "
                             f"got min {int(flat.min())} max {int(flat.max())}")
        longest = max(t.numel() for t in ids)
        if longest > self.max_len:
            raise ValueError(f"a caption has {longest} tokens; this model takes at most {self.max_len}")
        tokens = self.embed(flat).split([t.numel() for t in ids])
        return [torch.cat([self.cls[None], tok]) + self.pos[: tok.shape[0] + 1] for tok in tokens]


class ImageAdapter(nn.Module):
    """hMLP stem (conv 4/4 → LN → GELU → conv 2/2 → LN → GELU → conv 2/2: 16-pixel
    patches), a learned CLS and learned absolute positions."""

    def __init__(self, image_size: int, dim: int, stem_channels: int) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (the patch size), got {image_size}")
        self.image_size = image_size
        self.grid = image_size // 16
        c = stem_channels
        self.conv1 = nn.Conv2d(3, c, 4, stride=4)
        self.norm1 = nn.LayerNorm(c)
        self.conv2 = nn.Conv2d(c, c, 2, stride=2)
        self.norm2 = nn.LayerNorm(c)
        self.conv3 = nn.Conv2d(c, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(torch.randn(self.grid**2 + 1, dim) * 0.02)

    @staticmethod
    def _channel_ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        x = ops.layer_norm(x.permute(0, 2, 3, 1), norm.weight, norm.bias, norm.eps)
        return x.permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor | None) -> list[torch.Tensor]:
        if images is None or images.shape[0] == 0:
            return []
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [N, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
        x = F.gelu(self._channel_ln(self.conv1(images), self.norm1))
        x = F.gelu(self._channel_ln(self.conv2(x), self.norm2))
        x = self.conv3(x).flatten(2).transpose(1, 2)  # [N, grid*grid, D]
        cls = self.cls.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        return list(x.unbind(0))


class AudioAdapter(nn.Module):
    """Audio front end on 16 kHz waveforms → 50 frames/s, LN + Linear, a convolutional
    positional embedding, and a learned CLS.

    ``front_end="conv"`` is ONE-PEACE's wav2vec2-style extractor on the raw waveform
    (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2: stride 320). ``front_end="mel"`` is a
    64-bin log-mel spectrogram (25 ms window, 10 ms hop) followed by ``mel_downsample``
    stride-2 convs (1: 50 frames/s as ONE-PEACE; 3: 12.5 frames/s, 4x fewer audio tokens).
    Per-frame LayerNorms (no norm across time) and zeroed padding frames make a padded
    batch give exactly the per-clip result, so clips of any length batch together.
    """

    CONV_LAYERS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))
    SAMPLE_RATE, N_MELS, WIN, HOP = 16000, 64, 400, 160

    def __init__(self, dim: int, channels: int, front_end: str = "conv", pos_kernel: int = 31,
                 pos_groups: int = 8, mel_downsample: int = 1) -> None:
        super().__init__()
        if front_end not in ("conv", "mel"):
            raise ValueError(f"front_end must be 'conv' or 'mel', got {front_end!r}")
        self.front_end = front_end
        if front_end == "conv":
            layers = self.CONV_LAYERS
            in_ch = [1] + [channels] * (len(layers) - 1)
            self.convs = nn.ModuleList(nn.Conv1d(i, channels, k, stride=s, bias=False)
                                       for i, (k, s) in zip(in_ch, layers))
            self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in layers)
        else:
            self.register_buffer("mel_fb", mel_filterbank(self.N_MELS, self.WIN, self.SAMPLE_RATE),
                                 persistent=False)
            self.register_buffer("window", torch.hann_window(self.WIN, periodic=True), persistent=False)
            in_ch = [self.N_MELS] + [channels] * (mel_downsample - 1)
            self.convs = nn.ModuleList(nn.Conv1d(i, channels, 3, stride=2) for i in in_ch)
            self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in in_ch)
        self.proj_norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, dim)
        self.pos_conv = nn.Conv1d(dim, dim, pos_kernel, padding=pos_kernel // 2, groups=pos_groups)
        self.cls = nn.Parameter(torch.zeros(dim))

    def num_frames(self, num_samples: int) -> int:
        """Frames (without CLS) produced for a clip of ``num_samples`` samples."""
        n = num_samples
        if self.front_end == "conv":
            for k, s in self.CONV_LAYERS:
                n = (n - k) // s + 1
        else:
            n = (n - self.WIN) // self.HOP + 1
            for _ in self.convs:
                n = (n - 3) // 2 + 1
        return max(n, 0)

    def features(self, padded: torch.Tensor) -> torch.Tensor:
        """``[N, S]`` waveforms → ``[N, frames, C]`` front-end features."""
        if self.front_end == "conv":
            x = padded[:, None]
        else:
            frames = padded.unfold(1, self.WIN, self.HOP) * self.window  # no centre padding
            power = torch.fft.rfft(frames, dim=-1).abs() ** 2
            x = torch.log(power @ self.mel_fb + 1e-6).transpose(1, 2)
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x).transpose(1, 2)
            x = F.gelu(ops.layer_norm(x, norm.weight, norm.bias, norm.eps)).transpose(1, 2)
        return x.transpose(1, 2)

    def forward(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        if not waves:
            return []
        lengths = [self.num_frames(w.numel()) for w in waves]
        short = [i for i, n in enumerate(lengths) if n < 1]
        if short:
            raise ValueError(f"audio clips {short} are too short to give one frame "
                             f"(need at least {self.min_samples()} samples)")
        padded = nn.utils.rnn.pad_sequence([w.float().flatten() for w in waves], batch_first=True)
        feats = self.features(padded)
        x = self.proj(ops.layer_norm(feats, self.proj_norm.weight, self.proj_norm.bias, self.proj_norm.eps))
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        x = x * valid[..., None]  # padding frames must not leak into the positional conv
        x = x + F.gelu(self.pos_conv(x.transpose(1, 2)).transpose(1, 2))
        return [torch.cat([self.cls[None], x[i, :n]]) for i, n in enumerate(lengths)]

    def min_samples(self) -> int:
        n = 1
        while self.num_frames(n) < 1:
            n += 1 if n < 64 else n // 4
        return n


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK-mel filters ``[n_fft//2 + 1, n_mels]``."""

    def hz_to_mel(hz: float) -> float:
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10 ** (mel / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(torch.linspace(0, hz_to_mel(sample_rate / 2.0), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)

