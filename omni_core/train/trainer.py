"""``omni pretrain``: pre-training on image–text–audio triplets, one packed pass per step.

The recipe (``--recipe``, :mod:`omni_core.recipes`) decides what a step computes:
``one-peace`` (default) is ONE-PEACE's objective — cross-modal contrast plus the intra-modal
denoising contrast through a 2-layer decoder — with its stages (``--stage 1`` image–text,
``--stage 2`` audio–text with everything but the audio tower frozen, started from a stage-1
run with ``--init RUN``, or ``--stage joint``, our extension training all three at once);
``contrastive`` is plain image–text + audio–text InfoNCE. AdamW (0.9, 0.98), eps 1e-8,
weight decay 0.05 (not on norms, biases, positions or tables), linear warmup then cosine
decay, gradient clipping at 3.0; ``--precision auto`` (default) runs the step under bf16 autocast
where the device computes bf16 natively (a GPU, or a CPU with AVX512-BF16 / AMX) and fp32
elsewhere (:mod:`omni_core.precision`); weights and optimizer state stay fp32. Steps are packed up to a
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from omni_core.data.collator import PackingCollator, fixed_groups
from omni_core.data.hard_negatives import clustered_order, next_fit
from omni_core.data.sample import Sample
from omni_core.data.tokenizer import load_tokenizer
from omni_core.model.omni import OmniConfig, OmniModel
from omni_core.precision import Precision, add_precision_argument, resolve_precision
from omni_core.recipes import RECIPES, Recipe, make_recipe
from omni_core.train import dist
from omni_core.train.checkpoint import (
    latest_sharded,
    load_checkpoint,
    load_sharded,
    read_meta,
    read_sharded_meta,
    save_checkpoint,
    save_full_model,
    save_sharded,
)
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
    # distributed running (omni_core.train.dist): how this launch runs, not what the run is
    dist: str = "auto"  # auto: ddp under torchrun with several ranks, else none
    checkpoint_activations: bool = False
    compile: bool = False
    dist_timeout: float | None = None  # None: $OMNI_DIST_TIMEOUT, else dist.DEFAULT_TIMEOUT_S
    accum: int = 1  # micro-steps per optimizer step
    stream: bool = False  # stream shards per rank (omni_core.data.stream) instead of decoding the split once
    ranks: int | None = None  # world size the global step is defined for (set when the run starts)
    precision: str = "auto"  # auto | fp32 | bf16 (omni_core.precision)
    vq: str | None = None  # opt: the image tokenizer's directory (omni vq train)
    tasks: str | None = None  # opt: comma-separated task names (default: the nine)
    task_weights: str | None = None  # opt: one weight per task (default: 1 each)
    task_mix: str = "sum"  # opt: sum every task's weighted loss each step, or sample one task per step


LAUNCH_FIELDS = ("dist", "checkpoint_activations", "compile", "dist_timeout", "progress")


def learning_rate(args: TrainArgs, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay over ``progress`` in [0, 1]."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    floor, progress = args.lr * args.min_lr_ratio, min(1.0, progress)
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ONE-PEACE decays no bias, norm, position table, CLS or relative-position table; the
# modality-stacked biases and norms ([M, D] here) count as what they are, not as matrices.
NO_DECAY = {"pos", "positions", "bias_table", "cls", "cls_pos", "mask_token", "mask_embed", "type_embed",
            "logit_scale", "b_in", "b_out",
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
    info = dist.init_distributed(args.dist_timeout)
    device = info.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    sharded = latest_sharded(out) if args.resume else None  # a run saved with torch.distributed.checkpoint
    if args.resume and not ckpt.exists() and sharded is None:
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt} or {out / 'dcp'}")
    if args.resume:  # the run's own settings win over the command line (but not how this launch runs)
        saved = read_sharded_meta(sharded)["args"] if sharded else read_meta(ckpt)["args"]
        args = TrainArgs(**{**saved, "resume": True, **{k: getattr(args, k) for k in LAUNCH_FIELDS}})
    args.ranks = args.ranks or info.world_size
    mode = dist.resolve_mode(args.dist, info.world_size)
    use_sharded = sharded is not None or mode != "none"  # sharded checkpoints once distributed

    if args.recipe == "opt" and (args.init or args.eval_every_s):
        raise ValueError("--recipe opt does not take --init or --eval-every (evaluate with omni eval --recipe opt)")
    recipe = make_recipe(args.recipe, args.stage, load_tokenizer(args.data), args.gather_grad, args.vq, args.tasks,
                         args.task_weights, args.task_mix)
    if hasattr(recipe, "build_model"):  # a recipe that trains another model family (opt)
        model = recipe.build_model(args.preset, device, args.overrides)
    else:
        model = OmniModel.from_preset(args.preset, device=device, **args.overrides)
    recipe.attach(model)
    if args.init and not args.resume:
        load_weights(run_weights(args.init), model)
    recipe.prepare(model, reset_logit_scale=bool(args.init))
    runner = dist.wrap_model(model, mode, args.checkpoint_activations, args.compile)
    precision = resolve_precision(args.precision, device)
    if info.is_main:
        print(f"precision: {precision.description}", flush=True)
    optimizer = make_optimizer(model, args)  # after wrapping: FSDP2 replaces the parameters
    data, train_set = train_data(model, args, info)
    eval_set = load_split(args.data, "eval", model.cfg.image_size, args.loader) if args.eval_every_s else None
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "elapsed_s": 0.0, "next_eval_s": 0.0}
    if args.resume and sharded:
        saved_meta, rank_state = load_sharded(sharded, model, optimizer)
        state = {**state, **saved_meta["state"]}
        data.resume(rank_state, state)
    elif args.resume:
        state = {**state, **load_checkpoint(ckpt, model, optimizer)["state"]}
    log = (MetricsLog(out, state["step"] if args.resume else None, metric_fields(recipe)) if info.is_main
           else dist.NullLog())
    meta = {"args": asdict(args), "config": asdict(model.cfg)}

    # A step budget gives an exactly reproducible (and resumable) run; a time budget decays
    # the learning rate over the elapsed fraction of the budget and stops when it is spent.
    budget_s = args.minutes * 60 if args.minutes is not None else None
    bar = tqdm(total=args.steps if args.steps else int(budget_s), initial=state["step"],
               unit="step" if args.steps else "s", disable=not args.progress or not info.is_main, dynamic_ncols=True,
               file=sys.stdout)
    start, elapsed_before = time.perf_counter(), state["elapsed_s"]
    model.train()
    done = False
    while not done:
        for micro, position in data.epoch(state):
            if eval_set is not None and state["elapsed_s"] >= state["next_eval_s"]:  # every rank (FSDP2)
                paused = time.perf_counter()  # evaluation time is not training time
                eval_point(out, model, eval_set.samples[: args.eval_samples], state, runner, info.is_main)
                start += time.perf_counter() - paused
                state["next_eval_s"] = state["elapsed_s"] + args.eval_every_s
            progress = (state["step"] / args.steps if args.steps
                        else state["elapsed_s"] / budget_s)
            lr = learning_rate(args, state["step"], progress)
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + state["step"] + 104_729 * info.rank)
            row = train_step(model, recipe, optimizer, lr, args.grad_clip, micro, device, g, runner, precision)
            # the clock is averaged over ranks with the metrics: every rank takes the same time-based
            # decisions (evaluate, stop), or one would wait for the others' collectives
            row = dist.reduce_row({**row, "elapsed_s": elapsed_before + time.perf_counter() - start})
            state["step"] += 1
            state.update(position)
            state["tokens"] += row["tokens"]
            state["elapsed_s"] = row["elapsed_s"]
            row.update(step=state["step"], epoch=state["epoch"], elapsed_s=round(state["elapsed_s"], 3),
                       tokens_per_s=round(state["tokens"] / max(state["elapsed_s"], 1e-9), 1))
            log.write(row)
            bar.update(1 if args.steps else int(state["elapsed_s"]) - bar.n)
            bar.set_postfix(step=state["step"], loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            done = (state["step"] >= args.steps) if args.steps else state["elapsed_s"] >= budget_s
            if (done or state["step"] % args.ckpt_every == 0) and use_sharded:
                save_sharded(out, state["step"], model, optimizer, {**meta, "state": state}, data.rank_state(),
                             keep=2)
            elif done or state["step"] % args.ckpt_every == 0:
                save_checkpoint(ckpt, model, optimizer, {**meta, "state": state})
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    log.close()
    if eval_set is not None:
        eval_point(out, model, eval_set.samples[: args.eval_samples], state, runner, info.is_main)
    skipped = [str(s) for s in data.loader.skipped] if args.stream else train_set.skipped
    skipped_total = int(dist.reduce_row({"tokens": len(skipped)})["tokens"])  # summed over ranks
    if use_sharded:
        save_full_model(out / FINAL, model, {**meta, "state": state, "skipped": skipped})
    else:
        save_checkpoint(out / FINAL, model, None, {**meta, "state": state, "skipped": skipped})
    summary = {"recipe": args.recipe, "stage": args.stage if args.recipe == "one-peace" else None,
               "init": args.init, "steps": state["step"], "epochs": state["epoch"], "tokens": state["tokens"],
               "train_seconds": round(state["elapsed_s"], 1), "final_loss": row["loss"],
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "train_samples": len(train_set.samples) if train_set else data.loader.num_samples,
               "skipped_samples": skipped_total, "loader": train_set.backend if train_set else data.loader.backend,
               "skipped": skipped, "ranks": info.world_size, "dist": mode, "precision": precision.name,
               "precision_reason": precision.description}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def train_data(model: OmniModel, args: TrainArgs, info: dist.DistInfo):
    """(the rank's step source, the in-memory split or None when streaming)."""
    if args.stream:
        from omni_core.data.stream import StreamingLoader

        def cut(samples: list[Sample]) -> list[list[Sample]]:
            groups = (fixed_groups(samples, args.batch_size, drop_last=True) if args.batch_size else
                      PackingCollator(args.token_budget, cost=lambda s: sample_tokens(model, s))(samples))
            return [g for g in groups if len(g) >= 2]

        loader = StreamingLoader(args.data, "train", cut, rank=info.rank, world_size=info.world_size,
                                 image_size=model.cfg.image_size, seed=args.seed, backend=args.loader,
                                 train_crop=True)
        return dist.StreamSteps(loader, args.accum), None
    train_set = load_split(args.data, "train", model.cfg.image_size, args.loader)
    if len(train_set.samples) < 2 * (args.batch_size or 1):
        raise ValueError(f"{args.data}: only {len(train_set.samples)} usable train samples")
    per_rank = replace(args, batch_size=args.batch_size and args.batch_size * args.ranks,
                       token_budget=args.token_budget * args.ranks)  # one global step of every rank's share
    steps = dist.CachedSteps(lambda epoch: epoch_groups(model, train_set.samples, per_rank, epoch), args.accum)
    return steps, train_set


def train_step(model: OmniModel, recipe: Recipe, optimizer, lr: float, grad_clip: float,
               micro: list[Sample] | list[list[Sample]], device: torch.device, g: torch.Generator,
               runner=None, precision: Precision | None = None) -> dict:
    """One optimizer step over a batch, or over ``micro`` batches (gradient accumulation: each
    micro-batch's loss / K; the DDP / FSDP2 reduction runs on the last). ``runner``
    (dist.wrap_model) runs the recipe inside the DDP / FSDP2 forward; logged losses are the
    micro-batches' mean. ``precision`` is the forward's autocast (default: fp32)."""
    if micro and isinstance(micro[0], Sample):
        micro = [micro]
    for group in optimizer.param_groups:
        group["lr"] = lr
    runner = runner if runner is not None else dist.StepRunner(model)
    optimizer.zero_grad(set_to_none=True)
    losses, parts_sum = [], {}
    for k, samples in enumerate(micro):
        gk = g if k == 0 else torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        with dist.accumulate(runner, sync=k == len(micro) - 1):
            with (precision or resolve_precision("fp32")).autocast(device):
                loss_k, parts_k = runner(recipe.step, samples, gk)
            (loss_k / len(micro) if len(micro) > 1 else loss_k).backward()
        losses.append(loss_k.detach())
        parts_sum = {n: parts_sum.get(n, 0.0) + v / len(micro) for n, v in parts_k.items()}
    loss, parts = torch.stack(losses).mean(), parts_sum if len(micro) > 1 else parts_k
    samples = [s for m in micro for s in m]
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    recipe.after_step(model)
    tokens = sum(sample_tokens(model, s) for s in samples)
    return {"loss": round(loss.item(), 5), **{k: round(v, 5) for k, v in parts.items()}, "lr": lr,
            "logit_scale": round(model.logit_scale.exp().item(), 3) if hasattr(model, "logit_scale") else float("nan"),
            "tokens": tokens}


@torch.no_grad()
def eval_point(out: Path, model: OmniModel, samples: list[Sample], state: dict, runner=None,
               write: bool = True) -> None:
    """Append retrieval R@1 of every direction at this point of training to eval_curve.csv (when
    ``write``). Distributed, every rank calls it (FSDP2 gathers the weights with collectives);
    each embeds every sample, so rank 0 is not late for the next step."""
    from omni_core.eval.retrieval import embed_split, retrieval_metrics

    was_training = model.training
    emb = dist.run_outside_step(runner, embed_split, samples) if runner is not None else embed_split(model, samples)
    model.train(was_training)
    if not write:
        return
    metrics = retrieval_metrics(emb)
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
    p.add_argument("--preset", help="model size (default: tiny; opt-tiny for --recipe opt)")
    p.add_argument("--recipe", choices=RECIPES, default=TrainArgs.recipe)
    p.add_argument("--stage", choices=["1", "2", "joint"], default=TrainArgs.stage,
                   help="one-peace: 1 image-text, 2 audio-text (frozen but audio; use --init), joint all three")
    p.add_argument("--init", help="start from this run's weights (e.g. stage 2 from a stage-1 run)")
    p.add_argument("--vq", help="opt: the image tokenizer's directory (omni vq train --out)")
    p.add_argument("--tasks", help="opt: comma-separated tasks (default mlm,mrc,mrfr,mrct,mafr,mac,itm,td,id)")
    p.add_argument("--task-weights", help="opt: comma-separated weights, one per task (default 1 each)")
    p.add_argument("--task-mix", choices=["sum", "sample"], default=TrainArgs.task_mix,
                   help="opt: every task every step, weighted (sum), or one task per step drawn by weight, "
                        "the release's mix ratio (sample)")
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
    d = p.add_argument_group("distributed (launch under torchrun --nproc-per-node N; see README 'Multi-node')")
    d.add_argument("--dist", choices=["auto", "none", "ddp", "fsdp"], default="auto",
                   help="auto: DDP when torchrun started several ranks")
    d.add_argument("--checkpoint-activations", action="store_true", help="recompute each block in backward")
    d.add_argument("--compile", action="store_true", help="torch.compile each block")
    d.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step (gradient accumulation)")
    d.add_argument("--dist-timeout", type=float,
                   help=f"seconds a rank waits for the others before failing (default {dist.DEFAULT_TIMEOUT_S:.0f})")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--stream", action="store_true", help="stream disjoint shards per rank (large sets)")
    src.add_argument("--cache", action="store_true", help="decode the split once into memory (default)")
    add_precision_argument(p)
    a = p.parse_args(argv)
    if a.accum < 1:
        p.error("--accum must be >= 1")
    overrides = {"audio_front_end": a.audio_front_end} if a.audio_front_end else {}
    preset = a.preset or ("opt-tiny" if a.recipe == "opt" else TrainArgs.preset)
    args = TrainArgs(data=a.data, out=a.out, preset=preset, overrides=overrides, recipe=a.recipe, stage=a.stage,
                     init=a.init, gather_grad=a.gather_grad, eval_every_s=a.eval_every,
                     hard_negatives=a.hard_negatives, batch_size=a.batch_size,
                     token_budget=a.token_budget, lr=a.lr, warmup_steps=a.warmup_steps, seed=a.seed,
                     steps=a.steps, minutes=a.minutes,
                     ckpt_every=a.ckpt_every, loader=a.loader, resume=a.resume, progress=not a.no_progress,
                     dist=a.dist, checkpoint_activations=a.checkpoint_activations, compile=a.compile,
                     dist_timeout=a.dist_timeout, accum=a.accum, stream=a.stream,
                     precision=a.precision, vq=a.vq, tasks=a.tasks, task_weights=a.task_weights,
                     task_mix=a.task_mix)
    try:
        with dist.peer_guard(a.dist_timeout):
            summary = train(args)
        main_rank = dist.rank() == 0
    finally:
        dist.shutdown()
    if not main_rank:
        return 0
    print(f"trained {summary['steps']} steps ({summary['epochs']} epochs, {summary['tokens']:,} tokens) "
          f"in {summary['train_seconds']:.0f} s; final loss {summary['final_loss']:.4f}; "
          f"skipped {summary['skipped_samples']} corrupt samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
