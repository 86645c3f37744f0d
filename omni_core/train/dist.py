"""Distributed running on PyTorch's own engine: torchrun process groups, DDP / FSDP2 wrapping,
gradient accumulation, cross-rank gathers for contrastive negatives, metric averaging.

Launch any entry point under ``torchrun --nproc-per-node N`` and call :func:`init_distributed`:
it reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…),
picks nccl on CUDA and gloo on CPU, and gives every collective a timeout, so a rank that dies or
hangs makes the others fail with :class:`PeerLost` instead of waiting forever. Without torchrun's
environment everything here degrades to single-process no-ops.

Models are wrapped by :func:`wrap_model` into a :class:`StepRunner`: ``runner(fn, *args)`` runs
``fn(model, *args)`` as the runner's forward. DDP synchronises gradients and FSDP2 unshards the
root's parameters only for work done inside a forward, and a pre-training step calls the model's
``embed`` / ``encode`` / ``project`` directly, so a step's whole loss computation goes through
the runner.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "ddp", "fsdp")
DEFAULT_TIMEOUT_S = 300.0


class PeerLost(RuntimeError):
    """Another rank died or stopped answering within the collective timeout."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join torchrun's process group (if launched by torchrun) and pick this rank's device.

    The backend is nccl when CUDA is available, gloo otherwise. ``timeout_s`` (default: the
    ``OMNI_DIST_TIMEOUT`` environment variable, else 300 s) bounds every collective: a rank
    blocked on a dead or hung peer raises instead of hanging.
    """
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda" if cuda else "cpu"), None)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if timeout_s is None:
        timeout_s = float(os.environ.get("OMNI_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not is_distributed():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def peer_guard(timeout_s: float | None = None) -> Iterator[None]:
    """Turn a failed collective (a peer died, or hung past the timeout) into one clear error."""
    try:
        yield
    except (dist.DistError, RuntimeError) as err:
        if not is_distributed() or isinstance(err, PeerLost) or not _is_comm_error(err):
            raise
        limit = timeout_s or float(os.environ.get("OMNI_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        raise PeerLost(f"rank {rank()} of {world_size()}: lost contact with another rank (it died, or hung "
                       f"past the {limit:.0f} s collective timeout); stopping. Cause: "
                       f"{str(err).splitlines()[0][:300]}") from err


def _is_comm_error(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


# ---------------------------------------------------------------- wrapping
class StepRunner(nn.Module):
    """``runner(fn, *args)`` = ``fn(model, *args)``, run as this module's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def unwrap(runner: nn.Module) -> nn.Module:
    """The model inside a runner (DDP-wrapped or not)."""
    inner = runner.module if isinstance(runner, nn.parallel.DistributedDataParallel) else runner
    return inner.model if isinstance(inner, StepRunner) else inner


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Activation checkpointing per block: each block's forward recomputes in backward."""
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def wrap_model(model: nn.Module, mode: str = "none", checkpoint_activations: bool = False,
               compile: bool | str = False, find_unused_parameters: bool = True) -> nn.Module:
    """A :class:`StepRunner` around ``model``: plain, DDP, or FSDP2.

    ``fsdp``: ``fully_shard`` on every block of ``model.blocks``, then on the root (adapters,
    norms, heads); bf16 parameters with fp32 gradient reduction on CUDA, fp32 on CPU. Scalar
    parameters (the logit scale) cannot be sharded: they stay replicated and their gradient is
    averaged across ranks by a hook. ``ddp``: ``find_unused_parameters`` because a step may leave
    a modality's FFN unused. ``checkpoint_activations`` recomputes each block in backward;
    ``compile`` (True, or a torch.compile backend name) compiles each block.
    """
    if mode not in MODES:
        raise ValueError(f"unknown distribution mode {mode!r}; choose one of {MODES}")
    if mode != "none" and not is_distributed():
        raise RuntimeError(f"--dist {mode} needs a process group: launch under torchrun "
                           f"(torchrun --nproc-per-node N ...) or use --dist none")
    blocks = getattr(model, "blocks", None)
    if (checkpoint_activations or compile or mode == "fsdp") and not isinstance(blocks, nn.ModuleList):
        raise ValueError("wrap_model needs a model with a `blocks` ModuleList")
    if checkpoint_activations:
        checkpoint_blocks(blocks)
    if compile:
        for block in blocks:
            block.compile(backend=compile if isinstance(compile, str) else "inductor")
    runner = StepRunner(model)
    if mode == "ddp":
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    if mode == "fsdp":
        _fully_shard(runner, blocks)
    return runner


