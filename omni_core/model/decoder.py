"""ONE-PEACE's pre-training decoder for the denoising contrast, over one packed stream.

The released model (``one_peace/models/one_peace/one_peace_pretrain.py``) gives the masked
views' encoder outputs to a second, narrower stack (``decoder_wrapper``: width D/2, 2 layers,
no relative-position bias, no layer scale, modality FFNs and final norms): per modality a
``decoder_{m}_embed`` Linear(D, D/2) maps each kept token's encoder feature into the decoder,
a learned ``{m}_mask_token`` fills every masked position, the decoder adapter's absolute
positions are added to all positions, and after the stack a ``{m}_mask_head`` Linear(D/2, D)
predicts the teacher's features. Here every masked view of a step (text, image, audio,
joint) is one packed decoder pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from omni_core import ops
from omni_core.model.omni import MODALITIES, Block, OmniConfig
from omni_core.nn import ModalityLayerNorm


@dataclass(frozen=True)
class DecoderSegment:
    """One modality segment of a masked view: ``length`` positions of the full input, of
    which ``keep`` (sorted, CLS = 0 included) went through the encoder; ``rows`` are the
    indices of those kept tokens in the encoder pass's output."""

    modality: int
    length: int
    keep: torch.Tensor
    rows: torch.Tensor


def decoder_config(cfg: OmniConfig) -> OmniConfig:
    """The released ratios: half the width, 2 layers, FFN 2048/768 of the width, head dim
    of the encoder, no layer scale or drop path (``pretrain_vl_3B.yaml``)."""
    dim = cfg.dim // 2
    head_dim = cfg.dim // cfg.heads
    heads = max(1, dim // head_dim)
    ffn = int(round(dim * 2048 / 768 / 8)) * 8
    return replace(cfg, dim=dim, depth=2, heads=heads, ffn_hidden=ffn, layer_scale_init=None, drop_path=0.0)


class MaskedDecoder(nn.Module):
    def __init__(self, cfg: OmniConfig, position_rows: tuple[int, int, int]) -> None:
        super().__init__()
        dec = decoder_config(cfg)
        M, D, Dd = len(MODALITIES), cfg.dim, dec.dim
        self.cfg = dec
        self.embed_in = nn.ModuleList(nn.Linear(D, Dd) for _ in range(M))
        self.mask_token = nn.Parameter(torch.randn(M, Dd) * 0.02)
        self.position_rows = position_rows
        self.positions = nn.Parameter(torch.randn(sum(position_rows), Dd) * 0.02)
        self.register_buffer("position_offset", torch.tensor([0, *position_rows[:-1]]).cumsum(0), persistent=False)
        self.blocks = nn.ModuleList(Block(dec, drop_path=0.0) for _ in range(dec.depth))
        self.final_norm = ModalityLayerNorm(M, Dd)
        self.heads = nn.ModuleList(nn.Linear(Dd, D) for _ in range(M))

    def forward(self, encoded: torch.Tensor, sequences: list[list[DecoderSegment]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode every masked view of a step in one pass.

        Returns ``(predictions [N, D], modality [N], packed index [N])`` for every masked
        position (CLS and kept positions excluded), in the order of the segments.
        """
        cu, modality, position, rows, dst, masked = self._layout(encoded, sequences)
        device, Dd = encoded.device, self.cfg.dim
        kept_mod = modality[dst].long()
        embedded = torch.empty(dst.numel(), Dd, dtype=encoded.dtype, device=device)
        for m, proj in enumerate(self.embed_in):
            sel = (kept_mod == m).nonzero().flatten()
            if sel.numel():
                # .to: under autocast the projection comes out in bf16, the stream stays fp32
                embedded[sel] = proj(encoded[rows[sel]]).to(embedded.dtype)
        pos_index = self.position_offset[modality.long()] + position.long()
        tokens = self.mask_token[modality.long()].index_copy(0, dst, embedded)
        x = tokens + self.positions[pos_index]
        batch = ops.PackedBatch(x, cu, modality, position, int((cu[1:] - cu[:-1]).max()))
        for block in self.blocks:
            x = block(x, batch, None, None)  # the released decoder has no relative-position bias
        x = self.final_norm(x, batch.modality)[masked]
        mod = batch.modality[masked].long()
        out = torch.empty(masked.numel(), encoded.shape[-1], dtype=x.dtype, device=device)
        for m, head in enumerate(self.heads):
            sel = (mod == m).nonzero().flatten()
            if sel.numel():
                out[sel] = head(x[sel]).to(out.dtype)
        return out, mod, masked

    def _layout(self, encoded: torch.Tensor, sequences: list[list[DecoderSegment]]):
        device = encoded.device
        mods, poss, rows, dst, masked, lengths = [], [], [], [], [], []
        start = 0
        for seq in sequences:
            n = 0
            for seg in seq:
                if seg.length > self.position_rows[seg.modality]:
                    raise ValueError(f"a {MODALITIES[seg.modality]} segment of {seg.length} positions exceeds "
                                     f"the decoder's {self.position_rows[seg.modality]}")
                keep = seg.keep.to(device)
                is_masked = torch.ones(seg.length, dtype=torch.bool, device=device)
                is_masked[keep] = False
                is_masked[0] = False  # CLS is never a prediction target
                mods.append(torch.full((seg.length,), seg.modality, dtype=torch.int32, device=device))
                poss.append(torch.arange(seg.length, dtype=torch.int32, device=device))
                rows.append(seg.rows.to(device))
                dst.append(keep + start + n)
                masked.append(is_masked.nonzero().flatten() + start + n)
                n += seg.length
            lengths.append(n)
            start += n
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        return cu.to(device), torch.cat(mods), torch.cat(poss), torch.cat(rows), torch.cat(dst), torch.cat(masked)
