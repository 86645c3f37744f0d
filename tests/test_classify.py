"""Zero-shot classification with prompted class names."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from omni_core.eval.classify import TASKS, label_of, prompts, zero_shot
from omni_core.eval.retrieval import evaluate


def test_labels_come_from_single_object_captions_only():
    assert label_of("a red star on the left") == {"shape": "star", "colour": "red"}
    assert label_of("a red star on the left and a blue circle at the top") is None
    assert len(prompts("shape", "star")) == 30 and all("star" in p for p in prompts("shape", "star"))


class StubTokenizer:
    def encode(self, text):
        return [hash(w) % 997 for w in text.split()]


class StubModel:
    """Text embedding = one-hot of the caption's shape (dims 0-5) + colour (dims 6-11)."""

    def embed_texts(self, ids):
        out = []
        for t in ids:
            v = torch.zeros(12)
            for k, name in enumerate(TASKS["shape"] + TASKS["colour"]):
                if hash(name) % 997 in t.tolist():
                    v[k] = 1.0
            out.append(F.normalize(v, dim=0))
        return torch.stack(out)


def test_zero_shot_picks_the_class_whose_prompts_match():
    captions = ["a red star on the left", "a blue circle at the top", "a red star on the left and a blue circle"]
    shapes, colours = TASKS["shape"], TASKS["colour"]
    image = torch.zeros(3, 12)
    image[0, shapes.index("star")] = image[0, 6 + colours.index("red")] = 1  # right shape and colour
    image[1, shapes.index("star")] = image[1, 6 + colours.index("green")] = 1  # both wrong
    audio = image.flip(0)  # sample 1 gets sample 2's (unlabelled) row: wrong; sample 0 gets a zero row
    out = zero_shot(StubModel(), StubTokenizer(), captions, {"image": F.normalize(image, dim=1), "audio": audio})
    assert out["num_samples"] == 2
    assert out["image_shape_acc"] == 0.5 and out["image_colour_acc"] == 0.5
    assert out["shape_chance"] == pytest.approx(1 / 6, abs=1e-4)
    with pytest.raises(ValueError, match="single-object"):
        zero_shot(StubModel(), StubTokenizer(), captions[2:], {"image": image[2:], "audio": audio[2:]})


def test_eval_classify_on_a_trained_run(dataset, tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "omni_core.cli", "pretrain", "--data", str(dataset), "--out", str(run),
                    "--steps", "1", "--batch-size", "8", "--recipe", "contrastive", "--loader", "pil",
                    "--no-progress"], check=True, capture_output=True)
    result = evaluate(run, dataset, "pil", classify=True)["classify"]
    assert result["num_samples"] >= 1
    for key in ("image_shape_acc", "image_colour_acc", "audio_shape_acc", "audio_colour_acc"):
        assert 0.0 <= result[key] <= 1.0
