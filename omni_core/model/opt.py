"""OPT (Omni-Perception Pre-Trainer, arXiv 2107.00249) on the packed engine.

OPT is an encoder–decoder. Three single-modal encoders turn text, image and audio into
token embeddings; a cross-modal encoder runs over each triplet's concatenated
``[text; image; audio]`` tokens; a text decoder writes captions and an image decoder writes
the 8×8 = 64 discrete tokens of an image tokenizer (:mod:`omni_core.model.vq`). Facts from
the public MindSpore release (``mindspore-ai/models``, ``research/mm/opt``): cross-modal
encoder 24 layers × 4096, 32 heads, FFN 16384, GELU, dropout 0.1
(``cross_modal_encoder_config.json``); decoders 6 layers × 1024, 16 heads, FFN 4096, dropout
0.2, label smoothing 0.1 (``transformer_config.py``); 64 image tokens (``IMG_TOKEN_LEN``);
a 5-way triplet-matching head on the pooled first token (``pretrain_ms.py``).

Here, as everywhere in omni-core, a step is packed: every triplet view of a step goes
through the single-modal encoders as one packed pass (each modality segment its own
sequence, FFNs routed by modality) and through the cross-modal encoder as a second pass
over the same token stream, re-cut into one sequence per triplet (the segments of a view
are already adjacent, so nothing moves). The decoders run packed too: causal self-attention
and cross-attention through ``ops.varlen_attention(causal=True)`` / ``cu_seqlens_k=``, and
incrementally over a KV cache through ``ops.attention_with_kvcache``.

Deviations from the release (README "OPT"): image patches from our hMLP stem stand in for
detector regions; a masked unit is replaced by a learned mask embedding *after* the
per-unit front end (the release zero-fills precomputed features), and a modality masked
as a whole is left out of the sequence (so no length leaks); pre-LN layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from omni_core import ops
from omni_core.model.adapters import AudioAdapter, ImageAdapter, TextAdapter, mel_filterbank
from omni_core.nn import ModalityLayerNorm, ModalityRoutedFFN, VarlenAttention

TEXT, IMAGE, AUDIO = 0, 1, 2
MODALITIES = ("text", "image", "audio")
IMAGE_GRID = 8  # the image tokenizer's 8×8 grid (the release's img_token_len = 64)
PATCH = 16  # pixels per side of a stem patch
ITM_CLASSES = ("match", "other image and audio", "other image", "other audio", "two other samples")
MEL_BINS = 64


@dataclass(frozen=True)
class OptConfig:
    """Architecture of an :class:`OptModel`."""

    dim: int  # width of the single-modal and cross-modal encoders
    depth: int  # cross-modal encoder layers
    heads: int
    ffn_hidden: int
    unimodal_depth: int  # layers of the single-modal encoders (attention shared, FFN per modality)
    dec_dim: int
    dec_depth: int
    dec_heads: int
    dec_ffn: int
    vocab_size: int = 1000
    text_positions: int = 72  # CLS + up to 70 ids + EOS
    caption_positions: int = 72  # the text decoder's window: BOS + up to 71 tokens
    codebook_size: int = 512  # the image tokenizer's codes
    image_size: int = 64
    stem_channels: int = 64
    audio_front_end: str = "conv"
    audio_channels: int = 128
    audio_conv_layers: tuple[tuple[int, int], ...] = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))
    audio_mel_downsample: int = 1
    audio_max_frames: int = 750
    audio_pos_depth: int = 5
    audio_pos_width: int = 95
    audio_pos_groups: int = 16
    dropout: float = 0.1
    dec_dropout: float = 0.2
    bos_id: int = 2  # the caption tokenizer's [CLS] starts a caption (omni_core.data.tokenizer)
    eos_id: int = 3  # and its [EOS] ends one

    def __post_init__(self) -> None:
        object.__setattr__(self, "audio_conv_layers", tuple(tuple(layer) for layer in self.audio_conv_layers))
        grid = self.image_size // PATCH
        if self.image_size % PATCH or not (IMAGE_GRID % grid == 0 or grid % IMAGE_GRID == 0):
            raise ValueError(f"image_size must be 16 × g with g dividing 8 or a multiple of 8 (so each patch "
                             f"maps onto the tokenizer's 8×8 grid), got {self.image_size}")


PRESETS: dict[str, OptConfig] = {
    # CPU demo size: a step of a few dozen triplets in about a second on 2 cores.
    "opt-tiny": OptConfig(dim=192, depth=3, heads=3, ffn_hidden=512, unimodal_depth=1, dec_dim=192, dec_depth=2,
                          dec_heads=3, dec_ffn=512, vocab_size=1000, image_size=64, stem_channels=48,
                          audio_front_end="mel", audio_channels=128, audio_mel_downsample=3, audio_pos_depth=2,
                          audio_pos_width=30, audio_pos_groups=8, dropout=0.0, dec_dropout=0.0),
    # BERT-base-sized encoders with the release's "base" decoder (512 wide, 6 layers, 8 heads, FFN 2048).
    "opt-base": OptConfig(dim=768, depth=12, heads=12, ffn_hidden=3072, unimodal_depth=2, dec_dim=512, dec_depth=6,
                          dec_heads=8, dec_ffn=2048, vocab_size=30000, codebook_size=8192, image_size=256,
                          stem_channels=192, audio_channels=512),
    # The release's cross-modal encoder and "large" decoder; instantiate on device="meta".
    "opt-large": OptConfig(dim=4096, depth=24, heads=32, ffn_hidden=16384, unimodal_depth=2, dec_dim=1024,
                           dec_depth=6, dec_heads=16, dec_ffn=4096, vocab_size=36560, codebook_size=8192,
                           image_size=256, stem_channels=384, audio_channels=512),
}


# --------------------------------------------------------------------------- inputs / outputs
@dataclass
class TripletView:
    """One sequence of the cross-modal encoder: which sample's text, image and audio it holds
    (``None`` leaves the modality out: masked as a whole) and how each is masked.

    ``text_ids`` replaces the text's ids (same length: MLM masking); ``image_mask`` (bool
    ``[patches]``) and ``audio_mask`` (bool ``[frames]``) mark units replaced by the mask
    embedding. Indices may differ across modalities (triplet matching's swapped negatives).
    """

    text: int | None
    image: int | None
    audio: int | None
    text_ids: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None

    def modalities(self) -> list[tuple[int, int]]:
        """``(modality, sample index)`` of each present segment, in sequence order."""
        return [(m, i) for m, i in ((TEXT, self.text), (IMAGE, self.image), (AUDIO, self.audio)) if i is not None]


@dataclass
class Encoded:
    """The cross-modal encoder's output for N sequences (what the decoders attend to).

    ``x [T, D]`` packed; ``cu_seqlens`` int32 ``[N+1]``; ``spans[n]`` maps a modality to the
    ``(start, length)`` of its segment (CLS first) in ``x``.
    """

    x: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    spans: list[dict[int, tuple[int, int]]]

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def select(self, rows: torch.Tensor | list[int]) -> Encoded:
        """The sequences ``rows`` (repeats allowed), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.long).flatten().tolist()
        if any(r < 0 or r >= self.num_sequences for r in rows):
            raise ValueError(f"rows must index the {self.num_sequences} encoded sequences, got {rows}")
        bounds = self.cu_seqlens.tolist()
        index = torch.cat([torch.arange(bounds[r], bounds[r + 1]) for r in rows]).to(self.x.device)
        lengths = [bounds[r + 1] - bounds[r] for r in rows]
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        spans, start = [], 0
        for r, n in zip(rows, lengths):
            spans.append({m: (s - bounds[r] + start, length) for m, (s, length) in self.spans[r].items()})
            start += n
        return Encoded(self.x.index_select(0, index), cu.to(self.x.device), max(lengths), spans)

    @staticmethod
    def concat(parts: list[Encoded]) -> Encoded:
        """Several encodings as one (the unpacked reference path builds one per sequence)."""
        x = torch.cat([p.x for p in parts])
        lengths = [n for p in parts for n in (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).tolist()]
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
        spans, offset = [], 0
        for p in parts:
            spans += [{m: (s + offset, n) for m, (s, n) in sp.items()} for sp in p.spans]
            offset += p.x.shape[0]
        return Encoded(x, cu, max(lengths), spans)


