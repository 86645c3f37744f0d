"""Audio helpers shared by the generator and the loaders (no scipy/torchaudio here)."""

from __future__ import annotations

import io
from math import gcd

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
MAX_SECONDS = 15.0
MIN_SECONDS = 1.0
_HALF_TAPS = 16  # zero crossings each side of the sinc: ~-60 dB stop band with the Kaiser window


def _filter_bank(up: int, down: int) -> np.ndarray:
    """Kaiser-windowed sinc low-pass, one row of 2*_HALF_TAPS taps per polyphase phase."""
    cutoff = min(1.0, up / down) * 0.95  # relative to the input Nyquist; margin for the transition band
    phases = np.arange(up)[:, None] / up  # fractional input offset of each output phase
    taps = np.arange(-_HALF_TAPS + 1, _HALF_TAPS + 1)[None, :]
    t = taps - phases
    beta = 8.0
    w = np.i0(beta * np.sqrt(np.clip(1.0 - (t / _HALF_TAPS) ** 2, 0.0, None))) / np.i0(beta)
    h = cutoff * np.sinc(cutoff * t) * w
    return (h / h.sum(axis=1, keepdims=True)).astype(np.float64)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited polyphase resampling of a mono float signal."""
    if src_rate == dst_rate:
        return x.astype(np.float32, copy=False)
    g = gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    n_out = (len(x) * up) // down
    pos = np.arange(n_out, dtype=np.int64) * down  # output positions on the up-sampled grid
    base, phase = pos // up, pos % up
    bank = _filter_bank(up, down)
    padded = np.pad(x.astype(np.float64), (_HALF_TAPS, _HALF_TAPS))
    idx = base[:, None] + np.arange(1, 2 * _HALF_TAPS + 1)[None, :]
    return np.einsum("nk,nk->n", padded[idx], bank[phase]).astype(np.float32)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode to mono float32; raises ValueError when the file is shorter than its header says."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        frames, rate = f.frames, f.samplerate
        pcm = f.read(dtype="float32", always_2d=True)
    if len(pcm) != frames or frames == 0:
        raise ValueError(f"truncated audio: header says {frames} frames, decoded {len(pcm)}")
    return pcm.mean(axis=1), rate


def fit_length(x: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Keep the first MAX_SECONDS; repeat clips shorter than MIN_SECONDS (as ONE-PEACE does)."""
    x = x[: int(MAX_SECONDS * rate)]
    min_len = int(MIN_SECONDS * rate)
    if len(x) < min_len:
        x = np.tile(x, -(-min_len // len(x)))[:min_len]
    return x


def normalise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per clip (wav2vec2 feature normalisation)."""
    x = x.astype(np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


def encode_flac(x: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
