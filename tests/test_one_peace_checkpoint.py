"""A released-format ONE-PEACE checkpoint loads and reproduces ONE-PEACE's embeddings.

The checkpoint is built here from the released key names and shapes (small width, random
weights: non-zero relative-position tables, layer-scale gammas far from 1e-6, so every piece
matters). The reference below is an independent float64 implementation of the released
forward, written from ``/work/shared/ONE-PEACE.md`` in plain torch on the released state dict
(padded batches with ONE-PEACE's masks for text and images; audio clip by clip, the result a
clip has alone). It shares no code with ``omni_core.model``.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from omni_core.model.omni import PRESETS
from omni_core.model.one_peace import convert_main, infer_config, key_rules, load_one_peace

D, L, H, FF, V = 32, 2, 4, 48, 60  # width, layers, heads, FFN, vocabulary
BS_T, BS_A, R, STEM, C = 8, 16, 3, 8, 12  # buckets, image grid (48 px), stem and audio-conv channels
POS_DEPTH, POS_K, POS_GROUPS, TEXT_POS = 2, 5, 4, 20
CONVS = [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)]
SMALL = types.SimpleNamespace(D=D, L=L, H=H, FF=FF, V=V, BS_T=BS_T, BS_A=BS_A, R=R, STEM=STEM, C=C, CONVS=CONVS,
                              POS_DEPTH=POS_DEPTH, POS_K=POS_K, POS_GROUPS=POS_GROUPS, TEXT_POS=TEXT_POS)
# The released model (RS/finetune_3B.yaml; ONE-PEACE.md header): stem D/4, pos conv k = 95 // 5.
RELEASED = types.SimpleNamespace(D=1536, L=40, H=24, FF=6144, V=50264, BS_T=256, BS_A=512, R=16, STEM=384, C=512,
                                 CONVS=CONVS, POS_DEPTH=5, POS_K=19, POS_GROUPS=16, TEXT_POS=514)
MODS = ("text", "image", "audio")
TA, IA, AA = "encoder_wrapper.text_adapter.", "encoder_wrapper.image_adapter.", "encoder_wrapper.audio_adapter."
FM = "encoder_wrapper.fusion_model."


# ------------------------------------------------------------- ONE-PEACE.md §6, independently
def ref_bucket_1d(bs: int, n: int = 1024) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    rel = i[:, None] - i[None, :]
    mid = bs // 2
    far = mid + torch.ceil(torch.log(rel.abs().clamp(min=1) / mid) / math.log((n - 1) / mid) * (mid - 1))
    b = torch.where(rel.abs() <= mid, rel, torch.sign(rel) * far).long() + bs - 1
    b[0, :], b[:, 0], b[0, 0] = 2 * bs - 1, 2 * bs, 2 * bs + 1
    return b


def ref_bucket_2d(r: int) -> torch.Tensor:
    hw = torch.tensor([(h, w) for h in range(r) for w in range(r)])
    d = hw[:, None, :] - hw[None, :, :] + r - 1
    n = (2 * r - 1) ** 2 + 3
    b = torch.zeros(r * r + 1, r * r + 1, dtype=torch.long)
    b[1:, 1:] = d[..., 0] * (2 * r - 1) + d[..., 1]
    b[0, :], b[:, 0], b[0, 0] = n - 3, n - 2, n - 1
    return b


# ------------------------------------------------------------------ a released-format checkpoint
def released_state(seed: int = 0, a: types.SimpleNamespace | None = None, meta: bool = False) -> dict:
    """Every key of ``OnePeaceRetrievalModel`` with its released shape (ONE-PEACE.md §1); random
    values, or shape-only ``meta`` tensors (for the 4B architecture)."""
    a = a or SMALL
    D, L, H, FF, V = a.D, a.L, a.H, a.FF, a.V
    BS_T, BS_A, R, STEM, C, CONVS = a.BS_T, a.BS_A, a.R, a.STEM, a.C, a.CONVS
    POS_DEPTH, POS_K, POS_GROUPS, TEXT_POS = a.POS_DEPTH, a.POS_K, a.POS_GROUPS, a.TEXT_POS
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.3):
        if meta:
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * std
    def norm(prefix):
        return {prefix + "weight": 1 + w(*SHAPE_OF[prefix], std=0.2), prefix + "bias": w(*SHAPE_OF[prefix], std=0.2)}

    SHAPE_OF = {}
    s = {TA + "embed_tokens.weight": w(V, D), TA + "embed_positions.weight": w(TEXT_POS, D),
         TA + "cls_embedding": w(1, 1, D), TA + "rel_pos_table_list.0.weight": w(2 * BS_T + 2, H, std=0.5),
         TA + "rp_bucket": w(1024, 1024) if meta else ref_bucket_1d(BS_T)}
    s |= {IA + "embed_images.0.weight": w(STEM, 3, 4, 4), IA + "embed_images.0.bias": w(STEM),
          IA + "embed_images.3.weight": w(STEM, STEM, 2, 2, std=0.2), IA + "embed_images.3.bias": w(STEM),
          IA + "embed_images.6.weight": w(D, STEM, 2, 2, std=0.2), IA + "embed_images.6.bias": w(D),
          IA + "cls_embedding": w(1, 1, D), IA + "pos_embed": w(R * R + 1, D),
          IA + "rel_pos_table_list.0.weight": w((2 * R - 1) ** 2 + 3, H, std=0.5),
          IA + "rp_bucket": w(R * R + 1, R * R + 1) if meta else ref_bucket_2d(R),
          IA + "position_idx": torch.arange(R * R + 1)}
    for i in (1, 4):
        SHAPE_OF[IA + f"embed_images.{i}.layer_norm."] = (STEM,)
        s |= norm(IA + f"embed_images.{i}.layer_norm.")
    for i, (k, _) in enumerate(CONVS):
        s[AA + f"embed_audios.0.conv_layers.{i}.0.weight"] = w(C, 1 if i == 0 else C, k, std=0.5)
        SHAPE_OF[AA + f"embed_audios.0.conv_layers.{i}.2.1."] = (C,)
        s |= norm(AA + f"embed_audios.0.conv_layers.{i}.2.1.")
    SHAPE_OF[AA + "embed_audios.2."] = (C,)
    s |= norm(AA + "embed_audios.2.")
    s |= {AA + "embed_audios.3.weight": w(D, C), AA + "embed_audios.3.bias": w(D),
          AA + "cls_embedding": w(1, 1, D), AA + "cls_pos_embed": w(1, 1, D), AA + "mask_embedding": w(1, D),
          AA + "rel_pos_table_list.0.weight": w(2 * BS_A + 2, H, std=0.5),
          AA + "rp_bucket": w(1024, 1024) if meta else ref_bucket_1d(BS_A)}
    for j in range(1, POS_DEPTH + 1):
        s[AA + f"embed_positions.{j}.0.weight"] = w(D, D // POS_GROUPS, POS_K)
        s[AA + f"embed_positions.{j}.0.bias"] = w(D)
    s[FM + "version"] = torch.tensor([3.0])
    for m in MODS:
        SHAPE_OF[FM + f"{m}_layer_norm."] = (D,)
        s |= norm(FM + f"{m}_layer_norm.")
        s[f"{m}_proj.weight"], s[f"{m}_proj.bias"] = w(D, D, std=0.2), w(D)
    for l in range(L):
        p = FM + f"layers.{l}."
        for n in ("self_attn_layer_norm.", "self_attn.ln.", "final_layer_norm."):
            SHAPE_OF[p + n] = (D,)
            s |= norm(p + n)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[p + f"self_attn.{proj}.weight"] = w(D, D, std=0.25)
            if proj != "k_proj":
                s[p + f"self_attn.{proj}.bias"] = w(D)
        s[p + "gamma_1"], s[p + "gamma_2"] = 0.5 + w(D, std=0.2), 0.5 + w(D, std=0.2)
        for m in MODS:
            s[p + f"{m}_ffn.0.wi_0.weight"], s[p + f"{m}_ffn.0.wi_1.weight"] = w(FF, D, std=0.25), w(FF, D, std=0.25)
            SHAPE_OF[p + f"{m}_ffn.2."] = (FF,)
            s |= norm(p + f"{m}_ffn.2.")
            s[p + f"{m}_ffn.3.weight"], s[p + f"{m}_ffn.3.bias"] = w(D, FF, std=0.2), w(D)
    s["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return s


# ------------------------------------------------------------------ the released forward (§3-§9)
def ln(x, w=None, b=None):
    return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def encoder(S, x, bias, pad, m):
    """§7-§9: x [B,T,D], bias [B|1,H,T,T], pad [B,T] (True = padding) → L2-normalised CLS embeddings."""
    B, T, _ = x.shape
    x = x * (~pad)[..., None]
    bias = bias.expand(B, -1, -1, -1).masked_fill(pad[:, None, None, :], float("-inf"))
    hd = D // H
    for layer in range(L):
        p = FM + f"layers.{layer}."
        h = ln(x, S[p + "self_attn_layer_norm.weight"], S[p + "self_attn_layer_norm.bias"])
        q = (h @ S[p + "self_attn.q_proj.weight"].T + S[p + "self_attn.q_proj.bias"]) * hd**-0.5
        k = h @ S[p + "self_attn.k_proj.weight"].T
        v = h @ S[p + "self_attn.v_proj.weight"].T + S[p + "self_attn.v_proj.bias"]
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
        a = (torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
        a = ln(a, S[p + "self_attn.ln.weight"], S[p + "self_attn.ln.bias"])
        x = x + S[p + "gamma_1"] * (a @ S[p + "self_attn.out_proj.weight"].T + S[p + "self_attn.out_proj.bias"])
        h = ln(x, S[p + "final_layer_norm.weight"], S[p + "final_layer_norm.bias"])
        f = p + f"{m}_ffn."
        u = F.gelu(h @ S[f + "0.wi_0.weight"].T) * (h @ S[f + "0.wi_1.weight"].T)
        u = ln(u, S[f + "2.weight"], S[f + "2.bias"])
        x = x + S[p + "gamma_2"] * (u @ S[f + "3.weight"].T + S[f + "3.bias"])
    x = ln(x, S[FM + f"{m}_layer_norm.weight"], S[FM + f"{m}_layer_norm.bias"])
    return F.normalize(x[:, 0] @ S[f"{m}_proj.weight"].T + S[f"{m}_proj.bias"], dim=1)


def rel_bias(table, bucket):
    return table[bucket].permute(2, 0, 1)[None]  # [1, H, T, T]


def ref_texts(S, ids):
    n = max(len(t) for t in ids)
    tokens = torch.ones(len(ids), n, dtype=torch.long)  # fairseq pad id 1
    for i, t in enumerate(ids):
        tokens[i, :len(t)] = t
    pad = torch.cat([torch.zeros(len(ids), 1, dtype=torch.bool), tokens == 1], dim=1)
    x = torch.cat([S[TA + "cls_embedding"].expand(len(ids), 1, D), S[TA + "embed_tokens.weight"][tokens]], dim=1)
    x = x + S[TA + "embed_positions.weight"][: n + 1]
    bias = rel_bias(S[TA + "rel_pos_table_list.0.weight"], ref_bucket_1d(BS_T)[: n + 1, : n + 1])
    return encoder(S, x, bias, pad, "text")


def ref_images(S, images):
    def stem_ln(x, i):
        return ln(x.permute(0, 2, 3, 1), S[IA + f"embed_images.{i}.layer_norm.weight"],
                  S[IA + f"embed_images.{i}.layer_norm.bias"]).permute(0, 3, 1, 2)

    x = F.conv2d(images, S[IA + "embed_images.0.weight"], S[IA + "embed_images.0.bias"], stride=4)
    x = F.gelu(stem_ln(x, 1))
    x = F.gelu(stem_ln(F.conv2d(x, S[IA + "embed_images.3.weight"], S[IA + "embed_images.3.bias"], stride=2), 4))
    x = F.conv2d(x, S[IA + "embed_images.6.weight"], S[IA + "embed_images.6.bias"], stride=2).flatten(2).transpose(1, 2)
    x = torch.cat([S[IA + "cls_embedding"].expand(len(images), 1, D), x], dim=1) + S[IA + "pos_embed"]
    bias = rel_bias(S[IA + "rel_pos_table_list.0.weight"], ref_bucket_2d(R))
    return encoder(S, x, bias, torch.zeros(x.shape[:2], dtype=torch.bool), "image")


def hub_waveform(wave):
    wave = F.layer_norm(wave, wave.shape)[: 15 * 16000]  # the hub: normalise the whole clip, crop, tile
    if len(wave) < 16000:
        wave = wave.repeat(math.ceil(16000 / len(wave)))[:16000]
    return wave


def ref_audio_clip(S, wave):
    return ref_audio_batch(S, [wave])[0]


def ref_audio_batch(S, waves):
    """The hub's batch: zero-padded waveforms, padding mask [B, T+1] from the conv arithmetic."""
    waves = [hub_waveform(w) for w in waves]
    x = torch.zeros(len(waves), max(len(w) for w in waves), dtype=waves[0].dtype)
    for i, w in enumerate(waves):
        x[i, :len(w)] = w
    frames = []
    for w in waves:
        n = len(w)
        for k, s in CONVS:
            n = (n - k) // s + 1
        frames.append(n)
    x = x[:, None]
    for i, (_, s) in enumerate(CONVS):
        x = F.conv1d(x, S[AA + f"embed_audios.0.conv_layers.{i}.0.weight"], stride=s)
        x = F.gelu(ln(x.transpose(1, 2), S[AA + f"embed_audios.0.conv_layers.{i}.2.1.weight"],
                      S[AA + f"embed_audios.0.conv_layers.{i}.2.1.bias"]).transpose(1, 2))
    f = ln(x.transpose(1, 2), S[AA + "embed_audios.2.weight"], S[AA + "embed_audios.2.bias"])
    f = f @ S[AA + "embed_audios.3.weight"].T + S[AA + "embed_audios.3.bias"]  # [B, T, D]
    p = f.transpose(1, 2)
    for j in range(1, POS_DEPTH + 1):
        p = F.conv1d(p, S[AA + f"embed_positions.{j}.0.weight"], S[AA + f"embed_positions.{j}.0.bias"],
                     padding=POS_K // 2, groups=POS_GROUPS)
        p = F.gelu(ln(p.transpose(1, 2)).transpose(1, 2))
    B = len(waves)
    x = torch.cat([S[AA + "cls_embedding"].expand(B, 1, D), f], dim=1)
    x = x + torch.cat([S[AA + "cls_pos_embed"].expand(B, 1, D), p.transpose(1, 2)], 1)
    T = x.shape[1]
    pad = torch.arange(T)[None, :] > torch.tensor(frames)[:, None]  # column 0 (CLS) stays False
    bias = rel_bias(S[AA + "rel_pos_table_list.0.weight"], ref_bucket_1d(BS_A)[:T, :T])
    return encoder(S, x, bias, pad, "audio")


# ----------------------------------------------------------------------------------- the tests
def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.cat([torch.randint(4, V, (n,), generator=g), torch.tensor([2])]) for n in (3, 11, 7, 19 - 1)]
    images = torch.randn(3, 3, 16 * R, 16 * R, generator=g, dtype=torch.float64)
    # < 1 s (tiled), two ordinary clips, > 15 s (cropped)
    waves = [torch.randn(n, generator=g, dtype=torch.float64) * 0.1 for n in (5000, 21000, 17000, 256000)]
    return ids, images, waves


