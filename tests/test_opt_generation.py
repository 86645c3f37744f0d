"""OPT generation on a random-initialised opt-tiny: beam search over the real decoders' KV cache
equals beam search by recomputation, captioning / imagining / matching-head retrieval run and
give well-formed output, and bad input gets a clear error."""

from __future__ import annotations

import random

import pytest
import torch

from omni_core.data import synth
from omni_core.data.tokenizer import train_tokenizer
from omni_core.eval.generation import OptRun, caption, imagine, matching_recall, text_ids
from omni_core.generate import beam_search
from omni_core.model.opt import OptModel
from omni_core.model.vq import VQConfig, VQTokenizer


@pytest.fixture(scope="module")
def run() -> OptRun:
    torch.manual_seed(1)
    model = OptModel.from_preset("opt-tiny", audio_max_frames=100).eval()
    rng = random.Random(0)
    tokenizer = train_tokenizer([synth.caption_of(synth._random_items(rng)) for _ in range(200)])
    return OptRun(model, {"args": {}}, tokenizer, None)


def _samples(n: int, run: OptRun):
    images = torch.randn(n, 3, 64, 64)
    audio = [torch.randn(16000 + 800 * i) for i in range(n)]  # about 1 s each
    texts = [text_ids(run.tokenizer, "a red star on the left")] * n
    return images, audio, texts


@pytest.mark.parametrize("which", ["text", "image"])
def test_beam_cached_equals_recomputed_on_opt(run: OptRun, which: str) -> None:
    images, audio, texts = _samples(3, run)
    memory = run.model.encode(image=images, audio=audio)
    make = run.model.text_decoding if which == "text" else run.model.image_decoding
    max_len = 8  # a prefix of the image decoder's 64 codes is enough to compare the two paths
    rows = torch.tensor([0, 2, 1])
    cached = beam_search(make(memory, use_cache=True), rows, max_len, beam=3, n_best=3)
    recomputed = beam_search(make(memory, use_cache=False), rows, max_len, beam=3, n_best=3)
    for a, b in zip(cached, recomputed):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_caption_imagine_matching(run: OptRun) -> None:
    images, audio, texts = _samples(2, run)
    assert len(caption(run, images=images)) == 2
    assert len(caption(run, audio=audio, beam=2)) == 2
    assert len(caption(run, images=images, audio=audio)) == 2
    vq = VQTokenizer(VQConfig(image_size=64, codebook_size=run.model.cfg.codebook_size))
    pictures = imagine(run, vq, texts=texts)
    assert pictures.shape == (2, 64, 64, 3) and pictures.dtype.name == "uint8"
    assert imagine(run, vq, audio=audio).shape == (2, 64, 64, 3)
    # top-k sampling: the seed fixes the images; top_k = 1 is greedy
    sampled = imagine(run, vq, texts=texts, top_k=32, seed=3)
    assert (sampled == imagine(run, vq, texts=texts, top_k=32, seed=3)).all()
    assert not (sampled == imagine(run, vq, texts=texts, top_k=32, seed=4)).all()
    assert (imagine(run, vq, texts=texts, top_k=1) == pictures).all()
    from omni_core.data.sample import Sample

    samples = [Sample(str(i), images[i], audio[i], "x", texts[i]) for i in range(2)]
    r1 = matching_recall(run, samples)
    assert set(r1) == {"text->image", "image->text", "text->audio", "audio->text", "image->audio",
                       "audio->image", "chance"}
    assert all(0.0 <= v <= 1.0 for v in r1.values())


def test_bad_input(run: OptRun) -> None:
    with pytest.raises(ValueError, match=r"images \[N, 3, 64, 64\]"):
        caption(run, images=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no VQ image tokenizer"):
        run.vq()
    with pytest.raises(ValueError, match="at most 70"):
        text_ids(run.tokenizer, " ".join(["a red star on the left"] * 30))
    with pytest.raises(ValueError, match="empty"):
        text_ids(run.tokenizer, "")


def test_cli_dispatches_opt_eval_and_demo() -> None:
    from omni_core.cli import OPT_COMMANDS, _recipe

    assert _recipe(["--run", "R", "--recipe", "opt"]) == "opt"
    assert _recipe(["--recipe=opt"]) == "opt"
    assert _recipe(["--run", "R"]) is None
    assert OPT_COMMANDS["eval"] == ("omni_core.eval.generation", "eval_main")