def _fully_shard(runner: StepRunner, blocks: nn.ModuleList) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(runner.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    # fully_shard replaces every parameter with a new (sharded) one: gradient hooks registered before
    # wrapping (a recipe freezing rows) move to the replacement, where FSDP2 calls them after the
    # reduce-scatter with the sharded gradient (see local_rows)
    hooks = {name: list((p._post_accumulate_grad_hooks or {}).values()) for name, p in runner.named_parameters()}
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    scalars = {p for p in runner.parameters() if p.dim() == 0}
    fully_shard(runner, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    for name, p in runner.named_parameters():
        if p not in scalars:
            for hook in hooks.get(name, []):
                p.register_post_accumulate_grad_hook(hook)
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's rows of ``t`` (a view: writes land in ``t``) and the global index of the first.

    A plain tensor is all rows: ``(t, 0)``. A parameter or gradient FSDP2 sharded on dim 0 holds
    the rows ``torch.chunk`` gives this rank: ``ceil(rows / W)`` each, the last ranks fewer or none.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t, 0
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(f"local_rows needs a tensor sharded on dim 0 over a 1-D mesh, got {t.placements}")
    with torch.no_grad():
        local = t.to_local()
    per_rank = -(-t.shape[0] // t.device_mesh.size())
    return local, min(t.device_mesh.get_local_rank() * per_rank, t.shape[0])


def _average_grad(p: torch.Tensor) -> None:
    # averaging an already-averaged accumulated value is a no-op, so this is right under accumulation
    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
    if dist.get_backend() != "nccl":  # gloo has no AVG
        p.grad.div_(world_size())


def run_outside_step(runner: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(model, *args)`` outside a training step (evaluation), without gradients.

    Under FSDP2 it runs inside the runner's forward, where the sharded parameters are gathered by
    collectives: every rank must make the same call. The root's parameters are resharded after
    it (they stay gathered after a forward that no backward follows). Otherwise it runs on the
    model itself: no collective (DDP's forward would synchronise buffers).
    """
    with torch.no_grad():
        if not hasattr(runner, "reshard"):  # not FSDP2
            return fn(unwrap(runner), *args, **kwargs)
        out = runner(fn, *args, **kwargs)
        runner.reshard()
        return out


@contextlib.contextmanager
def accumulate(runner: nn.Module, sync: bool) -> Iterator[None]:
    """Run one micro-step's forward + backward; ``sync=False`` skips the gradient reduction
    (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``): use it on every micro-step
    of an accumulation window but the last."""
    if sync or not is_distributed():
        yield
        return
    if isinstance(runner, nn.parallel.DistributedDataParallel):
        with runner.no_sync():
            yield
        return
    if hasattr(runner, "set_requires_gradient_sync"):  # FSDP2
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)
        return
    yield


# ---------------------------------------------------------------- collectives
def _sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [int(s) for s in out]


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Each rank's rows (rank order), exchanged at the largest row count and trimmed."""
    pad = max(sizes) - x.shape[0]
    xp = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x.contiguous()
    out = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(out, xp)
    return [t[:n] for t, n in zip(out, sizes)]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for a row back onto its owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        return torch.cat(_all_gather_padded(x, sizes))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # all_reduce + own slice: gloo has no reduce_scatter, and the gathered rows are small
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:rank()])
        return grad[start:start + ctx.sizes[rank()]], None


def gather_rows(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, int]:
    """The rows of ``x`` from every rank, concatenated in rank order, and this rank's row offset.

    Ranks may hold different row counts. ``with_grad=False``: remote rows enter without gradient
    and this rank's slot is ``x`` itself, carrying its gradient (open_clip's gather without grad).
    ONE-PEACE's released criterion (``gather_without_grad``) detaches the local slot too (and
    uses ``x.data`` in a single process): call ``.detach()`` on the result for that exact form.
    ``with_grad=True``: an autograd all-gather; the backward sums each row's gradients from all
    ranks back to the rank that owns it (open_clip's ``gather_with_grad``). Single process:
    ``(x, 0)``.
    """
    if not is_distributed() or world_size() == 1:
        return x, 0
    if x.dim() < 1:
        raise ValueError(f"gather_rows needs a tensor with a row dimension, got shape {tuple(x.shape)}")
    sizes = _sizes(x.shape[0], x.device)
    offset = sum(sizes[:rank()])
    if with_grad:
        return _GatherWithGrad.apply(x, sizes), offset
    with torch.no_grad():
        parts = _all_gather_padded(x.detach(), sizes)
    parts[rank()] = x
    return torch.cat(parts), offset


def all_reduce_mean(metrics: dict) -> dict:
    """Every numeric metric averaged over ranks (one collective), so all ranks log the same."""
    if not is_distributed() or world_size() == 1:
        return dict(metrics)
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= world_size()
    return {**metrics, **{k: v for k, v in zip(keys, values.tolist())}}


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- local launcher (tests, benchmarks)
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn: Callable, world: int, port: int, env: dict, args: tuple) -> None:
    os.environ.update({**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    init_distributed()
    try:
        fn(*args)
    finally:
        shutdown()


def launch_local(fn: Callable, nprocs: int, *args, env: dict | None = None) -> None:
    """Run ``fn(*args)`` on ``nprocs`` fresh local processes that share a process group (what
    torchrun does, without a separate command); an exception on any rank is re-raised here.
    ``fn`` must be importable by name (a module-level function)."""
    import torch.multiprocessing as mp

    mp.start_processes(_spawned, args=(fn, nprocs, free_port(), env or {}, args), nprocs=nprocs,
                       start_method="spawn")


# ---------------------------------------------------------------- what the training loop calls
def resolve_mode(mode: str, world: int) -> str:
    """``auto``: DDP when launched on several ranks, else none."""
    if mode == "auto":
        return "ddp" if world > 1 else "none"
    return mode


def reduce_row(row: dict) -> dict:
    """A step's logged metrics averaged over ranks (losses agree everywhere); tokens summed."""
    if not is_distributed() or world_size() == 1:
        return row
    out = all_reduce_mean(row)
    out["tokens"] = int(round(out["tokens"] * world_size()))
    return {k: round(v, 5) if isinstance(v, float) and k != "lr" else v for k, v in out.items()}


class NullLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, row: dict) -> None:
        return None

    def close(self) -> None:
        return None


class CachedSteps:
    """The in-memory data path: every rank builds the same global steps of an epoch (a pure
    function of (seed, epoch), see the trainer's ``epoch_groups``) and takes rows ``r::W`` of each;
    ``accum`` consecutive steps make one optimizer step (an epoch's last incomplete window is
    dropped). The global step is defined for the world size the run started with, so a run
    resumed on another number of ranks continues the same global steps."""

    def __init__(self, groups: Callable[[int], list], accum: int = 1) -> None:
        self.groups, self.accum = groups, accum

    def epoch(self, state: dict) -> Iterator[tuple[list, dict]]:
        r, w, k = rank(), world_size(), self.accum
        groups = [g for g in self.groups(state["epoch"]) if len(g) >= max(2, w)]
        for b in range(state["batch_in_epoch"], len(groups) - k + 1, k):
            yield [g[r::w] for g in groups[b:b + k]], {"batch_in_epoch": b + k}

    def rank_state(self) -> dict:
        return {}

    def resume(self, rank_state: dict | None, state: dict) -> None:
        return None


class StreamSteps:
    """The streaming data path (:class:`omni_core.data.stream.StreamingLoader`): this rank's own
    shards and steps; every rank ends an epoch together. Its position is saved per rank; a run
    resumed on another number of ranks starts the next epoch (shard assignment depends on it)."""

    def __init__(self, loader, accum: int = 1) -> None:
        self.loader, self.accum, self.position = loader, accum, None

    def epoch(self, state: dict) -> Iterator[tuple[list, dict]]:
        pos = self.position if self.position is not None and self.position.epoch == state["epoch"] \
            else self.loader.start(state["epoch"])
        steps = self.loader.steps(pos)
        while True:
            window = [item for _, item in zip(range(self.accum), steps)]
            if len(window) < self.accum:
                self.position = None
                return
            self.position = window[-1][1]
            yield [group for group, _ in window], {}

    def rank_state(self) -> dict:
        return {"data": self.position.to_dict() if self.position is not None else None}

    def resume(self, rank_state: dict | None, state: dict) -> None:
        from omni_core.data.stream import StreamPosition

        saved = (rank_state or {}).get("data")
        if rank_state is None:  # written at another world size: its positions do not apply
            state["epoch"] += 1
        elif saved is not None:
            self.position = StreamPosition.from_dict(saved)
