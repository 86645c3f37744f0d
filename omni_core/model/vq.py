"""A small VQ image tokenizer: the discrete image tokens of OPT's image decoder.

OPT's image decoder predicts 64 discrete tokens per image (an 8×8 grid, ``img_token_len`` in the
release) from a pre-trained discrete VAE. No weights can be downloaded here, so the project trains
its own tokenizer on the dataset's images (``omni vq train``):

    image [3, S, S] ──conv encoder──> z [3·c², 8, 8] ──nearest codebook entry──> codes [64]
        ──codebook lookup──> ẑ ──conv decoder──> image           (c = S / 8 pixels per code cell)

The encoder is a patchify conv (kernel = stride = c) followed by residual blocks over the grid;
the decoder mirrors it with a transposed conv and a full-resolution residual block. Both start as
the exact identity (patchify weights are the identity, each residual branch ends in a zero conv),
and the codebook starts as k-means of the training images' cells: at step 0 the tokenizer is
patch k-means, which already keeps every shape's colour, and training then sharpens it. (A
conventional deep conv VQ-VAE, tried first, reconstructed colourless blobs after the few hundred
steps two shared CPU cores give it in a minute and a half.)

The codebook is then learned with exponential moving averages of the encoder outputs assigned to
each code (VQ-VAE-2's EMA update, no codebook gradient); the encoder gets the decoder's gradient
through the quantiser by the straight-through estimator, plus the commitment loss
β·‖z − sg(ẑ)‖². Codes that no encoder output chose for ``dead_after`` steps are re-seeded from
random encoder outputs of the current batch.

Images enter and leave CLIP-normalised, as :class:`~omni_core.data.sample.Sample` holds them; the
networks work on pixels in [0, 1] shifted by −0.5, and reconstruction quality is reported as PSNR
over pixels in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from omni_core.data.loader import CLIP_MEAN, CLIP_STD, ShardDataset, decode_image, read_manifest

GRID = 8  # codes per image side: 8 × 8 = 64 tokens, OPT's img_token_len
WEIGHTS, CONFIG, SUMMARY = "vq.safetensors", "vq_config.json", "summary.json"


@dataclass(frozen=True)
class VQConfig:
    image_size: int = 64  # pixels per side; a multiple of 8 (a code cell is image_size / 8 pixels)
    channels: int = 64  # width of the residual refinement blocks
    codebook_size: int = 512
    beta: float = 0.25  # commitment weight
    decay: float = 0.95  # EMA decay of the codebook statistics (short CPU runs: fast)
    dead_after: int = 20  # steps without use before a code is re-seeded

    def __post_init__(self) -> None:
        if self.image_size < GRID or self.image_size % GRID:
            raise ValueError(f"VQ image_size must be a positive multiple of {GRID}, got {self.image_size}")

    @property
    def cell(self) -> int:
        """Pixels per side of one code cell."""
        return self.image_size // GRID

    @property
    def code_dim(self) -> int:
        """A code is a cell's pixels: 3 · cell²."""
        return 3 * self.cell**2


