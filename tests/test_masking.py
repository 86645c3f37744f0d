"""ONE-PEACE's masking policies: ratios, whole words, complementary joint masks, spans."""

import math

import pytest
import torch

from omni_core.train import masking


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def words(word_start: torch.Tensor) -> list[list[int]]:
    out = []
    for i, s in enumerate(word_start.tolist()):
        if s or not out:
            out.append([])
        out[-1].append(i)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_whole_word_mask_masks_whole_words_at_the_ratio(seed):
    starts = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    mask = masking.whole_word_mask(starts, 0.4, gen(seed))
    masked_words = [w for w in words(starts) if mask[w].any()]
    assert all(mask[w].all() for w in masked_words)  # never half a word
    assert len(masked_words) == math.ceil(5 * 0.4)
    assert mask.sum() == sum(len(w) for w in masked_words)


def test_complementary_text_mask_hides_what_the_text_view_kept_first():
    uni = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    joint = masking.complementary_mask(uni, 0.4, gen())
    assert joint.sum() == 4 and not (joint & uni).any()
    joint = masking.complementary_mask(uni, 0.9, gen())  # more than the kept units: masked ones follow
    assert joint.sum() == 9 and (joint | uni).all()


@pytest.mark.parametrize("seed", range(3))
def test_complementary_image_mask_keeps_a_subset_of_the_image_views_masked_patches(seed):
    uni = masking.random_mask(256, 0.75, gen(seed))
    assert uni.sum() == 192
    joint = masking.complementary_image_mask(uni, 0.6875, gen(seed + 10))
    assert joint.sum() == 176
    assert joint[~uni].all()  # every patch the image view saw is hidden in the joint view
    kept = ~joint
    assert uni[kept].all() and kept.sum() == 80


@pytest.mark.parametrize("n", [7, 50, 333])
def test_block_mask_has_the_exact_ratio_and_runs_of_frames(n):
    mask = masking.block_mask_1d(n, 0.55, 5, gen(n))
    assert mask.sum() == int(n * 0.55)
    if n >= 50:  # spans: far fewer runs than masked frames
        runs = int((mask[1:] & ~mask[:-1]).sum() + mask[0])
        assert runs < mask.sum() / 2


def test_keep_positions_include_cls_and_eos():
    mask = torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    assert masking.keep_positions(mask, trailing=1).tolist() == [0, 1, 4, 5]
    assert masking.masked_positions(mask).tolist() == [2, 3]


def test_masks_are_a_pure_function_of_the_generator():
    starts = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    assert torch.equal(masking.whole_word_mask(starts, 0.5, gen(3)), masking.whole_word_mask(starts, 0.5, gen(3)))
    assert torch.equal(masking.block_mask_1d(40, 0.45, 5, gen(4)), masking.block_mask_1d(40, 0.45, 5, gen(4)))
