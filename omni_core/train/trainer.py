"""``omni pretrain``: cross-modal aligning pre-training on image–text–audio triplets.

Each step packs the unimodal text, image and audio sequences of a batch of triplets into
one stream and runs one forward pass. The loss aligns image↔text and audio↔text (CLS →
per-modality projection → L2 norm, a learnable logit scale initialised at 1/0.07 and
clamped at 100, symmetric InfoNCE); image↔audio is never trained, so any image↔audio
retrieval skill is emergent. AdamW (0.9, 0.98), weight decay 0.05, linear warmup then
cosine decay, gradient clipping at 3.0; fp32 on CPU, bf16 autocast on GPU. Steps are packed
up to a token budget by the data layer's collator (or hold a fixed number of triplets).

Runs are exactly resumable: the data order of epoch e is a permutation drawn from
(seed, e); the checkpoint stores model, optimizer, RNG, step, data position and schedule.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from omni_core.data.collator import PackingCollator, fixed_groups
from omni_core.data.sample import Sample
from omni_core.model.omni import AUDIO, IMAGE, TEXT, ModalInputs, OmniConfig, OmniModel, SegmentRef
from omni_core.train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from omni_core.train.data import load_split
from omni_core.train.objectives import info_nce

CHECKPOINT = "checkpoint.safetensors"
FINAL = "model.safetensors"
METRICS = "metrics.csv"
METRIC_FIELDS = ["step", "epoch", "loss", "loss_image_text", "loss_audio_text", "lr", "logit_scale",
                 "tokens", "tokens_per_s", "elapsed_s"]


@dataclass
class TrainArgs:
    data: str
    out: str
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    batch_size: int | None = None  # fixed samples per step; None: pack steps up to token_budget
    token_budget: int = 2800
    lr: float = 2e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 30
    weight_decay: float = 0.05
    grad_clip: float = 3.0
    seed: int = 0
    steps: int | None = None
    minutes: float | None = None
    ckpt_every: int = 50
    loader: str = "auto"
    resume: bool = False
    progress: bool = True


def triplet_inputs(samples: list[Sample], device: torch.device) -> tuple[ModalInputs, list[list[SegmentRef]]]:
    """Inputs and the 3n unimodal sequences (texts, then images, then audio clips)."""
    n = len(samples)
    inputs = ModalInputs(text=[s.token_ids.to(device) for s in samples],
                         image=torch.stack([s.image for s in samples]).to(device),
                         audio=[s.audio.to(device) for s in samples])
    sequences = [[SegmentRef(m, i)] for m in (TEXT, IMAGE, AUDIO) for i in range(n)]
    return inputs, sequences


def triplet_embeddings(model: OmniModel, samples: list[Sample]) -> dict[int, torch.Tensor]:
    """L2-normalised embeddings of each modality of ``samples`` from one packed pass."""
    device = next(model.parameters()).device
    inputs, sequences = triplet_inputs(samples, device)
    features, batch = model(inputs, sequences)
    cls = features[batch.cu_seqlens[:-1].long()]
    n = len(samples)
    return {m: model.project(cls[k * n:(k + 1) * n], m) for k, m in enumerate((TEXT, IMAGE, AUDIO))}


def learning_rate(args: TrainArgs, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay over ``progress`` in [0, 1]."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    floor, progress = args.lr * args.min_lr_ratio, min(1.0, progress)
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: OmniModel, args: TrainArgs) -> torch.optim.AdamW:
    no_decay = ("bias_table", "cls", "pos", "logit_scale")
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.dim() < 2 or any(k in name for k in no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def sample_tokens(model: OmniModel, sample: Sample) -> int:
    """Tokens a triplet puts through the encoder: text, image and audio, each with CLS."""
    image = (model.cfg.image_size // 16) ** 2 + 1
    return sample.token_ids.numel() + 1 + image + model.audio.num_frames(sample.audio.numel()) + 1


def epoch_groups(model: OmniModel, samples: list[Sample], args: TrainArgs, epoch: int) -> list[list[Sample]]:
    """The steps of an epoch: its sample order, drawn from (seed, epoch), cut into fixed
    batches or packed up to the token budget (first-fit-decreasing). A pure function of
    (seed, epoch), so a resumed run sees the same steps."""
    ordered = [samples[i] for i in epoch_order(len(samples), args.seed, epoch).tolist()]
    if args.batch_size:
        groups = list(fixed_groups(ordered, args.batch_size, drop_last=True))
    else:
        groups = list(PackingCollator(args.token_budget, cost=lambda s: sample_tokens(model, s))(ordered))
    return [g for g in groups if len(g) >= 2]  # a contrastive step needs negatives


class MetricsLog:
    """CSV (and TensorBoard when available) metrics; on resume, rows past the checkpoint go."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.path = out / METRICS
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS).writerow(row)
        if self.tb is not None:
            for key in ("loss", "loss_image_text", "loss_audio_text", "lr", "logit_scale", "tokens_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(args: TrainArgs) -> dict:
    if args.steps is None and args.minutes is None:
        raise ValueError("give a budget: --steps or --minutes")
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    if args.resume and not ckpt.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    if args.resume:  # the run's own settings win over the command line
        saved = read_meta(ckpt)["args"]
        args = TrainArgs(**{**saved, "resume": True, "progress": args.progress})

    model = OmniModel.from_preset(args.preset, device=device, **args.overrides)
    optimizer = make_optimizer(model, args)
    train_set = load_split(args.data, "train", model.cfg.image_size, args.loader)
    if len(train_set.samples) < 2 * (args.batch_size or 1):
        raise ValueError(f"{args.data}: only {len(train_set.samples)} usable train samples")
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "elapsed_s": 0.0}
    if args.resume:
        state = load_checkpoint(ckpt, model, optimizer)["state"]
    log = MetricsLog(out, state["step"] if args.resume else None)
    meta = {"args": asdict(args), "config": asdict(model.cfg)}

    # A step budget gives an exactly reproducible (and resumable) run; a time budget decays
    # the learning rate over the elapsed fraction of the budget and stops when it is spent.
    budget_s = args.minutes * 60 if args.minutes is not None else None
    bar = tqdm(total=args.steps if args.steps else int(budget_s), initial=state["step"],
               unit="step" if args.steps else "s", disable=not args.progress, dynamic_ncols=True,
               file=sys.stdout)
    start, elapsed_before = time.perf_counter(), state["elapsed_s"]
    model.train()
    done = False
    while not done:
        groups = epoch_groups(model, train_set.samples, args, state["epoch"])
        for b in range(state["batch_in_epoch"], len(groups)):
            progress = (state["step"] / args.steps if args.steps
                        else state["elapsed_s"] / budget_s)
            lr = learning_rate(args, state["step"], progress)
            row = train_step(model, optimizer, lr, args.grad_clip, groups[b], device)
            state["step"] += 1
            state["batch_in_epoch"] = b + 1
            state["tokens"] += row["tokens"]
            state["elapsed_s"] = elapsed_before + time.perf_counter() - start
            row.update(step=state["step"], epoch=state["epoch"], elapsed_s=round(state["elapsed_s"], 3),
                       tokens_per_s=round(state["tokens"] / max(state["elapsed_s"], 1e-9), 1))
            log.write(row)
            bar.update(1 if args.steps else int(state["elapsed_s"]) - bar.n)
            bar.set_postfix(step=state["step"], loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            done = (state["step"] >= args.steps) if args.steps else state["elapsed_s"] >= budget_s
            if done or state["step"] % args.ckpt_every == 0:
                save_checkpoint(ckpt, model, optimizer, {**meta, "state": state})
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    log.close()
    save_checkpoint(out / FINAL, model, None, {**meta, "state": state, "skipped": train_set.skipped})
    summary = {"steps": state["step"], "epochs": state["epoch"], "tokens": state["tokens"],
               "train_seconds": round(state["elapsed_s"], 1), "final_loss": row["loss"],
               "train_samples": len(train_set.samples), "skipped_samples": len(train_set.skipped),
               "loader": train_set.backend, "skipped": train_set.skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_step(model: OmniModel, optimizer, lr: float, grad_clip: float, samples: list[Sample],
               device: torch.device) -> dict:
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        emb = triplet_embeddings(model, samples)
        loss_it = info_nce(emb[IMAGE].float(), emb[TEXT].float(), model.logit_scale)
        loss_at = info_nce(emb[AUDIO].float(), emb[TEXT].float(), model.logit_scale)
        loss = loss_it + loss_at
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    tokens = sum(sample_tokens(model, s) for s in samples)
    return {"loss": round(loss.item(), 5), "loss_image_text": round(loss_it.item(), 5),
            "loss_audio_text": round(loss_at.item(), 5), "lr": lr,
            "logit_scale": round(model.logit_scale.exp().clamp(max=100).item(), 3), "tokens": tokens}


def load_trained(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[OmniModel, dict]:
    """The model a run wrote (``model.safetensors``, else its latest checkpoint)."""
    run_dir = Path(run_dir)
    path = run_dir / FINAL if (run_dir / FINAL).exists() else run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {FINAL} or {CHECKPOINT} (has the run trained?)")
    meta = read_meta(path)
    with torch.device(device):
        model = OmniModel(OmniConfig(**meta["config"]))
    load_checkpoint(path, model, None)
    return model.eval(), meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset directory (omni data synth --out)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics, model")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--audio-front-end", choices=["conv", "mel"], help="override the preset's")
    p.add_argument("--steps", type=int, help="train this many steps")
    p.add_argument("--minutes", type=float, help="or train for this wall-clock budget")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--token-budget", type=int, default=TrainArgs.token_budget,
                      help="pack each step's triplets up to this many tokens (default)")
    step.add_argument("--batch-size", type=int, help="or a fixed number of triplets per step")
    p.add_argument("--lr", type=float, default=TrainArgs.lr)
    p.add_argument("--warmup-steps", type=int, default=TrainArgs.warmup_steps)
    p.add_argument("--ckpt-every", type=int, default=TrainArgs.ckpt_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loader", choices=["auto", "dali", "pil"], default="auto",
                   help="decoder: DALI when installed (auto), or PIL + soundfile")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    overrides = {"audio_front_end": a.audio_front_end} if a.audio_front_end else {}
    args = TrainArgs(data=a.data, out=a.out, preset=a.preset, overrides=overrides, batch_size=a.batch_size,
                     token_budget=a.token_budget, lr=a.lr, warmup_steps=a.warmup_steps, seed=a.seed,
                     steps=a.steps, minutes=a.minutes,
                     ckpt_every=a.ckpt_every, loader=a.loader, resume=a.resume, progress=not a.no_progress)
    summary = train(args)
    print(f"trained {summary['steps']} steps ({summary['epochs']} epochs, {summary['tokens']:,} tokens) "
          f"in {summary['train_seconds']:.0f} s; final loss {summary['final_loss']:.4f}; "
          f"skipped {summary['skipped_samples']} corrupt samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