@pytest.fixture(scope="module")
def state():
    return {k: v.double() if v.is_floating_point() else v for k, v in released_state().items()}


@pytest.fixture(scope="module")
def reference(state):
    ids, images, waves = inputs()
    return (ref_texts(state, ids), ref_images(state, images),
            torch.stack([ref_audio_clip(state, w) for w in waves]))


def embeddings(model, dtype):
    ids, images, waves = inputs()
    return (model.embed_texts(ids), model.embed_images(images.to(dtype)),
            model.embed_audio([w.to(dtype) for w in waves]))


def test_loads_with_no_missing_or_unexpected_keys_and_infers_the_architecture(state):
    model = load_one_peace({"model": state})
    cfg = model.cfg
    assert not model.training
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.ffn_hidden, cfg.embed_dim, cfg.vocab_size) == (D, L, H, FF, D, V)
    assert (cfg.text_positions, cfg.text_bucket, cfg.audio_bucket, cfg.image_size) == (TEXT_POS, BS_T, BS_A, 16 * R)
    assert (cfg.stem_channels, cfg.audio_channels, cfg.audio_conv_layers) == (STEM, C, tuple(CONVS))
    assert (cfg.audio_pos_depth, cfg.audio_pos_width // cfg.audio_pos_depth, cfg.audio_pos_groups) == (POS_DEPTH, POS_K,
                                                                                                      POS_GROUPS)
    assert next(model.parameters()).dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters()) and not model.bias_lut.is_meta


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
def test_embeddings_match_the_released_forward(state, reference, dtype, bound):
    model = load_one_peace(state).to(dtype)  # a bare state dict works too
    for name, got, want in zip(MODS, embeddings(model, dtype), reference):
        assert got.shape == want.shape and got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        assert err <= bound, f"{name}: max abs error {err:.3g} > {bound}"
        assert torch.allclose(got.double().norm(dim=1), torch.ones(len(got), dtype=torch.float64))


