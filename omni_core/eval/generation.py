"""OPT generation and its evaluation: ``omni caption``, ``omni imagine``, ``omni eval --recipe opt``.

* captioning: the cross-modal encoder reads an image, an audio clip or both (the other modalities
  left out, as a modality masked as a whole in pre-training) and the text decoder writes the
  caption (greedy, or beam search with ``--beam N``) through its KV cache;
* imagining: the encoder reads a caption or an audio clip and the image decoder writes 64 codes,
  which the run's VQ tokenizer (``omni pretrain --recipe opt --vq DIR``) turns into pixels;
* evaluation on the dataset's eval split: BLEU-4 / CIDEr-D and caption attribute accuracy of
  captions from image, from audio and from both; the colour match of images imagined from the
  held-out captions; R@1 of the triplet-matching head ranking every candidate pair
  (text↔image, text↔audio, image↔audio) over the first ``--retrieval-samples`` eval samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from omni_core.data.loader import ShardDataset, decode_clip, decode_image
from omni_core.data.sample import Sample
from omni_core.data.tokenizer import MAX_TEXT_TOKENS, CaptionTokenizer, load_tokenizer
from omni_core.eval.captioning import attribute_accuracy, caption_scores, colour_match
from omni_core.generate import generate
from omni_core.model.opt import IMAGE_GRID, TripletView, load_opt
from omni_core.model.vq import VQTokenizer

CAPTION_SOURCES = ("image", "audio", "both")
BATCH = 64


@dataclass
class OptRun:
    model: torch.nn.Module
    meta: dict
    tokenizer: CaptionTokenizer
    vq_dir: str | None

    def vq(self) -> VQTokenizer:
        """The run's image tokenizer; a clear error when the run was trained without one."""
        if not self.vq_dir:
            raise ValueError("this run has no VQ image tokenizer (it was trained without --vq), so it cannot "
                             "imagine images: train one with `omni vq train` and pre-train with --vq DIR")
        return VQTokenizer.load(self.vq_dir)


def load_run(run: str | Path, data: str | Path | None = None) -> OptRun:
    """The OPT model of a run, its caption tokenizer (from the run's dataset unless ``data``) and
    the directory of its VQ tokenizer."""
    model, meta = load_opt(run)
    args = meta.get("args", {})
    data = data or args.get("data")
    if not data:
        raise ValueError(f"{run} does not record its dataset: pass --data DIR (for its tokenizer)")
    return OptRun(model, meta, load_tokenizer(data), args.get("vq"))


def text_ids(tokenizer: CaptionTokenizer, text: str) -> torch.Tensor:
    """A caption's ids (+ EOS); a caption longer than the text encoder's window is an error."""
    n = len(tokenizer.tokenizer.encode(text).ids)
    if n == 0:
        raise ValueError("the caption is empty")
    if n > MAX_TEXT_TOKENS:
        raise ValueError(f"the caption has {n} tokens; the text encoder takes at most {MAX_TEXT_TOKENS}")
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def _check_images(model, images: torch.Tensor) -> None:
    size = model.cfg.image_size
    if images.dim() != 4 or images.shape[1:] != (3, size, size):
        raise ValueError(f"the model takes images [N, 3, {size}, {size}], got {tuple(images.shape)}")


@torch.no_grad()
def caption(run: OptRun, images: torch.Tensor | None = None, audio: list[torch.Tensor] | None = None,
            beam: int = 1) -> list[str]:
    """Captions of N images, N audio clips, or N (image, audio) pairs."""
    if images is not None:
        _check_images(run.model, images)
    n = len(images) if images is not None else len(audio or [])
    out: list[str] = []
    for s in range(0, n, BATCH):
        memory = run.model.encode(image=None if images is None else images[s:s + BATCH],
                                  audio=None if audio is None else audio[s:s + BATCH])
        dec = run.model.text_decoding(memory, use_cache=True)
        rows = torch.arange(memory.num_sequences)
        for ids in generate(dec, rows, run.model.cfg.caption_positions, beam=beam):
            out.append(run.tokenizer.decode(ids))
    return out


