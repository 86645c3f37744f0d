"""Import ONE-PEACE's released checkpoints (``OFA-Sys/ONE-PEACE``, ``one-peace.pt``).

    model = load_one_peace("one-peace.pt")          # an OmniModel in eval mode
    model.embed_images(images)                      # ONE-PEACE's feature-extraction API

The released file is a dict whose ``"model"`` entry is the flat state dict of
``OnePeaceRetrievalModel`` (key names in ``/work/shared/ONE-PEACE.md`` §1) and whose ``"cfg"``
entry is a pickled omegaconf config. The architecture is inferred from the tensors' names
and shapes alone (width from the CLS embeddings, heads from the relative-position tables,
depth from the layer indices, FFN size, vocabulary, bucket sizes, image grid, audio conv
spec, positional-conv stack); a stored config, when present, is cross-checked against it.
Missing keys, unexpected keys (including optional layers this architecture lacks) and
shapes that disagree are one ``ValueError`` naming them.

Buffers: ``rp_bucket`` (the bucket index tables) is checked against the buckets the model
rebuilds (a mismatch means a different bucketing); ``position_idx`` and ``version`` are
ignored. ``audio_adapter.mask_embedding`` (pre-training only; the encoder never reads it)
is checked for shape and dropped.

``omni convert one-peace CKPT --out DIR`` writes ``DIR/model.safetensors`` (our config in
its header), which ``omni eval`` / ``omni embed --run DIR`` and ``load_trained`` read.
"""

from __future__ import annotations

import argparse
import ast
import math
import pickle
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from omni_core.model.adapters import ONE_PEACE_AUDIO_CONVS
from omni_core.model.omni import MODALITIES, OmniConfig, OmniModel
from omni_core.model.relpos import MAX_POSITION, beit_lut_2d, bucket_lut_1d

ENC = "encoder_wrapper."
TA, IA, AA, FM = ENC + "text_adapter.", ENC + "image_adapter.", ENC + "audio_adapter.", ENC + "fusion_model."
IGNORED_BUFFERS = (IA + "position_idx", FM + "version")
RP_BUCKETS = (TA + "rp_bucket", IA + "rp_bucket", AA + "rp_bucket")
DROPPED = (AA + "mask_embedding",)
# Optional ONE-PEACE layers the released model does not have (flags off in its config).
OPTIONAL_FEATURES = {
    "attn_ln": "attention output LayerNorm (scale_attn)",
    "c_attn": "per-head scaling (scale_heads)",
    "layernorm_embedding": "embedding LayerNorm",
    "type_embedding": "type embedding",
    "rel_pos_table_list.1.": "one relative-position table per layer (classification fine-tunes)",
    "conv_layers.0.0.bias": "audio feature-extractor conv bias",
    "embed_positions.1.0.weight": "conv positional embedding with pre-LN (conv_pos_pre_ln)",
}
SAMPLE_RATE = 16000

# (released key, its shape, our state-dict key, modality slot of a stacked tensor or None, transpose)
Rule = tuple[str, tuple[int, ...], str, int | None, bool]


# ------------------------------------------------------------------------------------ reading
def read_checkpoint(checkpoint: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(flat state dict, stored config or None) from a path, a checkpoint dict or a state dict.

    A path is first read with ``weights_only=True``; the released file pickles an omegaconf
    config, which that refuses, so it is then read with ``weights_only=False`` (this runs
    the pickle: only load files you trust; it needs ``omegaconf`` installed)."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"ONE-PEACE checkpoint {path} not found")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a ONE-PEACE checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        state, cfg = checkpoint["model"], checkpoint.get("cfg")
    else:
        state, cfg = checkpoint, None
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"state dict entries that are not tensors: {_names(not_tensors)}")
    return dict(state), cfg