# --------------------------------------------------------------------------- layers
def _ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)


class EncoderLayer(nn.Module):
    """Pre-LN layer over a packed batch: self-attention within each sequence, then an FFN
    routed by ``route`` (per modality in the single-modal encoders, one FFN in the cross-modal)."""

    def __init__(self, dim: int, heads: int, ffn: int, num_ffns: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = VarlenAttention(dim, heads, sub_ln=False)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = ModalityRoutedFFN(num_ffns, dim, ffn, geglu=False, sub_ln=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, batch: ops.PackedBatch, route: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.attn(_ln(x, self.attn_norm), batch), self.dropout, self.training)
        return x + F.dropout(self.ffn(_ln(x, self.ffn_norm), route), self.dropout, self.training)


class Attention(nn.Module):
    """Multi-head attention with separate projections, usable packed (``varlen``) or one
    decode step at a time over a cache (``cached``)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(source)), self.split(self.v(source))

    def varlen(self, x: torch.Tensor, cu: torch.Tensor, max_len: int, source: torch.Tensor | None = None,
               cu_k: torch.Tensor | None = None, max_k: int | None = None, causal: bool = False) -> torch.Tensor:
        k, v = self.kv(x if source is None else source)
        out = ops.varlen_attention(self.split(self.q(x)), k, v, cu, max_len, causal=causal, cu_seqlens_k=cu_k,
                                   max_seqlen_k=max_k)
        return self.out(out.flatten(-2))

    def cached(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
               new: bool) -> torch.Tensor:
        """``x [B, 1, D]``; with ``new`` its own key/value is appended to the cache first (self-
        attention, causal); otherwise the cache is a fixed memory (cross-attention)."""
        dtype = k_cache.dtype  # under autocast the projections may come out in another precision
        q = self.split(self.q(x)).to(dtype)
        k, v = (t.to(dtype) for t in self.kv(x)) if new else (None, None)
        out = ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k=k, v=v, causal=new)
        return self.out(out.flatten(-2))


class DecoderLayer(nn.Module):
    """Pre-LN: causal self-attention, cross-attention to the encoder, FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_norm, self.cross_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.ffn = ModalityRoutedFFN(1, dim, ffn, geglu=False, sub_ln=False)
        self.dropout = dropout

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, self.dropout, self.training)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        flat = _ln(x, self.ffn_norm).reshape(-1, x.shape[-1])
        route = torch.zeros(flat.shape[0], dtype=torch.int32, device=x.device)
        return self.ffn(flat, route).view(x.shape)

    def forward(self, x: torch.Tensor, cu: torch.Tensor, max_len: int, memory: torch.Tensor, cu_m: torch.Tensor,
                max_m: int) -> torch.Tensor:
        x = x + self._drop(self.self_attn.varlen(_ln(x, self.self_norm), cu, max_len, causal=True))
        x = x + self._drop(self.cross_attn.varlen(_ln(x, self.cross_norm), cu, max_len, memory, cu_m, max_m))
        return x + self._drop(self._ffn(x))


