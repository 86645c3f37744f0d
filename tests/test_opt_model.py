"""OptModel: presets, the packed two-pass encoder against one pass per sequence (fp64), the
decoders' cached incremental logits against recomputation and teacher forcing, and errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from omni_core.model.opt import (
    AUDIO,
    IMAGE,
    PRESETS,
    TEXT,
    Encoded,
    OptConfig,
    OptModel,
    TripletView,
)


def small_config(**overrides) -> OptConfig:
    base = replace(PRESETS["opt-tiny"], dim=32, heads=2, ffn_hidden=48, depth=2, unimodal_depth=1, dec_dim=24,
                   dec_heads=2, dec_ffn=40, dec_depth=2, vocab_size=64, codebook_size=16, stem_channels=8,
                   audio_channels=16, audio_pos_groups=4)
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def model() -> OptModel:
    torch.manual_seed(0)
    return OptModel(small_config()).double().eval()


def inputs(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text = [torch.cat([torch.randint(5, 64, (3 + 2 * i,), generator=g), torch.tensor([3])]) for i in range(n)]
    image = torch.randn(n, 3, 64, 64, generator=g, dtype=torch.float64)
    audio = [torch.randn(8000 + 1777 * i, generator=g, dtype=torch.float64) for i in range(n)]
    return text, image, audio


def test_large_preset_mirrors_the_release_on_meta():
    cfg = PRESETS["opt-large"]
    assert (cfg.depth, cfg.dim, cfg.heads, cfg.ffn_hidden) == (24, 4096, 32, 16384)
    big = OptModel.from_preset("opt-large", device="meta")
    assert big.blocks[0].ffn.w_in.shape == (1, 4096, 16384)
    assert big.blocks[0].attn.num_heads == 32
    assert big.num_parameters() > 5e9


def test_packed_encoder_equals_one_pass_per_sequence(model):
    text, image, audio = inputs()
    masked_ids = text[1].clone()
    masked_ids[0] = 4
    views = [TripletView(0, 0, 0),
             TripletView(1, 1, 1, text_ids=masked_ids, image_mask=torch.arange(16) % 3 == 0),
             TripletView(None, 2, 2, audio_mask=torch.arange(model.audio.num_frames(audio[2].numel())) < 4),
             TripletView(2, 0, 1),  # triplet matching's swapped image and audio
             TripletView(0, None, None), TripletView(None, None, 1), TripletView(None, 2, None)]
    packed = model.encode_views(text, image, audio, views)
    alone = Encoded.concat([model.encode_views(text, image, audio, [v]) for v in views])
    assert packed.spans == alone.spans
    assert torch.equal(packed.cu_seqlens, alone.cu_seqlens)
    torch.testing.assert_close(packed.x, alone.x, rtol=1e-10, atol=1e-10)
    # the segment layout: [text; image; audio], CLS first in each
    assert packed.spans[0] == {TEXT: (0, 5), IMAGE: (5, 17), AUDIO: (22, packed.spans[0][AUDIO][1])}
    assert list(packed.spans[2]) == [IMAGE, AUDIO]


def test_masked_unit_does_not_leak_its_content(model):
    """A masked patch's pixels must not reach the encoder output (the mask replaces it after
    the per-patch stem), nor a left-out modality."""
    text, image, audio = inputs(1)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[5] = True
    view = [TripletView(0, 0, 0, image_mask=mask)]
    before = model.encode_views(text, image, audio, view).x
    changed = image.clone()
    changed[0, :, 16:32, 16:32] += 5.0  # patch (1, 1) = index 5
    torch.testing.assert_close(model.encode_views(text, changed, audio, view).x, before, rtol=0, atol=0)
    no_image = [TripletView(0, None, 0)]
    torch.testing.assert_close(model.encode_views(text, changed, audio, no_image).x,
                               model.encode_views(text, image, audio, no_image).x, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["text", "image"])
def test_cached_incremental_logits_equal_recomputation_and_teacher_forcing(model, which):
    text, image, audio = inputs()
    memory = model.encode(image=image) if which == "text" else model.encode(text=text, audio=audio)
    steps = 6
    runs = {}
    for use_cache in (True, False):
        dec = model.text_decoding(memory, use_cache) if which == "text" else model.image_decoding(memory, use_cache)
        g = torch.Generator().manual_seed(3)
        state = dec.start(torch.tensor([2, 0, 1, 2]))
        tokens = torch.full((4,), dec.bos_id)
        fed, logits = [tokens], []
        for t in range(steps):
            out = dec.step(state, tokens)
            assert out.shape == (state.rows.numel(), dec.vocab_size) and out.dtype == torch.float32
            logits.append(out)
            tokens = torch.randint(0, dec.vocab_size, (state.rows.numel(),), generator=g)
            if t == 2:  # beam search keeps and reorders rows
                keep = torch.tensor([3, 3, 0])
                state = dec.select(state, keep)
                tokens = tokens[keep]
                fed = [f[keep] for f in fed]
            fed.append(tokens)
        runs[use_cache] = (logits, fed, state.rows)
    for a, b in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the last step's logits also equal a teacher-forced pass over the whole prefix
    decoder = model.text_decoder if which == "text" else model.image_decoder
    prefix = torch.stack(runs[True][1][:steps], dim=1)
    forced = decoder(list(prefix.unbind(0)), memory.select(runs[True][2])).view(3, steps, -1)[:, -1]
    torch.testing.assert_close(runs[True][0][-1], forced.float(), rtol=1e-5, atol=1e-5)
    assert dec.eos_id == (3 if which == "text" else None)


def test_patch_codes_map_patches_onto_the_8x8_grid(model):
    codes = torch.arange(64).view(1, 64)
    per_patch = model.patch_codes(codes)  # 64 px: 4×4 patches, each over 2×2 code cells
    assert per_patch.shape == (1, 16, 4)
    assert per_patch[0, 0].tolist() == [0, 1, 8, 9]
    assert per_patch[0, 5].tolist() == [18, 19, 26, 27]
    big = OptModel(small_config(image_size=256))  # 16×16 patches: 4 patches share a cell
    shared = big.patch_codes(codes)
    assert shared.shape == (1, 256, 1)
    assert shared[0, [0, 1, 16, 17, 2], 0].tolist() == [0, 0, 0, 0, 1]


def test_pixel_patches_are_row_major_16px_blocks(model):
    images = torch.randn(2, 3, 64, 64)
    patches = model.pixel_patches(images)
    assert patches.shape == (2, 16, 768)
    torch.testing.assert_close(patches[1, 6], images[1, :, 16:32, 32:48].reshape(-1))


def test_audio_targets_one_row_per_frame(model):
    wave = torch.randn(12000, dtype=torch.float64)
    target = model.audio_targets(wave)
    assert target.shape == (model.audio.num_frames(12000), 64)
    assert torch.isfinite(target).all()


def test_errors_name_the_problem(model):
    text, image, audio = inputs()
    with pytest.raises(ValueError, match="window"):
        model.text_decoder([torch.zeros(73, dtype=torch.long)], model.encode(image=image[:1]))
    dec = model.image_decoding(model.encode(image=image[:1]))
    state = dec.start(torch.tensor([0]))
    for _ in range(64):
        dec.step(state, torch.tensor([0]))
    with pytest.raises(ValueError, match="window"):
        dec.step(state, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"images must be \[N, 3, 64, 64\]"):
        model.encode(image=torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one"):
        model.encode()
    with pytest.raises(ValueError, match="different numbers"):
        model.encode(text=text[:2], image=image)
    with pytest.raises(ValueError, match="leaves out every modality"):
        model.encode_views(text, image, audio, [TripletView(None, None, None)])
    with pytest.raises(ValueError, match="mask has 3 units"):
        model.encode_views(text, image, audio, [TripletView(0, 0, 0, image_mask=torch.ones(3, dtype=torch.bool))])
    with pytest.raises(ValueError, match="rows must index"):
        model.text_decoding(model.encode(image=image)).start(torch.tensor([5]))
    with pytest.raises(ValueError, match="image_size"):
        small_config(image_size=48)
    with pytest.raises(ValueError, match="unknown OPT preset"):
        OptModel.from_preset("opt-huge")


def test_decoding_runs_under_bf16_autocast_and_in_train_mode():
    torch.manual_seed(0)
    model = OptModel(small_config(dropout=0.1, dec_dropout=0.2))  # train mode, dropout on
    text, image, audio = inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model.encode(image=image.float())
        for use_cache in (True, False):
            dec = model.text_decoding(memory, use_cache)
            state = dec.start(torch.tensor([0, 1]))
            logits = dec.step(state, torch.full((2,), dec.bos_id))
            logits = dec.step(state, logits.argmax(-1))
            assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.training