def test_one_table_entry_and_the_positional_stack_matter(state, reference):
    """The comparison can fail: a perturbed table entry or conv weight changes the embeddings."""
    for key, index in ((TA + "rel_pos_table_list.0.weight", (2 * BS_T - 1, 1)),  # CLS query row, head 1
                       (IA + "rel_pos_table_list.0.weight", (5, 0)),
                       (AA + "embed_positions.2.0.weight", (3, 0, 1))):
        changed = dict(state)
        changed[key] = state[key].clone()
        changed[key][index] += 0.5
        got = embeddings(load_one_peace(changed).double(), torch.float64)
        moved = [(g - w).abs().max().item() for g, w in zip(got, reference)]
        assert max(moved) > 1e-4, f"{key}{index}: {moved}"


def test_loads_from_a_file_with_a_pickled_config(state, tmp_path):
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(encoder=types.SimpleNamespace(
        embed_dim=D, layers=L, attention_heads=H, ffn_embed_dim=FF,
        audio_adapter=types.SimpleNamespace(feature_encoder_spec=f"[({C}, 10, 5)] + [({C}, 3, 2)] * 4 + "
                                                                 f"[({C},2,2)] + [({C},2,2)]",
                                            conv_pos_width=POS_K * POS_DEPTH + 1, conv_pos_depth=POS_DEPTH))),
        task=types.SimpleNamespace(patch_image_size=16 * R))
    path = tmp_path / "one-peace.pt"
    torch.save({"model": state, "cfg": cfg}, path)  # needs weights_only=False to read back
    model = load_one_peace(path)
    assert model.cfg.audio_conv_layers == tuple(CONVS)
    ids, _, _ = inputs()
    assert torch.allclose(model.embed_texts(ids), load_one_peace(state).embed_texts(ids))
    cfg.model.encoder.layers = L + 1
    torch.save({"model": state, "cfg": cfg}, path)
    with pytest.raises(ValueError, match=r"model\.encoder\.layers: config 3, weights 2"):
        load_one_peace(path)


