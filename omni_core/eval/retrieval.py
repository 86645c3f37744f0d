"""``omni eval``: cross-modal retrieval on the eval split.

For each of the six directions (image↔text, audio↔text and the emergent image↔audio)
every query ranks all candidates of the other modality by cosine similarity; R@k is the
fraction of queries whose own partner ranks in the top k. Chance is k / N.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from omni_core.model.omni import AUDIO, IMAGE, TEXT, OmniModel
from omni_core.precision import add_precision_argument, resolve_precision
from omni_core.recipes.contrastive import triplet_embeddings
from omni_core.train.data import load_split
from omni_core.train.trainer import load_trained

DIRECTIONS = [("image", "text"), ("text", "image"), ("audio", "text"), ("text", "audio"),
              ("image", "audio"), ("audio", "image")]
MODALITY = {"text": TEXT, "image": IMAGE, "audio": AUDIO}
KS = (1, 5, 10)


@torch.no_grad()
def embed_split(model: OmniModel, samples, batch_size: int = 64) -> dict[str, torch.Tensor]:
    model.eval()
    parts: dict[int, list[torch.Tensor]] = {m: [] for m in MODALITY.values()}
    for start in range(0, len(samples), batch_size):
        emb = triplet_embeddings(model, samples[start:start + batch_size])
        for m, e in emb.items():
            parts[m].append(e.float().cpu())
    return {name: torch.cat(parts[m]) for name, m in MODALITY.items()}


def recall_at_k(queries: torch.Tensor, candidates: torch.Tensor, ks=KS) -> dict[str, float]:
    """Query i's partner is candidate i."""
    sim = queries @ candidates.t()
    own = sim.diagonal()[:, None]
    rank = (sim > own).sum(dim=1)  # candidates strictly better than the partner
    return {f"R@{k}": round((rank < k).float().mean().item(), 4) for k in ks}


def retrieval_metrics(emb: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    n = emb["text"].shape[0]
    out = {}
    for query, target in DIRECTIONS:
        row = recall_at_k(emb[query], emb[target])
        row["chance"] = round(1.0 / n, 6)
        row.update({f"chance@{k}": round(min(1.0, k / n), 6) for k in KS})
        out[f"{query}->{target}"] = row
    return out


def scene_breakdown(emb: dict[str, torch.Tensor], captions: list[str]) -> dict[str, dict[str, float]]:
    """R@1 of every direction over single-object queries and over two-object queries (all
    candidates ranked): tells whether "a red star on the left" is confused with a scene that
    also holds a red star on the left."""
    pair = torch.tensor([" and " in c for c in captions])
    out = {}
    for kind, select in (("single_object", ~pair), ("two_objects", pair)):
        if not select.any():
            continue
        row = {"num_queries": int(select.sum())}
        for query, target in DIRECTIONS:
            sim = emb[query] @ emb[target].t()
            rank = (sim > sim.diagonal()[:, None]).sum(dim=1)
            row[f"{query}->{target}"] = round((rank[select] < 1).float().mean().item(), 4)
        out[kind] = row
    return out


def directions(result: dict) -> dict[str, dict[str, float]]:
    return {f"{q}->{t}": result[f"{q}->{t}"] for q, t in DIRECTIONS}


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = [f"{'direction':<16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'chance R@1':>12}"]
    for name, row in metrics.items():
        lines.append(f"{name:<16}{row['R@1']:>8.3f}{row['R@5']:>8.3f}{row['R@10']:>8.3f}{row['chance']:>12.4f}")
    return "\n".join(lines)


def evaluate(run_dir: str | Path, data: str | Path, loader: str = "auto", classify: bool = False,
             precision: str = "fp32") -> dict:
    """Retrieval in the six directions; with ``classify``, zero-shot shape and colour
    classification of images and audio (:mod:`omni_core.eval.classify`) under "classify".
    ``precision`` (auto | fp32 | bf16, :mod:`omni_core.precision`) is the embedding passes'
    autocast; the result names it."""
    model, _ = load_trained(run_dir)
    split = load_split(data, "eval", model.cfg.image_size, loader)
    chosen = resolve_precision(precision, next(model.parameters()).device)
    with chosen.autocast(next(model.parameters()).device):
        emb = embed_split(model, split.samples)
    result = {**retrieval_metrics(emb), "num_eval": len(split.samples), "skipped": split.skipped,
              "precision": chosen.name, "precision_reason": chosen.description}
    result["by_scene"] = scene_breakdown(emb, [s.text for s in split.samples])
    if classify:
        from omni_core.data.tokenizer import load_tokenizer
        from omni_core.eval.classify import zero_shot

        result["classify"] = zero_shot(model, load_tokenizer(data), [s.text for s in split.samples], emb)
    return result


def format_classify(result: dict) -> str:
    lines = [f"{'zero-shot':<16}{'shape':>8}{'colour':>8}   (single-object scenes: {result['num_samples']}, "
             f"chance {result['shape_chance']:.3f})"]
    for m in ("image", "audio"):
        lines.append(f"{m:<16}{result[f'{m}_shape_acc']:>8.3f}{result[f'{m}_colour_acc']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory written by omni pretrain")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--loader", choices=["auto", "dali", "pil"], default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--classify", action="store_true",
                   help="also zero-shot shape/colour classification of images and audio with prompted class names")
    p.add_argument("--out", help="also write the JSON here")
    add_precision_argument(p)
    a = p.parse_args(argv)
    result = evaluate(a.run, a.data, a.loader, classify=a.classify, precision=a.precision)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"precision: {result['precision_reason']}")
        print(format_table(directions(result)))
        if a.classify:
            print(format_classify(result["classify"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
