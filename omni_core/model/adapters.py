"""Modality adapters: raw inputs → per-sample token embeddings ``[L, D]`` (CLS first),
each holding its modality's relative-position table (``bias_table``, shared by all layers).

They follow ONE-PEACE's released adapters (``/work/shared/ONE-PEACE.md`` §3-§5). Each works
on a whole batch of its modality at once and returns one tensor per sample, so a sample
embedded once can appear in several views of a step.

Autocast policy: the convolutional stems (the image hMLP stem, the audio front end) always
run in the parameters' dtype (fp32), even under ``torch.autocast``. Their LayerNorms sum a
gradient over every pixel or frame; fed by bf16 convolutions, those sums lost most of their
accuracy (measured on the ``tiny`` preset's first contrastive step: image stem LN weight/bias
gradients 53-104 % off fp32's; 2-3 % with the stem in fp32, what the bf16 encoder above it
leaves), while the stems are a small share of the step's FLOPs. Everything after the stem
(projections, the encoder) follows the caller's autocast as usual.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from omni_core import ops

# ONE-PEACE's audio feature extractor: (kernel, stride) per conv, total stride 320 (20 ms).
ONE_PEACE_AUDIO_CONVS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


def _fp32_stem(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for a stem on ``x``'s device (see the module's autocast policy);
    a no-op outside autocast."""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def _trunc_normal(*shape: int) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


