"""Checkpoints in safetensors, written atomically (temp file + rename).

One file holds the model, the AdamW state and the torch RNG state; run metadata (step,
schedule, data position, config) travels as JSON in the safetensors header, so a resumed
run continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict) -> None:
    tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
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
