"""ONE-PEACE's loss pieces against small cases computed by hand (float64)."""

import math

import pytest
import torch

from omni_core.train.objectives import cross_modal_contrast, denoising_contrast, label_smoothed_nll, logit_scale_exp

f64 = torch.float64


def test_label_smoothed_nll_matches_the_fairseq_formula_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=f64)
    lp = probs.log()
    target = torch.tensor([0, 2])
    eps = 0.1
    eps_i = eps / 2  # eps / (V - 1), V = 3
    row0 = (1 - eps - eps_i) * -math.log(0.7) + eps_i * -(math.log(0.7) + math.log(0.2) + math.log(0.1))
    row1 = (1 - eps - eps_i) * -math.log(0.5) + eps_i * -(2 * math.log(0.25) + math.log(0.5))
    assert label_smoothed_nll(lp, target, eps).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    assert label_smoothed_nll(lp, target).item() == pytest.approx(-(math.log(0.7) + math.log(0.5)) / 2, rel=1e-12)


def test_cross_modal_contrast_by_hand_and_candidates_carry_no_gradient():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=f64, requires_grad=True)
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0]], dtype=f64, requires_grad=True)
    s = torch.tensor(2.0, dtype=f64)
    loss = cross_modal_contrast(a, b, s)
    sim = [[0.8, 0.0], [0.96, 0.8]]  # a_i . b_j

    def ce(row, k):
        return -(2 * row[k] - math.log(sum(math.exp(2 * v) for v in row)))

    ab = (ce(sim[0], 0) + ce(sim[1], 1)) / 2
    ba = (ce([sim[0][0], sim[1][0]], 0) + ce([sim[0][1], sim[1][1]], 1)) / 2
    assert loss.item() == pytest.approx((ab + ba) / 2, rel=1e-12)
    # The released code scores a against b.data and b against a.data: a's gradient comes
    # from the a->b direction only.
    loss.backward()
    a2 = a.detach().clone().requires_grad_(True)
    logits = s * a2 @ b.detach().t()
    (0.5 * torch.nn.functional.cross_entropy(logits, torch.arange(2))).backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-12, atol=1e-14)


def test_cross_modal_contrast_offsets_targets_into_gathered_candidates():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, dtype=f64), torch.randn(3, 4, dtype=f64)
    other_a, other_b = torch.randn(2, 4, dtype=f64), torch.randn(2, 4, dtype=f64)
    s = torch.tensor(1.5, dtype=f64)
    loss = cross_modal_contrast(a, b, s, torch.cat([other_a, a]), torch.cat([other_b, b]), offset=2)
    t = torch.arange(3) + 2
    ref = 0.5 * (torch.nn.functional.cross_entropy(s * a @ torch.cat([other_b, b]).t(), t)
                 + torch.nn.functional.cross_entropy(s * b @ torch.cat([other_a, a]).t(), t))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)


def test_denoising_contrast_by_hand():
    student = torch.tensor([[2.0, 0.0]], dtype=f64)  # one masked unit
    teacher = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], dtype=f64)  # three teacher tokens
    loss = denoising_contrast(student, teacher, torch.tensor([0]), scale=2.5, epsilon=0.1)
    cos = [1.0, 0.0, -1.0]
    logz = math.log(sum(math.exp(2.5 * c) for c in cos))
    lp = [2.5 * c - logz for c in cos]
    eps_i = 0.1 / 2
    expected = (1 - 0.1 - eps_i) * -lp[0] + eps_i * -sum(lp)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_denoising_contrast_detaches_the_teacher_and_needs_a_masked_unit():
    student = torch.randn(2, 4, dtype=f64, requires_grad=True)
    teacher = torch.randn(5, 4, dtype=f64, requires_grad=True)
    denoising_contrast(student, teacher, torch.tensor([1, 3])).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="masked unit"):
        denoising_contrast(student[:0], teacher, torch.tensor([], dtype=torch.long))


def test_logit_scale_is_clamped_in_place_at_ln_100():
    p = torch.nn.Parameter(torch.tensor(6.0))
    assert logit_scale_exp(p).item() == pytest.approx(100.0)
    assert p.item() == pytest.approx(math.log(100.0))