class IncrementalDecoder(Protocol):
    """What search code (greedy, beam) drives; see :meth:`Decoder.start`."""

    vocab_size: int
    bos_id: int
    eos_id: int | None  # None for the image decoder (always 64 tokens)

    def start(self, rows: torch.Tensor) -> object: ...

    def step(self, state: object, tokens: torch.Tensor) -> torch.Tensor: ...

    def select(self, state: object, rows: torch.Tensor) -> object: ...


class Decoder(nn.Module):
    """A transformer decoder over a token vocabulary, cross-attending to :class:`Encoded`.

    The input embedding has ``vocab_in`` rows (the image decoder's extra row is its BOS);
    logits cover the first ``vocab_out`` rows through the tied embedding. ``forward`` is the
    packed teacher-forced pass; :meth:`incremental` gives the :class:`IncrementalDecoder`.
    """

    def __init__(self, vocab_in: int, vocab_out: int, positions: int, dim: int, depth: int, heads: int,
                 ffn: int, memory_dim: int, dropout: float, name: str) -> None:
        super().__init__()
        self.vocab_out, self.positions, self.name = vocab_out, positions, name
        self.embed = nn.Embedding(vocab_in, dim)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(positions, dim), std=0.02))
        self.memory_proj = nn.Linear(memory_dim, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.dropout = dropout

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return _ln(h, self.norm) @ self.embed.weight[: self.vocab_out].t()

    def check_length(self, length: int) -> None:
        if length > self.positions:
            raise ValueError(f"the {self.name} decoder's window is {self.positions} tokens (BOS included); "
                             f"got a sequence of {length}")

    def forward(self, tokens: list[torch.Tensor], memory: Encoded) -> torch.Tensor:
        """Teacher forcing: ``tokens[n]`` (BOS first) attends to ``memory`` sequence n.
        Returns packed logits ``[sum of lengths, vocab_out]``."""
        if len(tokens) != memory.num_sequences:
            raise ValueError(f"{len(tokens)} token sequences for {memory.num_sequences} encoded sequences")
        lengths = [t.numel() for t in tokens]
        self.check_length(max(lengths))
        flat = torch.cat([t.flatten() for t in tokens]).long()
        pos = torch.cat([torch.arange(n) for n in lengths]).to(flat.device)
        x = F.dropout(self.embed(flat) + self.pos[pos], self.dropout, self.training)
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(flat.device)
        mem = self.memory_proj(memory.x)
        for layer in self.layers:
            x = layer(x, cu, max(lengths), mem, memory.cu_seqlens, memory.max_seqlen)
        return self.logits(x)

    def incremental(self, memory: Encoded, bos_id: int, eos_id: int | None, use_cache: bool) -> _Decoding:
        return _Decoding(self, memory, bos_id, eos_id, use_cache)


@dataclass
class _CacheState:
    rows: torch.Tensor  # [B] encoded sequence of each row
    length: int  # tokens already fed
    k: list[torch.Tensor]  # per layer [B, window, H, Dh] self-attention cache
    v: list[torch.Tensor]
    mem_k: list[torch.Tensor]  # per layer [B, Lm, H, Dh] the memory's keys (fixed)
    mem_v: list[torch.Tensor]
    mem_lengths: torch.Tensor  # int32 [B]


@dataclass
class _PrefixState:
    rows: torch.Tensor
    tokens: torch.Tensor  # [B, t] fed so far


class _Decoding:
    """:class:`IncrementalDecoder` over one :class:`Encoded` batch: with ``use_cache`` each
    step attends over a KV cache (``ops.attention_with_kvcache``); without, each step re-runs
    the packed decoder over the whole prefix (the reference the cache must equal)."""

    def __init__(self, decoder: Decoder, memory: Encoded, bos_id: int, eos_id: int | None, use_cache: bool) -> None:
        self.decoder, self.memory, self.use_cache = decoder, memory, use_cache
        self.vocab_size, self.bos_id, self.eos_id = decoder.vocab_out, bos_id, eos_id
        if use_cache:
            self._mem_kv = self._memory_kv()

    @torch.no_grad()
    def _memory_kv(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Every layer's cross-attention keys/values of every encoded sequence, padded ``[N, Lm, H, Dh]``."""
        mem = self.decoder.memory_proj(self.memory.x)
        lengths = (self.memory.cu_seqlens[1:] - self.memory.cu_seqlens[:-1])
        parts = list(torch.split(mem, lengths.tolist()))
        padded = nn.utils.rnn.pad_sequence(parts, batch_first=True)  # [N, Lm, D]
        ks, vs = zip(*(layer.cross_attn.kv(padded) for layer in self.decoder.layers))
        return list(ks), list(vs), lengths.to(torch.int32)

    def start(self, rows: torch.Tensor) -> _CacheState | _PrefixState:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.memory.x.device).flatten()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.memory.num_sequences):
            raise ValueError(f"rows must index the {self.memory.num_sequences} encoded samples, got {rows.tolist()}")
        if not self.use_cache:
            return _PrefixState(rows, torch.empty(rows.numel(), 0, dtype=torch.long, device=rows.device))
        mem_k, mem_v, mem_len = self._mem_kv
        layer = self.decoder.layers[0].self_attn
        shape = (rows.numel(), self.decoder.positions, layer.heads, layer.head_dim)
        x = self.memory.x
        empty = [x.new_zeros(shape) for _ in self.decoder.layers]
        return _CacheState(rows, 0, empty, [t.clone() for t in empty], [k[rows] for k in mem_k],
                           [v[rows] for v in mem_v], mem_len[rows])

    @torch.no_grad()
    def step(self, state: _CacheState | _PrefixState, tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=state.rows.device).flatten()
        if tokens.numel() != state.rows.numel():
            raise ValueError(f"step got {tokens.numel()} tokens for {state.rows.numel()} rows")
        if isinstance(state, _PrefixState):
            state.tokens = torch.cat([state.tokens, tokens[:, None]], dim=1)
            if not tokens.numel():
                return self.memory.x.new_zeros(0, self.vocab_size).float()
            was_training = self.decoder.training
            self.decoder.eval()  # decoding never drops out (the cached path has no dropout)
            try:
                logits = self.decoder(list(state.tokens.unbind(0)), self.memory.select(state.rows))
            finally:
                self.decoder.train(was_training)
            return logits.view(tokens.numel(), -1, self.vocab_size)[:, -1].float()
        return self._cached_step(state, tokens)

    def _cached_step(self, state: _CacheState, tokens: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        dec.check_length(state.length + 1)
        x = (dec.embed(tokens) + dec.pos[state.length])[:, None]  # [B, 1, D]
        lengths = torch.full((tokens.numel(),), state.length, dtype=torch.int32, device=x.device)
        for i, layer in enumerate(dec.layers):
            x = x + layer.self_attn.cached(_ln(x, layer.self_norm), state.k[i], state.v[i], lengths, new=True)
            x = x + layer.cross_attn.cached(_ln(x, layer.cross_norm), state.mem_k[i], state.mem_v[i],
                                            state.mem_lengths, new=False)
            x = x + layer._ffn(x)
        state.length += 1
        return dec.logits(x[:, 0]).float()

    def select(self, state: _CacheState | _PrefixState, rows: torch.Tensor) -> _CacheState | _PrefixState:
        rows = torch.as_tensor(rows, dtype=torch.long, device=state.rows.device).flatten()
        if isinstance(state, _PrefixState):
            return _PrefixState(state.rows[rows], state.tokens[rows])
        pick = lambda ts: [t.index_select(0, rows) for t in ts]  # noqa: E731
        return _CacheState(state.rows[rows], state.length, pick(state.k), pick(state.v), pick(state.mem_k),
                           pick(state.mem_v), state.mem_lengths[rows])


# --------------------------------------------------------------------------- the model
class OptModel(nn.Module):
    """OPT: single-modal encoders, the cross-modal encoder, the pre-training heads and the
    text and image decoders. ``encode_views`` is the packed pass a training step runs;
    ``encode`` / ``text_decoding`` / ``image_decoding`` are the inference API."""

    def __init__(self, cfg: OptConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.text = TextAdapter(cfg.vocab_size, D, cfg.text_positions, cfg.heads, 16)
        self.image = ImageAdapter(cfg.image_size, D, cfg.stem_channels, cfg.heads)
        self.audio = AudioAdapter(D, cfg.heads, 32, cfg.audio_channels, cfg.audio_front_end, cfg.audio_conv_layers,
                                  cfg.audio_pos_depth, cfg.audio_pos_width, cfg.audio_pos_groups,
                                  cfg.audio_mel_downsample, cfg.audio_max_frames)
        self.mask_embed = nn.Parameter(torch.randn(len(MODALITIES), D) * 0.02)  # image / audio masked units
        self.type_embed = nn.Parameter(torch.zeros(len(MODALITIES), D))  # which modality, in the joint sequence
        self.unimodal = nn.ModuleList(EncoderLayer(D, cfg.heads, cfg.ffn_hidden, len(MODALITIES), cfg.dropout)
                                      for _ in range(cfg.unimodal_depth))
        self.unimodal_norm = ModalityLayerNorm(len(MODALITIES), D)
        self.blocks = nn.ModuleList(EncoderLayer(D, cfg.heads, cfg.ffn_hidden, 1, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D)
        # pre-training heads (pretrain_ms.py: BertOnlyMLMHead, RegionClassification,
        # RegionFeatureRegression, AudioFeatureRegression, pooler + itm_output)
        self.mlm_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, cfg.vocab_size))
        self.mrc_head = nn.Linear(D, self.codes_per_patch * cfg.codebook_size)
        self.region_regress = nn.Linear(D, 3 * PATCH * PATCH)
        self.audio_regress = nn.Linear(D, MEL_BINS)
        self.pooler = nn.Linear(D, D)
        self.itm_head = nn.Linear(D, len(ITM_CLASSES))
        self.text_decoder = Decoder(cfg.vocab_size, cfg.vocab_size, cfg.caption_positions, cfg.dec_dim,
                                    cfg.dec_depth, cfg.dec_heads, cfg.dec_ffn, D, cfg.dec_dropout, "text")
        self.image_decoder = Decoder(cfg.codebook_size + 1, cfg.codebook_size, IMAGE_GRID**2, cfg.dec_dim,
                                     cfg.dec_depth, cfg.dec_heads, cfg.dec_ffn, D, cfg.dec_dropout, "image")

    @classmethod
    def from_preset(cls, name: str, device: torch.device | str | None = None, **overrides) -> OptModel:
        if name not in PRESETS:
            raise ValueError(f"unknown OPT preset {name!r}; choose one of {sorted(PRESETS)}")
        with torch.device(device or "cpu"):
            return cls(replace(PRESETS[name], **overrides))

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def rebuild_buffers(self) -> None:
        self.audio.rebuild_buffers(self.mask_embed.device)

    @property
    def grid(self) -> int:
        return self.image.grid

    @property
    def codes_per_patch(self) -> int:
        """Tokenizer codes under one stem patch (1 when a patch is no larger than a code cell)."""
        return max(1, IMAGE_GRID // (self.cfg.image_size // PATCH)) ** 2

    # ----------------------------------------------------------------------- encoding
    def encode_views(self, text: list[torch.Tensor], image: torch.Tensor | None, audio: list[torch.Tensor],
                     views: list[TripletView]) -> Encoded:
        """Both encoder passes over every view, packed. ``text`` / ``image`` / ``audio`` hold
        the step's samples (token ids without CLS, CLIP-normalised images, waveforms); each
        view names which of them it uses."""
        if not views:
            raise ValueError("encode_views needs at least one view")
        segments = self._unimodal_segments(text, image, audio, views)
        batch = ops.PackedBatch.from_segments([[ops.Segment(m, x)] for m, x in segments])
        x = batch.x
        for layer in self.unimodal:
            x = layer(x, batch, batch.modality)
        x = self.unimodal_norm(x, batch.modality) + self.type_embed[batch.modality.long()]
        # The segments of a view are adjacent in the stream: re-cut it into one sequence per view.
        spans, lengths, start, k = [], [], 0, 0
        for view in views:
            span = {}
            for m, _ in view.modalities():
                span[m] = (start, segments[k][1].shape[0])
                start += segments[k][1].shape[0]
                k += 1
            spans.append(span)
            lengths.append(sum(n for _, n in span.values()))
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
        joint = ops.PackedBatch(x, cu, batch.modality, batch.position, max(lengths))
        route = torch.zeros_like(batch.modality)
        for layer in self.blocks:
            x = layer(x, joint, route)
        return Encoded(_ln(x, self.final_norm), cu, max(lengths), spans)

    def _unimodal_segments(self, text, image, audio, views) -> list[tuple[int, torch.Tensor]]:
        """``(modality, tokens [L, D])`` of every segment of every view, in stream order."""
        for n, view in enumerate(views):
            if not view.modalities():
                raise ValueError(f"view {n} leaves out every modality")
            for m, i in view.modalities():
                size = (len(text), 0 if image is None else image.shape[0], len(audio))[m]
                if not 0 <= i < size:
                    raise ValueError(f"view {n}: {MODALITIES[m]} index {i} outside the {size} given")
        used_images = sorted({v.image for v in views if v.image is not None})
        used_audio = sorted({v.audio for v in views if v.audio is not None})
        images = dict(zip(used_images, self.image(image[used_images]))) if used_images else {}
        raw = dict(zip(used_audio, self.audio([audio[i] for i in used_audio]))) if used_audio else {}
        texts = self.text([v.text_ids if v.text_ids is not None else text[v.text] for v in views
                           if v.text is not None])
        out: list[tuple[int, torch.Tensor]] = []
        audio_at, audio_tokens, t = [], [], 0
        for view in views:
            if view.text is not None:
                out.append((TEXT, texts[t]))
                t += 1
            if view.image is not None:
                out.append((IMAGE, self._masked(images[view.image], view.image_mask, IMAGE, self.image.pos)))
            if view.audio is not None:
                audio_at.append(len(out))
                audio_tokens.append(self._masked(raw[view.audio], view.audio_mask, AUDIO, None))
                out.append((AUDIO, None))
        # ONE-PEACE's positional convolution runs per segment, after masking (no content leaks).
        for k, tokens in zip(audio_at, self.audio.add_positions(audio_tokens)):
            out[k] = (AUDIO, tokens)
        return out

    def _masked(self, tokens: torch.Tensor, mask: torch.Tensor | None, modality: int,
                pos: torch.Tensor | None) -> torch.Tensor:
        """Units where ``mask`` is set (CLS excluded) become the mask embedding (+ position)."""
        if mask is None:
            return tokens
        mask = mask.to(device=tokens.device, dtype=torch.bool).flatten()
        if mask.numel() != tokens.shape[0] - 1:
            raise ValueError(f"a {MODALITIES[modality]} mask has {mask.numel()} units for a segment of "
                             f"{tokens.shape[0] - 1}")
        fill = self.mask_embed[modality].expand_as(tokens)
        if pos is not None:
            fill = fill + pos
        full = torch.cat([mask.new_zeros(1), mask])[:, None]
        return torch.where(full, fill, tokens)

    def encode(self, text: list[torch.Tensor] | None = None, image: torch.Tensor | None = None,
               audio: list[torch.Tensor] | None = None) -> Encoded:
        """Encode N samples from the modalities given (the others left out, as a modality
        masked as a whole in pre-training): e.g. ``encode(image=x)`` to caption images,
        ``encode(text=ids)`` to imagine them. Every given modality must hold N samples."""
        given = {name: len(v) for name, v in (("text", text), ("image", image), ("audio", audio)) if v is not None}
        if not given:
            raise ValueError("encode needs at least one of text, image, audio")
        if len(set(given.values())) != 1:
            raise ValueError(f"the given modalities hold different numbers of samples: {given}")
        n = next(iter(given.values()))
        views = [TripletView(i if text is not None else None, i if image is not None else None,
                             i if audio is not None else None) for i in range(n)]
        return self.encode_views(list(text or []), image, list(audio or []), views)

    def matching_logits(self, encoded: Encoded, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, 5]`` triplet-matching logits (:data:`ITM_CLASSES`, class 0 = matched) of the
        encoded sequences ``rows`` (default all), from each sequence's pooled first token."""
        first = encoded.cu_seqlens[:-1].long()
        if rows is not None:
            first = first[torch.as_tensor(rows, dtype=torch.long, device=first.device)]
        return self.itm_head(torch.tanh(self.pooler(encoded.x[first])))

    # ----------------------------------------------------------------------- decoding
    def text_decoding(self, memory: Encoded, use_cache: bool = True) -> IncrementalDecoder:
        """Caption decoding over ``memory``: BOS is the tokenizer's [CLS], EOS its [EOS]."""
        return self.text_decoder.incremental(memory, self.cfg.bos_id, self.cfg.eos_id, use_cache)

    def image_decoding(self, memory: Encoded, use_cache: bool = True) -> IncrementalDecoder:
        """Image-token decoding over ``memory``: 64 codes, BOS = ``codebook_size``, no EOS."""
        return self.image_decoder.incremental(memory, self.cfg.codebook_size, None, use_cache)

    # ----------------------------------------------------------------------- targets
    def patch_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Tokenizer codes ``[N, 64]`` → the codes under each stem patch ``[N, P, k]``."""
        if codes.dim() != 2 or codes.shape[1] != IMAGE_GRID**2:
            raise ValueError(f"image codes must be [N, {IMAGE_GRID**2}], got {tuple(codes.shape)}")
        g, N = self.grid, codes.shape[0]
        grid = codes.view(N, IMAGE_GRID, IMAGE_GRID)
        if g >= IMAGE_GRID:  # several patches share one code cell
            r = g // IMAGE_GRID
            return grid.repeat_interleave(r, 1).repeat_interleave(r, 2).reshape(N, g * g, 1)
        r = IMAGE_GRID // g  # one patch covers r×r code cells
        return grid.view(N, g, r, g, r).permute(0, 1, 3, 2, 4).reshape(N, g * g, r * r)

    def pixel_patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` → ``[N, P, 3·16·16]`` the pixels of each stem patch (row-major)."""
        N, g = images.shape[0], self.grid
        return images.reshape(N, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(N, g * g, -1)

    def audio_targets(self, wave: torch.Tensor) -> torch.Tensor:
        """Fixed per-frame regression targets ``[frames, 64]``: the clip's log-mel spectrogram
        (standardised over the clip) averaged over each frame token's span."""
        frames = self.audio.num_frames(wave.numel())
        win, hop = AudioAdapter.WIN, AudioAdapter.HOP
        if wave.numel() < win:
            raise ValueError(f"an audio clip of {wave.numel()} samples is shorter than one {win}-sample window")
        fb = mel_filterbank(MEL_BINS, win, AudioAdapter.SAMPLE_RATE).to(wave)
        spec = torch.fft.rfft(wave.flatten().unfold(0, win, hop) * torch.hann_window(win).to(wave), dim=-1)
        mel = torch.log(spec.abs() ** 2 @ fb + 1e-6)
        mel = (mel - mel.mean()) / (mel.std() + 1e-5)
        return F.adaptive_avg_pool1d(mel.t()[None], frames)[0].t()


def load_opt(path: str | Path, device: torch.device | str = "cpu") -> tuple[OptModel, dict]:
    """An :class:`OptModel` from ``omni pretrain --recipe opt``: a run directory (its final
    model, else its latest checkpoint) or a weights file; in eval mode, with the run's meta
    (``meta["args"]["vq"]`` names its image tokenizer)."""
    from safetensors.torch import load_file

    from omni_core.train.checkpoint import read_meta
    from omni_core.train.trainer import run_weights

    path = run_weights(path) if Path(path).is_dir() else Path(path)
    meta = read_meta(path)
    if meta.get("args", {}).get("recipe", "opt") != "opt":
        raise ValueError(f"{path} was trained with --recipe {meta['args']['recipe']}, not opt")
    with torch.device(device):
        model = OptModel(OptConfig(**meta["config"]))
    tensors = {k[len("model/"):]: v for k, v in load_file(str(path)).items() if k.startswith("model/")}
    model.load_state_dict(tensors)
    return model.eval(), meta
