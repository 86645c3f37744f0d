"""``omni pretrain``: pre-training on image–text–audio triplets, one packed pass per step.

The recipe (``--recipe``, :mod:`omni_core.recipes`) decides what a step computes:
``one-peace`` (default) is ONE-PEACE's objective — cross-modal contrast plus the intra-modal
denoising contrast through a 2-layer decoder — with its stages (``--stage 1`` image–text,
``--stage 2`` audio–text with everything but the audio tower frozen, started from a stage-1
run with ``--init RUN``, or ``--stage joint``, our extension training all three at once);
``contrastive`` is plain image–text + audio–text InfoNCE. AdamW (0.9, 0.98), eps 1e-8,
weight decay 0.05 (not on norms, biases, positions or tables), linear warmup then cosine
decay, gradient clipping at 3.0; fp32 on CPU, bf16 autocast on GPU. Steps are packed up to a
token budget by the data layer's collator (or hold a fixed number of triplets).

Runs are exactly resumable: the data order of epoch e is a permutation drawn from
(seed, e), the masks of step s from (seed, s); the checkpoint stores model (and the recipe's
decoder), optimizer, RNG, step, data position and schedule.
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
from omni_core.data.hard_negatives import clustered_order, next_fit
from omni_core.data.sample import Sample
from omni_core.data.tokenizer import load_tokenizer
from omni_core.model.omni import OmniConfig, OmniModel
from omni_core.recipes import RECIPES, Recipe, make_recipe
from omni_core.train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from omni_core.train.data import load_split

CHECKPOINT = "checkpoint.safetensors"
FINAL = "model.safetensors"
METRICS = "metrics.csv"
EVAL_CURVE = "eval_curve.csv"
DECODER_PREFIX = "dcl_decoder."  # the recipe's pre-training decoder inside checkpoints


def metric_fields(recipe: Recipe) -> list[str]:
    return ["step", "epoch", "loss", *recipe.loss_names, "lr", "logit_scale", "tokens", "tokens_per_s", "elapsed_s"]


@dataclass
class TrainArgs:
    data: str
    out: str
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    recipe: str = "one-peace"
    stage: str = "joint"
    init: str | None = None  # a run whose weights start this one (stage 2 from stage 1)
    gather_grad: bool = False
    eval_every_s: float | None = None  # retrieval on the eval split every so many training seconds
    eval_samples: int = 500
    hard_negatives: bool = False  # steps cut from a phrase-clustered order (omni_core.data.hard_negatives)
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


def learning_rate(args: TrainArgs, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay over ``progress`` in [0, 1]."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    floor, progress = args.lr * args.min_lr_ratio, min(1.0, progress)
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ONE-PEACE decays no bias, norm, position table, CLS or relative-position table; the
# modality-stacked biases and norms ([M, D] here) count as what they are, not as matrices.
NO_DECAY = {"pos", "positions", "bias_table", "cls", "cls_pos", "mask_token", "logit_scale", "b_in", "b_out",
            "ln_weight", "ln_bias", "bias"}


def decays(name: str, p: torch.nn.Parameter) -> bool:
    return p.dim() >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY and "norm" not in name


def make_optimizer(model: OmniModel, args: TrainArgs) -> torch.optim.AdamW:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if decays(n, p)], "weight_decay": args.weight_decay},
              {"params": [p for n, p in trainable if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)


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
    if args.hard_negatives:  # related samples adjacent, steps cut in order
        ordered = [samples[i] for i in clustered_order(samples, args.seed, epoch)]
    else:
        ordered = [samples[i] for i in epoch_order(len(samples), args.seed, epoch).tolist()]
    if args.batch_size:
        groups = list(fixed_groups(ordered, args.batch_size, drop_last=True))
    elif args.hard_negatives:
        groups = list(next_fit(ordered, args.token_budget, cost=lambda s: sample_tokens(model, s)))
    else:
        groups = list(PackingCollator(args.token_budget, cost=lambda s: sample_tokens(model, s))(ordered))
    return [g for g in groups if len(g) >= 2]  # a contrastive step needs negatives


class MetricsLog:
    """CSV (and TensorBoard when available) metrics; on resume, rows past the checkpoint go."""

    def __init__(self, out: Path, resume_step: int | None, fields: list[str]) -> None:
        self.path, self.fields = out / METRICS, fields
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)
        if self.tb is not None:
            for key in self.fields[2:]:
                self.tb.add_scalar(f"train/{key}", float(row[key]), row["step"])

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
    recipe = make_recipe(args.recipe, args.stage, load_tokenizer(args.data), args.gather_grad)
    recipe.attach(model)
    if args.init and not args.resume:
        load_weights(run_weights(args.init), model)
    recipe.prepare(model, reset_logit_scale=bool(args.init))
    optimizer = make_optimizer(model, args)
    train_set = load_split(args.data, "train", model.cfg.image_size, args.loader)
    if len(train_set.samples) < 2 * (args.batch_size or 1):
        raise ValueError(f"{args.data}: only {len(train_set.samples)} usable train samples")
    eval_set = load_split(args.data, "eval", model.cfg.image_size, args.loader) if args.eval_every_s else None
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "elapsed_s": 0.0, "next_eval_s": 0.0}
    if args.resume:
        state = {**state, **load_checkpoint(ckpt, model, optimizer)["state"]}
    log = MetricsLog(out, state["step"] if args.resume else None, metric_fields(recipe))
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
            if eval_set is not None and state["elapsed_s"] >= state["next_eval_s"]:
                paused = time.perf_counter()  # evaluation time is not training time
                eval_point(out, model, eval_set.samples[: args.eval_samples], state)
                start += time.perf_counter() - paused
                state["next_eval_s"] = state["elapsed_s"] + args.eval_every_s
            progress = (state["step"] / args.steps if args.steps
                        else state["elapsed_s"] / budget_s)
            lr = learning_rate(args, state["step"], progress)
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + state["step"])
            row = train_step(model, recipe, optimizer, lr, args.grad_clip, groups[b], device, g)
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
    if eval_set is not None:
        eval_point(out, model, eval_set.samples[: args.eval_samples], state)
    save_checkpoint(out / FINAL, model, None, {**meta, "state": state, "skipped": train_set.skipped})
    summary = {"recipe": args.recipe, "stage": args.stage if args.recipe == "one-peace" else None,
               "init": args.init, "steps": state["step"], "epochs": state["epoch"], "tokens": state["tokens"],
               "train_seconds": round(state["elapsed_s"], 1), "final_loss": row["loss"],
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "train_samples": len(train_set.samples), "skipped_samples": len(train_set.skipped),
               "loader": train_set.backend, "skipped": train_set.skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_step(model: OmniModel, recipe: Recipe, optimizer, lr: float, grad_clip: float, samples: list[Sample],
               device: torch.device, g: torch.Generator) -> dict:
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, parts = recipe.step(model, samples, g)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    recipe.after_step(model)
    tokens = sum(sample_tokens(model, s) for s in samples)
    return {"loss": round(loss.item(), 5), **{k: round(v, 5) for k, v in parts.items()}, "lr": lr,
            "logit_scale": round(model.logit_scale.exp().item(), 3), "tokens": tokens}


@torch.no_grad()
def eval_point(out: Path, model: OmniModel, samples: list[Sample], state: dict) -> None:
    """Append retrieval R@1 of every direction at this point of training to eval_curve.csv."""
    from omni_core.eval.retrieval import embed_split, retrieval_metrics

    was_training = model.training
    metrics = retrieval_metrics(embed_split(model, samples))
    model.train(was_training)
    row = {"step": state["step"], "elapsed_s": round(state["elapsed_s"], 1),
           **{name: m["R@1"] for name, m in metrics.items()}}
    path = out / EVAL_CURVE
    if state["step"] == 0 and path.exists():
        path.unlink()
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def run_weights(run_dir: str | Path) -> Path:
    """The weights file of a run: ``model.safetensors``, else its latest checkpoint."""
    run_dir = Path(run_dir)
    path = run_dir / FINAL if (run_dir / FINAL).exists() else run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {FINAL} or {CHECKPOINT} (has the run trained?)")
    return path


def load_weights(path: Path, model: OmniModel) -> None:
    """Load a run's model weights; the recipe's decoder is loaded when the model has one
    and skipped otherwise (evaluation). Anything else missing or unexpected is an error."""
    from safetensors.torch import load_file

    config = asdict(OmniConfig(**read_meta(path)["config"]))
    if config != asdict(model.cfg):
        diff = sorted(k for k in config if config[k] != asdict(model.cfg).get(k))
        raise ValueError(f"{path}: its model config differs from this run's in {diff}")
    tensors = {k[len("model/"):]: v for k, v in load_file(str(path)).items() if k.startswith("model/")}
    if not hasattr(model, "dcl_decoder"):
        tensors = {k: v for k, v in tensors.items() if not k.startswith(DECODER_PREFIX)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith(DECODER_PREFIX)]  # a contrastive run has none
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")


def load_trained(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[OmniModel, dict]:
    """The encoder a run wrote (``model.safetensors``, else its latest checkpoint), in eval mode."""
    path = run_weights(run_dir)
    meta = read_meta(path)
    with torch.device(device):
        model = OmniModel(OmniConfig(**meta["config"]))
    load_weights(path, model)
    return model.eval(), meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset directory (omni data synth --out)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics, model")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--recipe", choices=RECIPES, default=TrainArgs.recipe)
    p.add_argument("--stage", choices=["1", "2", "joint"], default=TrainArgs.stage,
                   help="one-peace: 1 image-text, 2 audio-text (frozen but audio; use --init), joint all three")
    p.add_argument("--init", help="start from this run's weights (e.g. stage 2 from a stage-1 run)")
    p.add_argument("--gather-grad", action="store_true",
                   help="distributed: contrastive negatives from other ranks carry gradient")
    p.add_argument("--eval-every", type=float, help="evaluate retrieval every so many training seconds")
    p.add_argument("--hard-negatives", action="store_true",
                   help="compose steps from samples that share object phrases (token budget only)")
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
    args = TrainArgs(data=a.data, out=a.out, preset=a.preset, overrides=overrides, recipe=a.recipe, stage=a.stage,
                     init=a.init, gather_grad=a.gather_grad, eval_every_s=a.eval_every,
                     hard_negatives=a.hard_negatives, batch_size=a.batch_size,
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
