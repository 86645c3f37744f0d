"""Captioning metrics: BLEU-4 / CIDEr-D against published and hand-computed scores, caption
attribute accuracy, and the colour of generated images against the generator's palette."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from omni_core.data import synth
from omni_core.eval.captioning import (
    Obj,
    attribute_accuracy,
    attribute_scores,
    caption_scores,
    colour_match,
    colour_shares,
    dominant_colour,
    parse_caption,
    tokenize,
)

# The BLEU paper's example (Papineni et al. 2002, candidate 1 and its three references).
CANDIDATE = "It is a guide to action which ensures that the military always obeys the commands of the party."
REFERENCES = [
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party.",
    "It is the practical guide for the army always to heed the directions of the party.",
]


def test_tokenize_drops_case_and_punctuation() -> None:
    assert tokenize("A Red  star, on the LEFT.") == "a red star on the left"


def test_bleu4_matches_published_example() -> None:
    # NLTK's documented sentence_bleu of this pair is 0.5045666840058485 (uniform weights, 1-4 grams);
    # the paper gives the modified precisions 17/18 (unigrams) and 10/17 (bigrams): BLEU-2 = sqrt(10/18).
    scores = caption_scores([CANDIDATE], [REFERENCES])
    assert scores["bleu4"] == pytest.approx(0.5045666840058485, abs=1e-8)


def test_cider_hand_computed() -> None:
    # Two images, one reference each. idf of an n-gram in one of the two references is log 2, of "a"
    # (in both) 0. Identical captions: cosine 1 for 1-, 2-, 3-grams, no 4-grams -> 10 * 3/4 = 7.5.
    # "a red square" vs "a red circle": unigram and bigram cosines 1/2, none above -> 10 * 1/4 = 2.5.
    refs = ["a red circle", "a blue square"]
    assert caption_scores(refs, refs)["cider"] == pytest.approx(7.5)
    assert caption_scores(["a red square", "a blue square"], refs)["cider"] == pytest.approx((2.5 + 7.5) / 2)


def test_caption_scores_bad_input() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        caption_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no captions"):
        caption_scores([], [])
    with pytest.raises(ValueError, match="no reference"):
        caption_scores(["a"], [[]])


def test_parse_caption_generator_grammar() -> None:
    rng = random.Random()
    for _ in range(50):
        items = synth._random_items(rng)
        assert parse_caption(synth.caption_of(items)) == [Obj(i.colour, i.shape, i.position) for i in items]
    assert parse_caption("a red thing somewhere") == [Obj("red", None, None)]
    assert parse_caption("") == []


def test_attribute_scores_hand_computed() -> None:
    truth = [Obj("red", "star", "left"), Obj("blue", "circle", "top")]
    assert attribute_scores(truth[::-1], truth) == {"colour": 1, "shape": 1, "position": 1, "all": 1, "exact": 1}
    # right place, wrong colour on one object: 5 of 6 attributes
    got = attribute_scores([Obj("red", "star", "left"), Obj("green", "circle", "top")], truth)
    assert got["all"] == pytest.approx(5 / 6) and got["colour"] == 0.5 and got["exact"] == 0
    # one object missing: its three attributes are lost
    assert attribute_scores([Obj("blue", "circle", "top")], truth)["all"] == pytest.approx(3 / 6)
    # an invented third object widens the denominator: 6 of 9
    extra = [*truth, Obj("red", "square", "bottom")]
    assert attribute_scores(extra, truth)["all"] == pytest.approx(6 / 9)
    # wrong position: paired in order, colour and shape still count
    got = attribute_scores([Obj("red", "star", "right")], truth[:1])
    assert got == {"colour": 1, "shape": 1, "position": 0, "all": pytest.approx(2 / 3), "exact": 0}


def test_attribute_accuracy_on_synthetic_metadata() -> None:
    rng = random.Random()
    item_lists = [synth._random_items(rng) for _ in range(20)]
    metas = [{"items": [{"colour": i.colour, "shape": i.shape, "position": i.position} for i in items]}
             for items in item_lists]
    captions = [synth.caption_of(items) for items in item_lists]
    assert attribute_accuracy(captions, metas)["all"] == 1.0
    wrong = [c.replace("red", "blue") if "red" in c else c.replace("blue", "red") for c in captions]
    acc = attribute_accuracy(wrong, metas)
    assert acc["shape"] == 1.0 and acc["position"] == 1.0 and acc["colour"] < 1.0
    with pytest.raises(ValueError, match="2 captions but 1"):
        attribute_accuracy(captions[:2], metas[:1])


def _render(items: tuple[synth.Item, ...], size: int = 64) -> bytes:
    plan = synth.Plan("k", "eval", items, "en-us", 170, 0, size)
    return synth.render_image(plan, random.Random())


def test_dominant_colour_of_generator_images() -> None:
    rng = random.Random()
    for colour in synth.COLOURS:
        for _ in range(3):
            item = synth.Item(colour, rng.choice(synth.SHAPES), rng.choice(sorted(synth.POSITIONS)))
            assert dominant_colour(_render((item,))) == colour


def test_colour_match_and_background_only() -> None:
    rng = random.Random()
    item_lists = [synth._random_items(rng) for _ in range(12)]
    images = [_render(items) for items in item_lists]
    captions = [synth.caption_of(items) for items in item_lists]
    assert colour_match(images, captions) == {"match": 1.0, "all_present": 1.0}
    blank = np.full((64, 64, 3), 225, dtype=np.uint8)
    assert dominant_colour(blank) is None and sum(colour_shares(blank).values()) == 0
    # a PNG file of a blue square, a caption naming red: no match
    img = np.full((64, 64, 3), 230, dtype=np.uint8)
    img[20:40, 20:40] = synth.COLOURS["blue"]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    assert colour_match([buf.getvalue()], ["a red square in the center"])["match"] == 0.0
    assert colour_match([buf.getvalue()], ["a blue square in the center"])["match"] == 1.0
    with pytest.raises(ValueError, match="uint8"):
        colour_shares(np.zeros((4, 4), dtype=np.float32))