class TextAdapter(nn.Module):
    """[CLS] + token embeddings, plus learned absolute positions (CLS takes row 0, the
    first token row 1). Token ids are BPE ids ending with EOS (the tokenizer appends it)."""

    def __init__(self, vocab_size: int, dim: int, positions: int, heads: int, bucket: int) -> None:
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, positions - 1
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        self.cls = _trunc_normal(dim)
        self.pos = _trunc_normal(positions, dim)
        self.bias_table = nn.Parameter(torch.zeros(2 * bucket + 2, heads))

    def num_tokens(self, ids: torch.Tensor) -> int:
        return ids.numel() + 1

    def forward(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        if not ids:
            return []
        flat = torch.cat([t.flatten() for t in ids])
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
    patches, row-major), a learned CLS and learned absolute positions (row 0 = CLS)."""

    def __init__(self, image_size: int, dim: int, stem_channels: int, heads: int) -> None:
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
        self.cls = _trunc_normal(dim)
        self.pos = _trunc_normal(self.grid**2 + 1, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * self.grid - 1) ** 2 + 3, heads))

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
        with _fp32_stem(images):
            images = images.to(self.conv1.weight.dtype)
            x = F.gelu(self._channel_ln(self.conv1(images), self.norm1))
            x = F.gelu(self._channel_ln(self.conv2(x), self.norm2))
            x = self.conv3(x).flatten(2).transpose(1, 2)  # [N, grid*grid, D]
        cls = self.cls.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        return list(x.unbind(0))


class AudioAdapter(nn.Module):
    """Audio front end on 16 kHz waveforms → frames, LN + Linear (the features ``f``), a
    learned CLS, and ONE-PEACE's convolutional positional embedding.

    ``forward`` returns ``[cls; f]`` per clip WITHOUT positions: the positional stack
    depends on which frames a view keeps (ONE-PEACE runs it after masking, over the kept
    frames only), so :meth:`add_positions` runs it per packed segment.

    ``front_end="conv"`` is ONE-PEACE's extractor on the raw waveform (``conv_layers``
    (kernel, stride) pairs, each conv without bias → LN over channels → GELU; stride 320).
    ``front_end="mel"`` (not in ONE-PEACE; the ``tiny`` preset uses it for speed) is a
    64-bin log-mel spectrogram (25 ms window, 10 ms hop) followed by ``mel_downsample``
    stride-2 convs. The front ends are causal-free of padding: a valid frame reads only
    its clip's samples, so a zero-padded batch gives each clip its own features.
    """

    SAMPLE_RATE, N_MELS, WIN, HOP = 16000, 64, 400, 160

    def __init__(self, dim: int, heads: int, bucket: int, channels: int, front_end: str = "conv",
                 conv_layers: tuple[tuple[int, int], ...] = ONE_PEACE_AUDIO_CONVS, pos_depth: int = 5,
                 pos_width: int = 95, pos_groups: int = 16, mel_downsample: int = 1,
                 max_frames: int = 750) -> None:
        super().__init__()
        if front_end not in ("conv", "mel"):
            raise ValueError(f"front_end must be 'conv' or 'mel', got {front_end!r}")
        self.front_end, self.max_frames = front_end, max_frames
        if front_end == "conv":
            self.conv_layers = tuple(tuple(layer) for layer in conv_layers)
            in_ch = [1] + [channels] * (len(self.conv_layers) - 1)
            self.convs = nn.ModuleList(nn.Conv1d(i, channels, k, stride=s, bias=False)
                                       for i, (k, s) in zip(in_ch, self.conv_layers))
        else:
            self.conv_layers = ((3, 2),) * mel_downsample
            self.rebuild_buffers()
            in_ch = [self.N_MELS] + [channels] * (mel_downsample - 1)
            self.convs = nn.ModuleList(nn.Conv1d(i, channels, 3, stride=2) for i in in_ch)
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in self.convs)
        self.proj_norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, dim)
        k = max(3, pos_width // pos_depth)
        self.pos_convs = nn.ModuleList(nn.Conv1d(dim, dim, k, padding=k // 2, groups=pos_groups)
                                       for _ in range(pos_depth))
        self.cls = _trunc_normal(dim)
        self.cls_pos = _trunc_normal(dim)
        self.bias_table = nn.Parameter(torch.zeros(2 * bucket + 2, heads))

    def rebuild_buffers(self, device: torch.device | None = None) -> None:
        """(Re)compute the mel front end's non-persistent buffers (nothing for ``conv``)."""
        if self.front_end == "mel":
            fb, window = mel_filterbank(self.N_MELS, self.WIN, self.SAMPLE_RATE), torch.hann_window(self.WIN)
            if device is not None:
                fb, window = fb.to(device), window.to(device)
            self.register_buffer("mel_fb", fb, persistent=False)
            self.register_buffer("window", window, persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames (without CLS) produced for a clip of ``num_samples`` samples."""
        n = num_samples
        if self.front_end == "mel":
            n = (n - self.WIN) // self.HOP + 1
        for k, s in self.conv_layers:
            n = (n - k) // s + 1
        return max(n, 0)

    def features(self, padded: torch.Tensor) -> torch.Tensor:
        """``[N, S]`` waveforms → ``[N, frames, C]`` front-end features (in the parameters'
        dtype even under autocast: see the module's autocast policy)."""
        with _fp32_stem(padded):
            return self._features(padded.to(self.norms[0].weight.dtype))

    def _features(self, padded: torch.Tensor) -> torch.Tensor:
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
        """``[cls; f]`` per clip (no positions: see :meth:`add_positions`)."""
        if not waves:
            return []
        lengths = [self.num_frames(w.numel()) for w in waves]
        short = [i for i, n in enumerate(lengths) if n < 1]
        if short:
            raise ValueError(f"audio clips {short} are too short to give one frame "
                             f"(need at least {self.min_samples()} samples)")
        long = [i for i, n in enumerate(lengths) if n > self.max_frames]
        if long:
            raise ValueError(f"audio clips {long} give more than {self.max_frames} frames "
                             f"(crop them to 15 s as ONE-PEACE does)")
        dtype = self.proj.weight.dtype
        padded = nn.utils.rnn.pad_sequence([w.to(dtype).flatten() for w in waves], batch_first=True)
        feats = unpad(self.features(padded), lengths)  # the projection skips the padding frames
        x = self.proj(ops.layer_norm(feats, self.proj_norm.weight, self.proj_norm.bias, self.proj_norm.eps))
        return [torch.cat([self.cls[None], f]) for f in x.split(lengths)]

    def add_positions(self, segments: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[cls; f_1..f_n]`` → ``[cls + cls_pos; f + p(f)]`` per segment, where ``p`` is the
        positional stack (``depth`` × grouped Conv1d → LayerNorm without affine → GELU, not
        residual) run over that segment's frames alone. ONE-PEACE runs it after masking, so a
        masked view passes only its kept frames. One batched call: frames beyond a segment's
        end are re-zeroed after every block, so each segment sees the zero padding it has alone.
        """
        if not segments:
            return []
        lengths = torch.tensor([s.shape[0] - 1 for s in segments], device=segments[0].device)
        valid = (torch.arange(int(lengths.max()), device=lengths.device)[None, :] < lengths[:, None])[..., None]
        # [N, L, D] by one masked scatter: pad_sequence's backward would copy a whole [N, L, D]
        # gradient per segment
        frames = segments[0].new_zeros(*valid.shape[:2], segments[0].shape[1]).masked_scatter(
            valid, torch.cat([s[1:] for s in segments]))
        p = frames.transpose(1, 2)
        for conv in self.pos_convs:
            p = conv(p)
            if conv.kernel_size[0] % 2 == 0:  # ONE-PEACE's SamePad: even kernels give one frame too many
                p = p[:, :, :-1]
            p = F.gelu(F.layer_norm(p.transpose(1, 2), (p.shape[1],)) * valid).transpose(1, 2)
        x = unpad(frames + p.transpose(1, 2), lengths).split(lengths.tolist())
        return [torch.cat([(s[0] + self.cls_pos)[None], f]) for s, f in zip(segments, x)]

    def min_samples(self) -> int:
        n = 1
        while self.num_frames(n) < 1:
            n += 1 if n < 64 else n // 4
        return n


def unpad(x: torch.Tensor, lengths: list[int] | torch.Tensor) -> torch.Tensor:
    """The first ``lengths[i]`` rows of every ``x[i]`` (``[N, L, D]``), packed ``[sum(lengths), D]``.

    One masked gather: slicing each row out of ``x`` instead would make every slice's backward
    zero-fill a whole ``[N, L, D]`` gradient (quadratic in the number of clips)."""
    lengths = torch.as_tensor(lengths, device=x.device)
    return x[torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]]


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