# ---------------------------------------------------------------------------------- inference
def _shape(state: dict[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"missing key {key!r} (needed to infer {what}); is this a ONE-PEACE retrieval checkpoint?")
    return tuple(state[key].shape)


def _indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of keys ``prefix + f"{i}." + ...``."""
    found = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def infer_config(state: dict[str, torch.Tensor]) -> tuple[OmniConfig, bool]:
    """Our config of the checkpoint's architecture, from its key names and shapes, and whether
    the audio conv strides are unknown (kernels unlike ONE-PEACE's: strides are not in weights)."""
    D = _shape(state, TA + "cls_embedding", "the width")[-1]
    V = _shape(state, TA + "embed_tokens.weight", "the vocabulary")[0]
    text_rows, H = _shape(state, TA + "rel_pos_table_list.0.weight", "the heads and text buckets")
    audio_rows = _shape(state, AA + "rel_pos_table_list.0.weight", "the audio buckets")[0]
    layers = _indices(state, FM + "layers.")
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"fusion_model layers must be numbered 0..L-1, found {layers}")
    F = _shape(state, FM + "layers.0.text_ffn.0.wi_0.weight", "the FFN size")[0]
    pos_rows = _shape(state, IA + "pos_embed", "the image grid")[-2]
    r = math.isqrt(pos_rows - 1)
    if r * r + 1 != pos_rows:
        raise ValueError(f"image_adapter.pos_embed has {pos_rows} rows, not r*r+1 for a square grid")
    convs = _indices(state, AA + "embed_audios.0.conv_layers.")
    conv_shapes = [_shape(state, AA + f"embed_audios.0.conv_layers.{i}.0.weight", "the audio front end")
                   for i in convs]
    channels = {s[0] for s in conv_shapes}
    if len(channels) != 1:
        raise ValueError(f"audio feature-extractor convs of different widths {sorted(channels)} are not supported")
    kernels = tuple(s[2] for s in conv_shapes)
    default_kernels = tuple(k for k, _ in ONE_PEACE_AUDIO_CONVS)
    strides = tuple(s for _, s in ONE_PEACE_AUDIO_CONVS) if kernels == default_kernels else None
    pos_blocks = _indices(state, AA + "embed_positions.")
    if pos_blocks != list(range(1, len(pos_blocks) + 1)):
        raise ValueError(f"audio embed_positions blocks must be numbered 1..depth, found {pos_blocks}")
    pos_out, pos_in, pos_k = _shape(state, AA + "embed_positions.1.0.weight", "the positional convs")
    if (text_rows - 2) % 2 or (audio_rows - 2) % 2:
        raise ValueError(f"relative-position tables of {text_rows} (text) and {audio_rows} (audio) rows "
                         f"are not 2*bucket+2")
    gamma = FM + "layers.0.gamma_1" in state
    cfg = dict(dim=D, depth=len(layers), heads=H, ffn_hidden=F,
               embed_dim=_shape(state, "text_proj.weight", "the projection width")[0], vocab_size=V,
               text_positions=_shape(state, TA + "embed_positions.weight", "the text positions")[0],
               text_bucket=(text_rows - 2) // 2, image_size=16 * r,
               stem_channels=_shape(state, IA + "embed_images.0.weight", "the image stem")[0],
               audio_front_end="conv", audio_channels=channels.pop(),
               audio_conv_layers=tuple(zip(kernels, strides or (0,) * len(kernels))),
               audio_bucket=(audio_rows - 2) // 2, audio_pos_depth=len(pos_blocks),
               audio_pos_width=pos_k * len(pos_blocks), audio_pos_groups=pos_out // pos_in,
               layer_scale_init=1e-6 if gamma else None, drop_path=0.0)
    if D % H:
        raise ValueError(f"width {D} is not divisible by the {H} heads of the relative-position tables")
    return OmniConfig(**cfg), strides is None


def _cfg_get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, Mapping):
            if part not in node:
                return None
            node = node[part]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            return None
    return node