class Residual(nn.Module):
    """x + f(x), f's last conv zero-initialised: the block starts as the identity."""

    def __init__(self, ch: int, hidden: int, kernel: int) -> None:
        super().__init__()
        last = nn.Conv2d(hidden, ch, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(nn.Conv2d(ch, hidden, kernel, padding=kernel // 2), nn.ReLU(), last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _patchify(cfg: VQConfig, transpose: bool) -> nn.Module:
    """Conv (or transposed conv) with kernel = stride = cell, initialised to move each cell's pixels
    into (or out of) the channels unchanged."""
    c, d = cfg.cell, cfg.code_dim
    conv = nn.ConvTranspose2d(d, 3, c, stride=c) if transpose else nn.Conv2d(3, d, c, stride=c)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(d).view(d, 3, c, c))  # both layouts are [d, 3, c, c]
        conv.bias.zero_()
    return conv


def make_encoder(cfg: VQConfig) -> nn.Sequential:
    """Cell pixels → code vectors: patchify, then 1×1 and 3×3 (neighbouring cells) residual blocks."""
    d, h = cfg.code_dim, cfg.channels
    return nn.Sequential(_patchify(cfg, False), Residual(d, h, 1), Residual(d, h, 3))


def make_decoder(cfg: VQConfig) -> nn.Sequential:
    """Code vectors → pixels: residual blocks on the grid, un-patchify, a full-resolution 3×3
    residual block that smooths the seams between cells."""
    d, h = cfg.code_dim, cfg.channels
    return nn.Sequential(Residual(d, h, 3), Residual(d, h, 3), _patchify(cfg, True), Residual(3, 16, 3))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised → [0, 1]."""
    return images * CLIP_STD.to(images) + CLIP_MEAN.to(images)


def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] → CLIP-normalised."""
    return (pixels - CLIP_MEAN.to(pixels)) / CLIP_STD.to(pixels)


def psnr(reconstructed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of pixels in [0, 1] (reconstruction clamped to the range)."""
    mse = (reconstructed.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class VQTokenizer(nn.Module):
    """Images ↔ 64 discrete codes. ``encode``/``decode`` take and give CLIP-normalised images."""

    def __init__(self, cfg: VQConfig = VQConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg)
        self.decoder = make_decoder(cfg)
        # EMA state: the codebook is ema_sum / ema_count (Laplace-smoothed), updated in training only
        self.register_buffer("codebook", torch.randn(cfg.codebook_size, cfg.code_dim))
        self.register_buffer("ema_count", torch.ones(cfg.codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("last_used", torch.zeros(cfg.codebook_size, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def tokens_per_image(self) -> int:
        return GRID * GRID

    # -- the public contract ---------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        S = self.cfg.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1:] != (3, S, S):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"VQ tokenizer expects CLIP-normalised images [N, 3, {S}, {S}] (it was trained at "
                             f"{S} px), got {got}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be floating point (CLIP-normalised), got {images.dtype}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [N, 3, S, S] → int64 codes [N, 64] (row-major over the 8×8 grid)."""
        self._check_images(images)
        z = self.encoder(self._input(images))
        return self.nearest(z.permute(0, 2, 3, 1).reshape(-1, self.cfg.code_dim)).view(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes [N, 64] → CLIP-normalised images [N, 3, S, S] (pixels clamped to [0, 1])."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] != GRID * GRID:
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes must be [N, {GRID * GRID}], got {got}")
        if codes.dtype.is_floating_point or codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must be integers in [0, {self.codebook_size}), got dtype {codes.dtype}"
                             + (f", range [{int(codes.min())}, {int(codes.max())}]" if codes.numel() else ""))
        return from_pixels(self.decode_pixels(codes))

    def decode_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [N, 64] → pixels in [0, 1]."""
        z = self.codebook[codes.long()].view(codes.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2)
        return (self.decoder(z) + 0.5).clamp(0, 1)

    # -- training ------------------------------------------------------------------------
    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return to_pixels(images.float()) - 0.5

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (squared L2) of each row of z [M, C]."""
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)
        return dist.argmin(1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass on pixels in [0, 1]: (reconstruction − 0.5, commitment loss, codes [N, 64]).
        Call :meth:`init_codebook` first."""
        z = self.encoder(pixels - 0.5)
        N, C = z.shape[:2]
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        codes = self.nearest(flat.detach())
        quant = self.codebook[codes]
        if self.training:
            self._ema_update(flat.detach(), codes)
        commit = F.mse_loss(flat, quant)
        quant = flat + (quant - flat).detach()  # straight-through: the decoder's gradient goes to the encoder
        recon = self.decoder(quant.view(N, GRID, GRID, C).permute(0, 3, 1, 2))
        return recon, commit, codes.view(N, -1)

    @torch.no_grad()
    def init_codebook(self, pixels: torch.Tensor, iters: int = 10) -> None:
        """k-means of the encoder's outputs on ``pixels`` (in [0, 1]) as the starting codebook (a
        random codebook leaves most codes unused and the rest far from the data)."""
        z = self.encoder(pixels - 0.5)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if flat.shape[0] < self.codebook_size:
            raise ValueError(f"k-means needs at least {self.codebook_size} vectors, got {flat.shape[0]}")
        self.codebook.copy_(flat[torch.randperm(flat.shape[0])[: self.codebook_size]])
        for _ in range(iters):
            codes = self.nearest(flat)
            sums = torch.zeros_like(self.codebook).index_add_(0, codes, flat)
            counts = torch.bincount(codes, minlength=self.codebook_size).to(flat)
            empty = counts == 0
            self.codebook[~empty] = sums[~empty] / counts[~empty, None]
            self.codebook[empty] = flat[torch.randint(flat.shape[0], (int(empty.sum()),))]
        self.ema_sum.copy_(self.codebook)
        self.ema_count.fill_(1.0)
        self.last_used.fill_(int(self.step))

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        cfg = self.cfg
        self.step += 1
        onehot = F.one_hot(codes, cfg.codebook_size).type_as(flat)
        self.ema_count.mul_(cfg.decay).add_(onehot.sum(0), alpha=1 - cfg.decay)
        self.ema_sum.mul_(cfg.decay).add_(onehot.t() @ flat, alpha=1 - cfg.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + cfg.codebook_size * 1e-5) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self.last_used[codes.unique()] = self.step
        dead = (self.step - self.last_used > cfg.dead_after).nonzero().flatten()
        if dead.numel():  # re-seed unused codes at random encoder outputs of this batch
            pick = flat[torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)]
            self.codebook[dead] = pick
            self.ema_sum[dead] = pick
            self.ema_count[dead] = 1.0
            self.last_used[dead] = self.step

    # -- files ---------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        (out / CONFIG).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> VQTokenizer:
        """The tokenizer ``save`` (or ``omni vq train``) wrote to directory ``path``, in eval mode."""
        root = Path(path)
        hint = f"train one with `omni vq train --data DATA --out {root}`"
        if not root.is_dir():
            raise FileNotFoundError(f"no VQ tokenizer at {root}: the directory does not exist ({hint})")
        for name in (CONFIG, WEIGHTS):
            if not (root / name).is_file():
                raise FileNotFoundError(f"no VQ tokenizer at {root}: {name} is missing ({hint})")
        try:
            cfg = VQConfig(**json.loads((root / CONFIG).read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"VQ tokenizer config {root / CONFIG} is corrupt: {err}") from err
        model = cls(cfg)
        try:
            state = load_file(str(root / WEIGHTS), device=str(device))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"VQ tokenizer weights {root / WEIGHTS} are corrupt or truncated: {err}") from err
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"VQ tokenizer weights {root / WEIGHTS} do not match {root / CONFIG}: {err}") from err
        return model.to(device).eval()


# -- omni vq train ------------------------------------------------------------------------------
def load_pixels(data: str | Path, split: str, image_size: int, limit: int | None = None) -> torch.Tensor:
    """The split's images as uint8 [N, 3, S, S] (the JPEG member only: audio is not decoded)."""
    ds = ShardDataset(data, split, image_size=image_size)
    out = []
    for _, _, members in ds.iter_records(0):
        if "jpg" not in members:
            continue
        try:
            img = decode_image(members["jpg"], image_size)
        except (OSError, ValueError, SyntaxError):
            continue  # the loader skips and reports such samples; the tokenizer just does without
        out.append((to_pixels(img) * 255).round().clamp(0, 255).to(torch.uint8))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{data} has no decodable {split} images")
    return torch.stack(out)


@torch.no_grad()
def evaluate_psnr(vq: VQTokenizer, pixels: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
    """Mean PSNR of encode → decode over uint8 images, and the share of the codebook in use."""
    vq.eval()
    scores, used = [], set()
    for i in range(0, len(pixels), batch_size):
        x = pixels[i:i + batch_size].float() / 255
        codes = vq.encode(from_pixels(x))
        used.update(codes.unique().tolist())
        scores.append(psnr(vq.decode_pixels(codes), x))
    return {"psnr": round(torch.cat(scores).mean().item(), 3), "codebook_usage": round(len(used) / vq.codebook_size, 4)}


@dataclass
class VQTrainArgs:
    data: str
    out: str
    minutes: float | None = 1.5
    steps: int | None = None
    image_size: int | None = None  # default: the dataset's
    batch_size: int = 32
    lr: float = 5e-4
    seed: int = 0
    codebook_size: int = 512
    max_train_images: int | None = None


def train_vq(args: VQTrainArgs, log=print) -> dict:
    """Train a tokenizer on the train split for a step or wall-clock budget; write it and summary.json."""
    if args.steps is None and args.minutes is None:
        raise ValueError("give a training budget: steps or minutes")
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        raise ValueError("the training budget must be positive")
    size = args.image_size or read_manifest(args.data)["image_size"]
    cfg = VQConfig(image_size=size, codebook_size=args.codebook_size)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    train = load_pixels(args.data, "train", size, args.max_train_images)
    held = load_pixels(args.data, "eval", size)
    log(f"vq: {len(train)} train / {len(held)} eval images at {size} px loaded in {time.perf_counter() - t0:.1f} s")
    vq = VQTokenizer(cfg).train()
    opt = torch.optim.Adam(vq.parameters(), lr=args.lr)
    budget = args.minutes * 60 if args.minutes is not None else None
    vq.init_codebook(train[torch.randperm(len(train))[:256]].float() / 255)
    log(f"vq: k-means codebook: eval PSNR {evaluate_psnr(vq, held)['psnr']:.2f} dB before training")
    vq.train()
    start, step, recon_loss = time.perf_counter(), 0, float("nan")
    while True:
        elapsed = time.perf_counter() - start
        done = step / args.steps if args.steps is not None else elapsed / budget
        if done >= 1:
            break
        for group in opt.param_groups:  # short warm-up, then cosine to 5% over the budget
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))
        idx = torch.tensor(rng.sample(range(len(train)), min(args.batch_size, len(train))))
        x = train[idx].float() / 255
        recon, commit, _ = vq(x)
        recon_loss = F.mse_loss(recon + 0.5, x)
        loss = recon_loss + cfg.beta * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"vq: step {step}  recon mse {recon_loss.item():.5f}  {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    result = evaluate_psnr(vq, held)
    vq.save(args.out)
    summary = {"eval_psnr": result["psnr"], "codebook_usage": result["codebook_usage"],
               "train_psnr_sample": evaluate_psnr(vq, train[:len(held)])["psnr"], "steps": step,
               "train_seconds": round(seconds, 1), "train_images": len(train), "eval_images": len(held),
               "image_size": size, "codebook_size": cfg.codebook_size, "tokens_per_image": GRID * GRID,
               "batch_size": args.batch_size, "seed": args.seed, "data": str(args.data),
               "threads": torch.get_num_threads()}
    (Path(args.out) / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"vq: {step} steps in {seconds:.0f} s; eval PSNR {summary['eval_psnr']:.2f} dB, codebook usage "
        f"{summary['codebook_usage']:.0%}; wrote {args.out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni vq train", description="train the VQ image tokenizer of OPT's image decoder")
    p.add_argument("--data", required=True, help="dataset directory (omni data synth --out)")
    p.add_argument("--out", required=True, help="directory for the tokenizer (vq.safetensors, summary.json)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock training budget (default 1.5)")
    budget.add_argument("--steps", type=int, help="or a number of steps")
    p.add_argument("--image-size", type=int, help="pixels per side (default: the dataset's; 8 * 2^k)")
    p.add_argument("--batch-size", type=int, default=VQTrainArgs.batch_size)
    p.add_argument("--codebook-size", type=int, default=VQTrainArgs.codebook_size)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    minutes = a.minutes if a.minutes is not None or a.steps is not None else VQTrainArgs.minutes
    train_vq(VQTrainArgs(data=a.data, out=a.out, minutes=minutes, steps=a.steps, image_size=a.image_size,
                         batch_size=a.batch_size, seed=a.seed, codebook_size=a.codebook_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
