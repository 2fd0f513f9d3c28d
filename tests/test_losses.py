"""Loss values against closed forms: the focal loss paper's Appendix B, its sanity figures, extreme logits."""

import numpy as np
import pytest

import minidet as md
import minidet.functional as F


def focal_grad_appendix_b(x, y, gamma):
    """dFL/dx = y (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1), y in {+1, -1} (Lin et al. 2017, Appendix B)."""
    p = 1 / (1 + np.exp(-x))
    p_t = np.where(y == 1, p, 1 - p)
    return y * (1 - p_t) ** gamma * (gamma * p_t * np.log(p_t) + p_t - 1)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_focal_loss_gradient_equals_the_papers_closed_form(gamma):
    x = np.linspace(-8, 8, 41)
    for y in (1, -1):
        logits = md.tensor(x, requires_grad=True)
        targets = np.full_like(x, (y + 1) / 2)            # y = +1 -> target 1, y = -1 -> target 0
        F.sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma, reduction="sum").backward()
        np.testing.assert_allclose(logits.grad, focal_grad_appendix_b(x, y, gamma), rtol=1e-10, atol=1e-14)


def test_cross_entropy_gradient_is_y_times_p_t_minus_one():
    x = np.linspace(-6, 6, 25)
    logits = md.tensor(x, requires_grad=True)
    F.binary_cross_entropy_with_logits(logits, np.zeros_like(x), reduction="sum").backward()
    p_t = 1 - 1 / (1 + np.exp(-x))                         # y = -1
    np.testing.assert_allclose(logits.grad, -1 * (p_t - 1), rtol=1e-12)


def test_focal_loss_at_the_prior_matches_the_design_figures():
    # With the class bias at -log((1 - 0.01) / 0.01), every probability starts at 0.01.
    prior_logit = -np.log(0.99 / 0.01)
    logits = np.full(2, prior_logit)
    loss = F.sigmoid_focal_loss(md.tensor(logits), np.array([0.0, 1.0]), alpha=0.25, gamma=2.0).numpy()
    assert loss[0] == pytest.approx(0.75 * 0.01 ** 2 * -np.log(0.99), rel=1e-9)   # a negative: about 7.5e-7
    assert loss[1] == pytest.approx(0.25 * 0.99 ** 2 * np.log(100), rel=1e-9)     # a positive: about 1.13
    assert loss[0] == pytest.approx(7.5e-7, rel=0.01) and loss[1] == pytest.approx(1.13, rel=0.01)


def test_alpha_weights_positives_by_alpha_and_negatives_by_one_minus_alpha_even_at_the_ends():
    logits = md.tensor(np.array([0.5, -1.0, 2.0, 0.0]), requires_grad=True)
    targets = np.array([1.0, 1.0, 0.0, 0.0])
    unweighted = F.sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2.0).numpy()       # alpha off
    for alpha in (0.0, 0.25, 1.0):
        weighted = F.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=2.0)
        expected = np.where(targets == 1, alpha, 1 - alpha) * unweighted
        np.testing.assert_allclose(weighted.numpy(), expected, rtol=1e-12, atol=0)
    # alpha = 0: the positives cost nothing and get no gradient; only the negatives are learned from.
    F.sigmoid_focal_loss(logits, targets, alpha=0.0, gamma=2.0, reduction="sum").backward()
    assert (logits.grad[:2] == 0).all() and (logits.grad[2:] != 0).all()


def test_focal_loss_down_weights_easy_examples_more_than_cross_entropy():
    logits = md.tensor(np.array([-3.0, 0.0]))            # negatives: an easy one (p = 0.047) and an unsure one
    focal = F.sigmoid_focal_loss(logits, np.zeros(2), alpha=-1, gamma=2.0).numpy()
    ce = F.binary_cross_entropy_with_logits(logits, np.zeros(2), reduction="none").numpy()
    ratio = focal / ce                                    # = p^2 for a negative
    assert ratio[0] == pytest.approx(0.0474 ** 2, rel=0.01)
    assert ratio[1] == pytest.approx(0.25)


LOSSES = {
    "bce": lambda x, t: F.binary_cross_entropy_with_logits(x, t, reduction="sum"),
    "focal": lambda x, t: F.sigmoid_focal_loss(x, t, reduction="sum"),
    "softplus": lambda x, t: F.softplus(x).sum(),
    "logsigmoid": lambda x, t: F.logsigmoid(x).sum(),
    "sigmoid": lambda x, t: F.sigmoid(x).sum(),
}


@pytest.mark.parametrize("name", LOSSES)
def test_losses_stay_finite_and_exact_for_logits_of_plus_minus_100(xp, name):
    x32 = xp.asarray([-100.0, -30.0, 30.0, 100.0], dtype=xp.float32)
    t = xp.asarray([0.0, 1.0, 0.0, 1.0], dtype=xp.float32)
    x = md.tensor(x32, requires_grad=True)
    loss = LOSSES[name](x, t)
    loss.backward()
    assert np.isfinite(loss.item()) and np.all(np.isfinite(md.backend.to_numpy(x.grad)))
    # the same in float64, where nothing underflows: float32 must agree to its precision
    x64 = md.tensor(xp.asarray(x32, dtype=xp.float64), requires_grad=True)
    loss64 = LOSSES[name](x64, xp.asarray(t, dtype=xp.float64))
    loss64.backward()
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-6, abs=1e-30)
    np.testing.assert_allclose(md.backend.to_numpy(x.grad), md.backend.to_numpy(x64.grad), rtol=1e-5, atol=1e-30)


def test_logsigmoid_of_minus_100_is_minus_100_not_minus_infinity():
    assert F.logsigmoid(md.tensor([-100.0])).item() == pytest.approx(-100.0)


@pytest.mark.parametrize("loss", [F.binary_cross_entropy_with_logits, F.smooth_l1_loss, F.sigmoid_focal_loss])
def test_losses_reject_mismatched_shapes_and_unknown_reductions(loss):
    with pytest.raises(ValueError, match=r"input has shape \(2, 3\) but target \(3, 2\)"):
        loss(md.tensor(np.zeros((2, 3))), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss(md.tensor(np.zeros(2)), np.zeros(2), reduction="avg")


def test_focal_loss_targets_are_constants():
    with pytest.raises(ValueError, match="targets must be constants"):
        F.sigmoid_focal_loss(md.tensor([0.0]), md.tensor([1.0], requires_grad=True))


def test_smooth_l1_loss_pieces():
    d = np.array([-2.0, -0.05, 0.0, 0.05, 2.0])
    loss = F.smooth_l1_loss(md.tensor(d), np.zeros(5), reduction="none", beta=0.11).numpy()
    np.testing.assert_allclose(loss, [2 - 0.055, 0.5 * 0.05 ** 2 / 0.11, 0, 0.5 * 0.05 ** 2 / 0.11, 2 - 0.055])
    l1 = F.smooth_l1_loss(md.tensor(d), np.zeros(5), reduction="none", beta=0.0).numpy()
    np.testing.assert_allclose(l1, np.abs(d))