def _broken(state, drop=(), add=None, reshape=None):
    s = {k: v for k, v in state.items() if k not in drop}
    s.update(add or {})
    for k, shape in (reshape or {}).items():
        s[k] = torch.zeros(shape, dtype=torch.float64)
    return s


@pytest.mark.parametrize("change, message", [
    (dict(drop=[FM + "layers.1.gamma_1"]), r"missing keys: .*layers\.1\.gamma_1"),
    (dict(add={"encoder_wrapper.decoder.weight": torch.zeros(2)}),
     r"unexpected keys: encoder_wrapper\.decoder\.weight"),
    (dict(add={FM + "layers.0.self_attn.attn_ln.weight": torch.zeros(D)}), r"attn_ln.*scale_attn"),
    (dict(add={TA + "rel_pos_table_list.1.weight": torch.zeros(2 * BS_T + 2, H)}),
     r"one relative-position table per layer"),
    (dict(reshape={FM + "layers.0.self_attn.q_proj.bias": (D + 1,)}),
     r"shapes that disagree: .*layers\.0\.self_attn\.q_proj\.bias: checkpoint \(33,\), architecture \(32,\)"),
    (dict(reshape={FM + "layers.1.audio_ffn.3.weight": (D, FF + 2)}), r"layers\.1\.audio_ffn\.3\.weight"),
    (dict(drop=[TA + "rel_pos_table_list.0.weight"]), r"missing key .*text_adapter\.rel_pos_table_list\.0\.weight"),
    (dict(add={TA + "rp_bucket": ref_bucket_1d(BS_T).flip(0)}), r"text_adapter\.rp_bucket .*another bucketing"),
])
def test_bad_checkpoints_get_errors_naming_the_keys(state, change, message):
    with pytest.raises(ValueError, match=message):
        load_one_peace(_broken(state, **change))


