"""``omni export``: consolidate a run's sharded checkpoint into one safetensors model file.

The output is the single-file format ``omni eval`` and ``omni embed`` read (model weights + the
run's config in the header); by default it is written as ``<run>/model.safetensors``, where they
look. Runs in one process, whatever world size wrote the checkpoint (DCP reshards on load).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omni_core.model.omni import OmniConfig, OmniModel
from omni_core.train.checkpoint import latest_sharded, load_sharded, read_sharded_meta, save_checkpoint


def export(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    ckpt = latest_sharded(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no sharded checkpoint (dcp/latest); was the run trained with torchrun?")
    out = Path(out) if out is not None else run_dir / "model.safetensors"
    config = read_sharded_meta(ckpt).get("config")
    if config is None:
        raise ValueError(f"{ckpt}/meta.json has no model config")
    model = OmniModel(OmniConfig(**config))
    meta, _ = load_sharded(ckpt, model, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, None, {**meta, "exported_from": str(ckpt)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory written by omni pretrain")
    p.add_argument("--out", help="output file (default: <run>/model.safetensors)")
    a = p.parse_args(argv)
    path = export(a.run, a.out)
    print(f"exported {latest_sharded(Path(a.run))} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
