"""The ``omni`` command.

    omni model info PRESET            parameter count and shape of a preset
    omni model plan --preset P --gpus G --gpu-mem GiB   per-GPU memory and the largest token budget
    omni bench packing [--json]       packed step vs ONE-PEACE's padded step
    omni bench kernels --static       static sm_80/sm_90 report of every Triton kernel
    omni bench kernels --traffic      traffic model: bytes, FLOPs, atomics, H100/A100 roofline [--json]
    omni bench data [--json]          loader throughput and packing efficiency
    omni bench scaling [--json]       training samples/s of the tiny preset at 1 and 2 ranks (torchrun)
    omni bench inference [--json]     embeddings/s per modality, packed vs padded batches
    omni bench attention [--json]     native CPU attention vs the torch reference
    omni data synth ...               generate the image–text–audio triplet dataset
    omni vq train --data D --out V    train OPT's VQ image tokenizer (8x8 codes per image), eval PSNR
    omni caption --run R --images DIR | --audio DIR [--beam N]   captions from an OPT run
    omni imagine --run R --text "..." | --audio FILE --out x.png  an image from an OPT run
    omni eval --recipe opt --run R [--json]   BLEU-4/CIDEr, attribute accuracy, colour match, matching R@1
    omni demo --recipe opt            OPT: VQ tokenizer + opt-tiny pre-training (10 min) + eval
    omni pretrain ... / eval ... / embed ...
    omni convert one-peace CKPT --out DIR   a released ONE-PEACE checkpoint → DIR/model.safetensors
    omni export --run R [--out F]     consolidate a run's sharded checkpoint into one model file
    omni demo                         synth → pretrain (10 min) → eval

User errors (missing files, bad input) print one line and exit 1; OMNI_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# subcommand -> (module, attribute) of a main(argv) -> int; imported only when used.
COMMANDS: dict[str, tuple[str, str]] = {
    "data synth": ("omni_core.data.synth", "main"),
    "pretrain": ("omni_core.train.trainer", "main"),
    "eval": ("omni_core.eval.retrieval", "main"),
    "embed": ("omni_core.eval.embed", "main"),
    "convert one-peace": ("omni_core.model.one_peace", "convert_main"),
    "export": ("omni_core.train.export", "main"),
    "demo": ("omni_core.demo", "main"),
    "bench data": ("omni_core.data.bench", "main"),
    "vq train": ("omni_core.model.vq", "main"),
    "caption": ("omni_core.eval.generation", "caption_main"),
    "imagine": ("omni_core.eval.generation", "imagine_main"),
}
# `omni eval --recipe opt` and `omni demo --recipe opt` are OPT's own modules.
OPT_COMMANDS = {"eval": ("omni_core.eval.generation", "eval_main"), "demo": ("omni_core.demo_opt", "main")}
BENCH_FILES = {"packing": "packing.py", "kernels": "kernel_report.py", "scaling": "scaling.py",
               "inference": "inference.py",
               "attention": "bench_native_attention.py"}


def _benchmark_main(name: str) -> Callable[[list[str]], int]:
    path = BENCHMARKS / BENCH_FILES[name]
    if not path.exists():
        raise SystemExit(f"omni bench {name}: {path} not found (benchmarks ship with the source checkout)")
    spec = importlib.util.spec_from_file_location(f"omni_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    spec.loader.exec_module(module)
    return module.main


def model_info(argv: list[str]) -> int:
    from omni_core.model.omni import PRESETS, OmniModel

    parser = argparse.ArgumentParser(prog="omni model info")
    parser.add_argument("preset", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    model = OmniModel.from_preset(args.preset, device="meta")
    cfg = model.cfg
    print(f"preset        {args.preset}")
    print(f"parameters    {model.num_parameters():,} ({model.num_parameters() / 1e9:.2f} B)")
    print(f"layers        {cfg.depth}   width {cfg.dim}   heads {cfg.heads} (head dim {cfg.dim // cfg.heads})")
    ffn = "GeGLU" if cfg.geglu else "GELU"
    print(f"ffn           {ffn} {cfg.ffn_hidden} x 3 modalities{' + sub-LN' if cfg.sub_ln else ''}")
    print(f"image         {cfg.image_size} px, {(cfg.image_size // 16) ** 2 + 1} tokens")
    print(f"audio         {cfg.audio_front_end} front end, 50 frames/s, up to {cfg.audio_max_frames} frames")
    print(f"text          vocab {cfg.vocab_size}, up to {cfg.text_positions - 1} tokens (EOS included) + CLS")
    return 0


def _recipe(argv: list[str]) -> str | None:
    """The value of --recipe in argv (either spelling), if any."""
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except (OSError, ValueError, RuntimeError) as err:
        if os.environ.get("OMNI_DEBUG") == "1":
            raise
        print(f"omni {' '.join(argv[:2])}: error: {err}", file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    head2 = " ".join(argv[:2])
    if head2 == "model info":
        return model_info(argv[2:])
    if head2 == "model plan":
        from omni_core.model.plan import main as plan_main

        return plan_main(argv[2:])
    if argv[0] == "bench" and len(argv) > 1 and argv[1] in BENCH_FILES:
        return _benchmark_main(argv[1])(argv[2:])
    if argv[0] in OPT_COMMANDS and _recipe(argv[1:]) == "opt":
        module, attr = OPT_COMMANDS[argv[0]]
        return getattr(importlib.import_module(module), attr)(argv[1:])
    for name, (module, attr) in COMMANDS.items():
        words = name.split()
        if argv[: len(words)] == words:
            return getattr(importlib.import_module(module), attr)(argv[len(words):])
    print(f"omni: unknown command {' '.join(argv)!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
