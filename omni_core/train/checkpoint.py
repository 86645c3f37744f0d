"""Checkpoints, written atomically.

Single file (one process): safetensors, temp file + rename. One file holds the model, the AdamW
state and the torch RNG state; run metadata (step, schedule, data position, config) travels as
JSON in the safetensors header, so a resumed run continues exactly where the checkpoint was taken.

Sharded (any number of ranks, DDP or FSDP2): ``torch.distributed.checkpoint`` directories, temp
dir + rename + an atomically replaced ``latest`` pointer; loadable at another world size; see
:func:`save_sharded`. ``omni export`` consolidates one into a single-file model.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict, model_state: dict[str, torch.Tensor] | None = None) -> None:
    """``model_state`` (default: ``model.state_dict()``) lets a sharded model pass its gathered
    full state (see :func:`save_full_model`)."""
    state = model.state_dict() if model_state is None else model_state
    tensors = {f"model/{k}": v.detach().contiguous() for k, v in state.items()}
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, slots in state["state"].items():
            for name, value in slots.items():
                tensors[f"optim/{idx}/{name}"] = torch.as_tensor(value).contiguous()
        meta = {**meta, "param_groups": state["param_groups"]}
    tensors["rng/torch"] = torch.get_rng_state()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"omni": json.dumps(meta)})
    os.replace(tmp, path)  # atomic: a reader sees the old or the new checkpoint, never half of one


def read_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["omni"])


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    tensors = load_file(str(path))
    meta = read_meta(path)
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    if optimizer is not None:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, idx, name = key.split("/", 2)
                state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    return meta


# ---------------------------------------------------------------- sharded (torch.distributed.checkpoint)
# A run's sharded checkpoints live in <run>/dcp/step-XXXXXXXX/ (DCP shards, meta.json, one
# rank-R.pt per rank with its data position and RNG); <run>/dcp/latest names the current one.
# A save goes to a hidden temp dir, is renamed into place once every rank has written, and only
# then does `latest` move (os.replace): a save interrupted at any point leaves `latest` naming the
# previous complete checkpoint. On several nodes <run> must be on a filesystem all ranks share.
DCP_DIR = "dcp"
LATEST = "latest"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def latest_sharded(run_dir: Path) -> Path | None:
    """The run's current sharded checkpoint directory, or None."""
    pointer = Path(run_dir) / DCP_DIR / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / ".metadata").is_file() else None


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 meta: dict, rank_state: dict, keep: int = 1) -> Path:
    """Every rank calls this: its shards of model + optimizer, and its own ``rank_state`` (data
    position); RNG states are added here. ``model`` is the unwrapped model (DDP, FSDP2 or plain).
    Returns the checkpoint directory."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _rank_world()
    root = Path(run_dir) / DCP_DIR
    name = f"step-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd} | ({"optim": optim_sd} if optimizer is not None else {})
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"rank_state": rank_state, "rng": rng}, tmp / f"rank-{rank}.pt")
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "world_size": world}))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / LATEST
        pointer.with_name(LATEST + ".tmp").write_text(name)
        os.replace(pointer.with_name(LATEST + ".tmp"), pointer)
        old = sorted(p for p in root.glob("step-*") if p.name != name)
        for p in old[:max(0, len(old) - (keep - 1))] + list(root.glob(".tmp-*")):  # + interrupted saves
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def _drop_unsaved_states(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DCP fills a fresh optimizer's state with a zero-gradient step (step count 1); a parameter
    the checkpoint has no state for must have none, or its first real AdamW step would be
    bias-corrected as a second one."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, param in model.named_parameters():
        if param in optimizer.state and f"optim.state.{name}.step" not in saved:
            del optimizer.state[param]


def save_full_model(path: Path, model: torch.nn.Module, meta: dict) -> None:
    """Every rank calls this: the full (unsharded) model gathered to rank 0 and written there as the
    single-file format (what ``omni eval`` / ``omni embed`` read)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        save_checkpoint(path, model, None, meta)
        return
    rank, _ = _rank_world()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_checkpoint(path, model, None, meta, model_state=full)
    _barrier()


def read_sharded_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load_sharded(path: Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``) at any world size (DCP
    reshards). Returns (meta, this rank's saved rank_state), the latter None when the checkpoint
    was written at another world size (its per-rank data positions do not apply); RNG states are
    restored from this rank's file when it exists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (no .metadata)")
    meta = read_sharded_meta(path)
    rank, world = _rank_world()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    with _single_process_quiet():
        dcp.load({"model": model_sd}, checkpoint_id=str(path))
        if optimizer is not None:
            # Parameters that never had a gradient have no AdamW state in the checkpoint; they keep
            # the fresh zero state, which AdamW treats exactly like no state.
            dcp.load({"optim": optim_sd}, checkpoint_id=str(path),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=model_sd,
                   optim_state_dict=optim_sd if optimizer is not None else {})
    if optimizer is not None:
        _drop_unsaved_states(path, model, optimizer)
    rank_file = path / f"rank-{rank}.pt"
    if not rank_file.is_file():
        return meta, None
    saved = torch.load(rank_file, weights_only=False)
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return meta, saved["rank_state"] if meta.get("world_size") == world else None