def test_convert_writes_a_run_that_load_trained_reads(state, tmp_path, capsys):
    from omni_core.train.trainer import load_trained

    path = tmp_path / "one-peace.pt"
    torch.save({"model": state}, path)
    assert convert_main([str(path), "--out", str(tmp_path / "run")]) == 0
    assert "width 32, depth 2, heads 4" in capsys.readouterr().out
    model, _ = load_trained(tmp_path / "run")
    _, images, _ = inputs()
    assert torch.equal(model.embed_images(images.float()), load_one_peace(state).embed_images(images.float()))


def test_one_peace_4b_preset_is_the_released_architecture():
    """The released key set at the released shapes (meta tensors: no memory) infers exactly the
    ``one-peace-4b`` preset, and every key is accounted for."""
    state = released_state(a=RELEASED, meta=True)
    cfg, strides_unknown = infer_config(state)
    preset = PRESETS["one-peace-4b"]
    assert not strides_unknown
    training_only = ("drop_path", "layer_scale_init", "audio_max_frames")
    differ = {k: (v, getattr(cfg, k)) for k, v in vars(preset).items()
              if k not in training_only and getattr(cfg, k) != v}
    assert not differ
    names = {name for name, *_ in key_rules(cfg)}
    buffers = {k for k in state if k.endswith(("rp_bucket", "position_idx", "version", "mask_embedding"))}
    assert names == set(state) - buffers and len(names) == 40 * 33 + 68  # 33 per layer


def test_the_hub_batch_leaks_padding_into_short_clips_and_we_do_not(state, reference):
    """The documented deviation: ONE-PEACE's padded audio batch changes a short clip's embedding
    (padded frames feed its positional convs); ours is the clip's embedding alone."""
    _, _, waves = inputs()
    batched = ref_audio_batch(state, waves)
    leak = (batched - reference[2]).abs().max(dim=1).values
    assert leak[3] < 1e-12  # the longest clip has no padding
    assert leak[:3].max() > 1e-3, leak
    print(f"hub batch vs alone, max abs per clip: {[f'{v:.2e}' for v in leak.tolist()]}")