@torch.no_grad()
def imagine(run: OptRun, vq: VQTokenizer, texts: list[torch.Tensor] | None = None,
            audio: list[torch.Tensor] | None = None, beam: int = 1, top_k: int | None = None,
            temperature: float = 1.0, seed: int = 0) -> np.ndarray:
    """uint8 images [N, S, S, 3] decoded from the image decoder's codes for N captions or clips:
    sampled from the ``top_k`` most likely codes when given (seeded: the same images every call),
    else greedy / beam search, which tends to fill every cell with the likeliest code (background)."""
    n = len(texts if texts is not None else audio or [])
    pictures = []
    g = torch.Generator().manual_seed(seed)
    for s in range(0, n, BATCH):
        memory = run.model.encode(text=None if texts is None else texts[s:s + BATCH],
                                  audio=None if audio is None else audio[s:s + BATCH])
        dec = run.model.image_decoding(memory, use_cache=True)
        codes = generate(dec, torch.arange(memory.num_sequences), IMAGE_GRID**2, beam=beam, alpha=0.0,
                         top_k=top_k, temperature=temperature, generator=g)
        pixels = vq.decode_pixels(torch.tensor(codes, dtype=torch.long))
        pictures.append((pixels * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(pictures) if pictures else np.zeros((0, vq.image_size, vq.image_size, 3), np.uint8)


def eval_samples(data: str | Path, image_size: int, tokenizer: CaptionTokenizer,
                 limit: int | None = None) -> tuple[list[Sample], list[dict]]:
    """The eval split's samples with their generator metadata (the ``json`` member)."""
    ds = ShardDataset(data, "eval", image_size=image_size, tokenizer=tokenizer)
    samples, metas = [], []
    for shard, key, members in ds.iter_records(0):
        sample = ds.decode(shard, key, members)
        if sample is None or "json" not in members:
            continue
        samples.append(sample)
        metas.append(json.loads(members["json"]))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise ValueError(f"{data} has no decodable eval samples")
    return samples, metas


@torch.no_grad()
def matching_recall(run: OptRun, samples: list[Sample]) -> dict[str, float]:
    """R@1 of the triplet-matching head: each query ranks every candidate of the other modality by
    the head's "matched" logit over the pair (the third modality left out)."""
    n = len(samples)
    text = [s.token_ids for s in samples]
    images = torch.stack([s.image for s in samples])
    audio = [s.audio for s in samples]
    out = {}
    for a, b in (("text", "image"), ("text", "audio"), ("image", "audio")):
        scores = torch.empty(n, n)
        pairs = [(i, j) for i in range(n) for j in range(n)]
        for s in range(0, len(pairs), 4 * BATCH):
            chunk = pairs[s:s + 4 * BATCH]
            views = [TripletView(**{a: i, b: j, **{m: None for m in ("text", "image", "audio") if m not in (a, b)}})
                     for i, j in chunk]
            enc = run.model.encode_views(text, images, audio, views)
            logits = run.model.matching_logits(enc)
            match = logits.log_softmax(-1)[:, 0]
            for (i, j), v in zip(chunk, match.tolist()):
                scores[i, j] = v
        own = scores.diagonal()
        out[f"{a}->{b}"] = round(((scores > own[:, None]).sum(1) == 0).float().mean().item(), 4)
        out[f"{b}->{a}"] = round(((scores > own[None, :]).sum(0) == 0).float().mean().item(), 4)
    out["chance"] = round(1 / n, 4)
    return out


def evaluate_opt(run_dir: str | Path, data: str | Path | None = None, limit: int | None = None,
                 beam: int = 1, retrieval_samples: int = 100, log=print,
                 imagine_top_k: int | None = None) -> dict:
    """Every generation metric of an OPT run on the eval split (the pinned keys of eval.json first)."""
    run = load_run(run_dir, data)
    data = data or run.meta["args"]["data"]
    samples, metas = eval_samples(data, run.model.cfg.image_size, run.tokenizer, limit)
    refs = [s.text for s in samples]
    images = torch.stack([s.image for s in samples])
    audio = [s.audio for s in samples]
    result: dict = {"samples": len(samples), "beam": beam, "imagine_top_k": imagine_top_k}
    captions: dict[str, list[str]] = {}
    for source in CAPTION_SOURCES:
        log(f"eval: captioning {len(samples)} samples from {source}")
        captions[source] = caption(run, images if source != "audio" else None, audio if source != "image" else None,
                                   beam)
        scores = caption_scores(captions[source], refs)
        attrs = attribute_accuracy(captions[source], metas)
        result[f"bleu4_{source}"] = round(scores["bleu4"], 4)
        result[f"cider_{source}"] = round(scores["cider"], 4)
        result[f"caption_attr_acc_{source}"] = attrs["all"]
        result[f"caption_attrs_{source}"] = attrs
    if run.vq_dir:
        vq = run.vq()
        log(f"eval: imagining {len(samples)} images from the eval captions and from their audio")
        from_text = imagine(run, vq, texts=[s.token_ids for s in samples], top_k=imagine_top_k)
        from_audio = imagine(run, vq, audio=audio, top_k=imagine_top_k)
        m_text, m_audio = colour_match(list(from_text), refs), colour_match(list(from_audio), refs)
        result["imagine_colour_match"] = m_text["match"]
        result["imagine_colour_match_audio"] = m_audio["match"]
        result["imagine_colour_all_present"] = m_text["all_present"]
        summary = Path(run.vq_dir) / "summary.json"
        result["vq_psnr"] = json.loads(summary.read_text())["eval_psnr"] if summary.is_file() else None
        result["imagined"] = {"text": from_text, "audio": from_audio}
    k = min(retrieval_samples, len(samples))
    log(f"eval: matching-head retrieval over {k} samples")
    result["matching_r1"] = matching_recall(run, samples[:k])
    result["captions"] = [{"key": s.key, "reference": s.text, "held_out": bool(metas[i].get("held_out")),
                           **{src: captions[src][i] for src in captions}} for i, s in enumerate(samples)]
    result["eval_images"] = images
    return result


def json_ready(result: dict) -> dict:
    """The result without its arrays (imagined and eval images)."""
    return {k: v for k, v in result.items() if k not in ("imagined", "eval_images")}


def _load_folder(folder: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"{root} holds no {'/'.join(suffixes)} files")
    return files


def caption_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni caption", description="caption images or audio clips with an OPT run")
    p.add_argument("--run", required=True, help="run directory of omni pretrain --recipe opt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (png/jpg)")
    src.add_argument("--audio", help="folder of audio clips (flac/wav)")
    p.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--data", help="dataset of the run's tokenizer (default: the run's)")
    a = p.parse_args(argv)
    run = load_run(a.run, a.data)
    if a.images:
        files = _load_folder(a.images, (".png", ".jpg", ".jpeg"))
        size = run.model.cfg.image_size
        images = []
        for f in files:
            with Image.open(f) as img:
                if img.size != (size, size):
                    raise ValueError(f"{f} is {img.size[0]}x{img.size[1]} pixels; the model takes {size}x{size}")
            images.append(decode_image(f.read_bytes(), size))
        captions = caption(run, images=torch.stack(images), beam=a.beam)
    else:
        files = _load_folder(a.audio, (".flac", ".wav"))
        captions = caption(run, audio=[decode_clip(f.read_bytes()) for f in files], beam=a.beam)
    for f, c in zip(files, captions):
        print(f"{f.name}\t{c}")
    return 0


def imagine_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni imagine", description="generate an image from a caption or a clip")
    p.add_argument("--run", required=True, help="run directory of omni pretrain --recipe opt --vq DIR")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a caption")
    src.add_argument("--audio", help="an audio file (flac/wav)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--top-k", type=int, help="sample each code from the k likeliest (default: greedy / beam)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="the sampling's seed")
    p.add_argument("--data", help="dataset of the run's tokenizer (default: the run's)")
    a = p.parse_args(argv)
    run = load_run(a.run, a.data)
    vq = run.vq()
    if a.text is not None:
        pictures = imagine(run, vq, texts=[text_ids(run.tokenizer, a.text)], beam=a.beam, top_k=a.top_k,
                           temperature=a.temperature, seed=a.seed)
    else:
        pictures = imagine(run, vq, audio=[decode_clip(Path(a.audio).read_bytes())], beam=a.beam,
                           top_k=a.top_k, temperature=a.temperature, seed=a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pictures[0]).save(a.out)
    print(f"wrote {a.out}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="omni eval --recipe opt", description="OPT generation and matching metrics")
    p.add_argument("--recipe", choices=["opt"], required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--data", help="dataset (default: the run's)")
    p.add_argument("--limit", type=int, help="evaluate the first N eval samples")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--retrieval-samples", type=int, default=100, help="samples ranked by the matching head")
    p.add_argument("--imagine-top-k", type=int, help="imagine by top-k sampling (default: greedy)")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    result = json_ready(evaluate_opt(a.run, a.data, a.limit, a.beam, a.retrieval_samples,
                                      log=lambda m: print(m, file=sys.stderr), imagine_top_k=a.imagine_top_k))
    if a.json:
        print(json.dumps({k: v for k, v in result.items() if k != "captions"}, indent=2))
    else:
        for k, v in result.items():
            if k != "captions":
                print(f"{k:32s} {v}")
    return 0