def _conv_spec(text: str) -> list[tuple[int, int, int]]:
    """ONE-PEACE's ``feature_encoder_spec`` string (a list expression of (C, k, s) tuples),
    evaluated without ``eval``: only list/tuple literals of ints, ``+`` and ``*``."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported feature_encoder_spec element {ast.dump(node)}")

    return [tuple(layer) for layer in ev(ast.parse(text, mode="eval").body)]


def cross_check(cfg: OmniConfig, stored: Any) -> OmniConfig:
    """Compare the inferred architecture with a stored ONE-PEACE config; fill the audio conv
    strides (not in the weights) from it. Disagreements are one error naming them."""
    enc = "model.encoder."
    expected = {
        enc + "embed_dim": cfg.dim, enc + "layers": cfg.depth, enc + "attention_heads": cfg.heads,
        enc + "ffn_embed_dim": cfg.ffn_hidden, enc + "text_adapter.bucket_size": cfg.text_bucket,
        enc + "audio_adapter.bucket_size": cfg.audio_bucket, enc + "audio_adapter.conv_pos_depth": cfg.audio_pos_depth,
        enc + "audio_adapter.conv_pos_groups": cfg.audio_pos_groups, "task.patch_image_size": cfg.image_size,
        enc + "audio_adapter.abs_pos_type": "conv", enc + "audio_adapter.conv_bias": False,
        enc + "audio_adapter.conv_pos_pre_ln": False, enc + "scale_attn": False, enc + "scale_heads": False,
    }
    wrong = []
    for key, want in expected.items():
        got = _cfg_get(stored, key)
        if got is not None and got != want:
            wrong.append(f"{key}: config {got!r}, weights {want!r}")
    width = _cfg_get(stored, enc + "audio_adapter.conv_pos_width")
    kernel = cfg.audio_pos_width // cfg.audio_pos_depth
    if width is not None and max(3, width // cfg.audio_pos_depth) != kernel:
        wrong.append(f"{enc}audio_adapter.conv_pos_width: config {width} gives kernel "
                     f"{max(3, width // cfg.audio_pos_depth)}, weights have {kernel}")
    spec = _cfg_get(stored, enc + "audio_adapter.feature_encoder_spec")
    if spec is not None:
        layers = _conv_spec(str(spec))
        got = [(c, k) for c, k, _ in layers]
        want = [(cfg.audio_channels, k) for k, _ in cfg.audio_conv_layers]
        if got != want:
            wrong.append(f"{enc}audio_adapter.feature_encoder_spec: config {spec!r}, weights (C, k) {want}")
        else:
            cfg = _with(cfg, audio_conv_layers=tuple((k, s) for _, k, s in layers))
    if wrong:
        raise ValueError("the checkpoint's stored config disagrees with its weights: " + "; ".join(wrong))
    return cfg


def _with(cfg: OmniConfig, **changes: Any) -> OmniConfig:
    return OmniConfig(**{**asdict(cfg), **changes})


# ------------------------------------------------------------------------------------ mapping
def key_rules(cfg: OmniConfig) -> list[Rule]:
    """Every released key of this architecture: (name, shape, how it fills our state dict)."""
    D, H, F, L, E = cfg.dim, cfg.heads, cfg.ffn_hidden, cfg.depth, cfg.embed_dim
    r, c, C = cfg.image_size // 16, cfg.stem_channels, cfg.audio_channels
    rules: list[Rule] = []

    def copy(name: str, shape: tuple[int, ...], ours: str) -> None:
        rules.append((name, shape, ours, None, False))

    def into(name: str, shape: tuple[int, ...], ours: str, m: int, transpose: bool = False) -> None:
        rules.append((name, shape, ours, m, transpose))

    # text adapter
    copy(TA + "embed_tokens.weight", (cfg.vocab_size, D), "text.embed.weight")
    copy(TA + "embed_positions.weight", (cfg.text_positions, D), "text.pos")
    copy(TA + "cls_embedding", (1, 1, D), "text.cls")
    copy(TA + "rel_pos_table_list.0.weight", (2 * cfg.text_bucket + 2, H), "text.bias_table")
    # image adapter: hMLP stem (indices 2 and 5 are GELUs)
    for i, (ours, cin, cout, k) in {0: ("conv1", 3, c, 4), 3: ("conv2", c, c, 2), 6: ("conv3", c, D, 2)}.items():
        copy(IA + f"embed_images.{i}.weight", (cout, cin, k, k), f"image.{ours}.weight")
        copy(IA + f"embed_images.{i}.bias", (cout,), f"image.{ours}.bias")
    for i, ours in ((1, "norm1"), (4, "norm2")):
        for p in ("weight", "bias"):
            copy(IA + f"embed_images.{i}.layer_norm.{p}", (c,), f"image.{ours}.{p}")
    copy(IA + "cls_embedding", (1, 1, D), "image.cls")
    copy(IA + "pos_embed", (r * r + 1, D), "image.pos")
    copy(IA + "rel_pos_table_list.0.weight", ((2 * r - 1) ** 2 + 3, H), "image.bias_table")
    # audio adapter
    for i, (k, _) in enumerate(cfg.audio_conv_layers):
        copy(AA + f"embed_audios.0.conv_layers.{i}.0.weight", (C, 1 if i == 0 else C, k), f"audio.convs.{i}.weight")
        for p in ("weight", "bias"):
            copy(AA + f"embed_audios.0.conv_layers.{i}.2.1.{p}", (C,), f"audio.norms.{i}.{p}")
    for p in ("weight", "bias"):
        copy(AA + f"embed_audios.2.{p}", (C,), f"audio.proj_norm.{p}")
    copy(AA + "embed_audios.3.weight", (D, C), "audio.proj.weight")
    copy(AA + "embed_audios.3.bias", (D,), "audio.proj.bias")
    k = max(3, cfg.audio_pos_width // cfg.audio_pos_depth)
    for j in range(cfg.audio_pos_depth):
        copy(AA + f"embed_positions.{j + 1}.0.weight", (D, D // cfg.audio_pos_groups, k), f"audio.pos_convs.{j}.weight")
        copy(AA + f"embed_positions.{j + 1}.0.bias", (D,), f"audio.pos_convs.{j}.bias")
    copy(AA + "cls_embedding", (1, 1, D), "audio.cls")
    copy(AA + "cls_pos_embed", (1, 1, D), "audio.cls_pos")
    copy(AA + "rel_pos_table_list.0.weight", (2 * cfg.audio_bucket + 2, H), "audio.bias_table")
    # fusion model
    for l in range(L):
        pre, ours = FM + f"layers.{l}.", f"blocks.{l}."
        for theirs, mine in (("self_attn_layer_norm", "attn_norm"), ("self_attn.ln", "attn.sub_ln"),
                             ("final_layer_norm", "ffn_norm")):
            for p in ("weight", "bias"):
                copy(pre + f"{theirs}.{p}", (D,), ours + f"{mine}.{p}")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            copy(pre + f"self_attn.{proj}.weight", (D, D), ours + f"attn.{proj}.weight")
            if proj != "k_proj":
                copy(pre + f"self_attn.{proj}.bias", (D,), ours + f"attn.{proj}.bias")
        if cfg.layer_scale_init:
            copy(pre + "gamma_1", (D,), ours + "gamma_attn")
            copy(pre + "gamma_2", (D,), ours + "gamma_ffn")
        for m, name in enumerate(MODALITIES):
            ffn = pre + f"{name}_ffn."
            into(ffn + "0.wi_0.weight", (F, D), ours + "ffn.w_gate", m, transpose=True)
            into(ffn + "0.wi_1.weight", (F, D), ours + "ffn.w_in", m, transpose=True)
            into(ffn + "2.weight", (F,), ours + "ffn.ln_weight", m)
            into(ffn + "2.bias", (F,), ours + "ffn.ln_bias", m)
            into(ffn + "3.weight", (D, F), ours + "ffn.w_out", m, transpose=True)
            into(ffn + "3.bias", (D,), ours + "ffn.b_out", m)
    for m, name in enumerate(MODALITIES):
        into(FM + f"{name}_layer_norm.weight", (D,), "final_norm.weight", m)
        into(FM + f"{name}_layer_norm.bias", (D,), "final_norm.bias", m)
        copy(f"{name}_proj.weight", (E, D), f"heads.{m}.weight")
        copy(f"{name}_proj.bias", (E,), f"heads.{m}.bias")
    copy("logit_scale", (), "logit_scale")
    return rules


def _names(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_keys(state: dict[str, torch.Tensor], rules: list[Rule], cfg: OmniConfig) -> None:
    expected = {name: shape for name, shape, *_ in rules}
    known = set(expected) | set(IGNORED_BUFFERS) | set(RP_BUCKETS) | set(DROPPED)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in known]
    bad = [f"{k}: checkpoint {tuple(state[k].shape)}, architecture {shape}"
           for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    bad += [f"{k}: checkpoint {tuple(state[k].shape)}, architecture (1, {cfg.dim})"
            for k in DROPPED if k in state and tuple(state[k].shape) != (1, cfg.dim)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        features = sorted({desc for k in unexpected for frag, desc in OPTIONAL_FEATURES.items() if frag in k})
        hint = f" (optional layers not in the released architecture: {'; '.join(features)})" if features else ""
        problems.append(f"unexpected keys: {_names(unexpected)}{hint}")
    if bad:
        problems.append(f"shapes that disagree: {'; '.join(bad[:12])}" + (" …" if len(bad) > 12 else ""))
    if problems:
        raise ValueError("not a ONE-PEACE retrieval checkpoint of the inferred architecture "
                         f"(width {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}): " + " | ".join(problems))


def _check_buckets(state: dict[str, torch.Tensor], cfg: OmniConfig) -> None:
    """The stored bucket index tables must be the ones the model rebuilds."""
    grid = cfg.image_size // 16
    ours = {TA + "rp_bucket": bucket_lut_1d(MAX_POSITION, cfg.text_bucket)[0],
            IA + "rp_bucket": beit_lut_2d(grid, grid)[0],
            AA + "rp_bucket": bucket_lut_1d(MAX_POSITION, cfg.audio_bucket)[0]}
    for key, lut in ours.items():
        if key in state and (state[key].shape != lut.shape or not torch.equal(state[key].long(), lut.long())):
            raise ValueError(f"{key} {tuple(state[key].shape)} is not ONE-PEACE's bucket table for this "
                             f"architecture {tuple(lut.shape)}: the checkpoint uses another bucketing")


# -------------------------------------------------------------------------------------- public
def load_one_peace(checkpoint: Any) -> OmniModel:
    """An :class:`OmniModel` (float32, eval mode) holding a released ONE-PEACE checkpoint.

    ``checkpoint``: a path to the released ``.pt``, the dict it holds (``"model"``: the flat
    state dict, optional ``"cfg"``), or a bare state dict with the released key names."""
    state, stored = read_checkpoint(checkpoint)
    cfg, strides_unknown = infer_config(state)
    if stored is not None:
        cfg = cross_check(cfg, stored)
    elif strides_unknown:
        kernels = [k for k, _ in cfg.audio_conv_layers]
        raise ValueError(f"audio conv kernels {kernels} differ from ONE-PEACE's and the checkpoint stores "
                         f"no config: the conv strides cannot be inferred from the weights")
    frames = SAMPLE_RATE * 15
    for k, s in cfg.audio_conv_layers:
        frames = (frames - k) // s + 1
    cfg = _with(cfg, audio_max_frames=min(frames, MAX_POSITION - 1))
    rules = key_rules(cfg)
    _check_keys(state, rules, cfg)
    _check_buckets(state, cfg)
    with torch.device("meta"):  # no random init of billions of weights that get replaced
        model = OmniModel(cfg)
    target = model.state_dict()
    ours: dict[str, torch.Tensor] = {}
    for name, _, key, m, transpose in rules:
        t = state[name].detach().to("cpu", torch.float32)
        t = t.t() if transpose else t
        if m is None:
            ours[key] = t.reshape(target[key].shape).clone()
        else:
            ours.setdefault(key, torch.empty(target[key].shape))[m] = t
    unset = sorted(set(target) - set(ours))
    if unset:  # a bug in key_rules, not in the checkpoint
        raise RuntimeError(f"load_one_peace left parameters unset: {unset}")
    model.load_state_dict(ours, strict=True, assign=True)
    model.rebuild_buffers()
    return model.eval()


def convert_main(argv: list[str] | None = None) -> int:
    """``omni convert one-peace CKPT --out DIR``: the checkpoint as ``DIR/model.safetensors``."""
    from omni_core.train.checkpoint import save_checkpoint
    from omni_core.train.trainer import FINAL

    p = argparse.ArgumentParser(prog="omni convert one-peace",
                                description="Convert a released ONE-PEACE checkpoint to omni-core's format.")
    p.add_argument("checkpoint", help="the released .pt (e.g. one-peace.pt)")
    p.add_argument("--out", required=True, type=Path, help="output directory (gets model.safetensors)")
    a = p.parse_args(argv)
    model = load_one_peace(a.checkpoint)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"config": asdict(model.cfg), "args": {"data": None, "preset": None},
            "source": {"one_peace": str(a.checkpoint)}}
    save_checkpoint(a.out / FINAL, model, None, meta)
    print(f"wrote {a.out / FINAL}: ONE-PEACE width {model.cfg.dim}, depth {model.cfg.depth}, "
          f"heads {model.cfg.heads}, {model.num_parameters():,} parameters")
    return 0


__all__ = ["convert_main", "cross_check", "infer_config", "key_rules", "load_one_peace", "read_checkpoint"]
