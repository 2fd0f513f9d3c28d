"""``F.sigmoid_focal_loss_with_labels``: the focal loss from one label per anchor, on NumPy and (marked gpu) CuPy.

Two oracles: the dense ``sigmoid_focal_loss`` (itself checked against torchvision and the paper's Appendix B) with
one-hot targets, the ignored rows dropped and each row weighted; and gradcheck in float64. Each test runs once per
array module (the ``xp`` fixture), so on a GPU the same checks run against the CUDA kernel.
"""

import numpy as np
import pytest

import minidet as md
import minidet.functional as F
from minidet import backend
from minidet.functional.loss import BACKGROUND, IGNORED
from minidet.testing import gradcheck


def example(xp, num_anchors=40, num_classes=5, dtype=np.float64, seed=0):
    """Logits with some at +-100, labels with every code and class, positive weights."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((num_anchors, num_classes)) * 4
    logits[0], logits[1] = 100, -100
    labels = rng.integers(IGNORED, num_classes, num_anchors)
    labels[:4] = [0, num_classes - 1, BACKGROUND, IGNORED]
    weights = rng.uniform(0.1, 2.0, num_anchors)
    return xp.asarray(logits, dtype=dtype), xp.asarray(labels), xp.asarray(weights, dtype=dtype)


def dense_focal_loss(logits, labels, weights, alpha, gamma):
    """The same loss from the dense op: one-hot targets, ignored rows dropped, each row's sum weighted."""
    xp = backend.get_array_module(logits)
    kept = labels != IGNORED
    targets = (labels[kept][:, None] == xp.arange(logits.shape[1])[None, :]).astype(logits.dtype)
    per_element = F.sigmoid_focal_loss(md.tensor(logits[kept]), targets, alpha, gamma, reduction="none")
    return (per_element.data * weights[kept][:, None]).sum()


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 2.0), (0.5, 0.0), (0.25, 1.5), (0.25, 5.0)])
def test_equals_the_dense_focal_loss_with_one_hot_targets(xp, alpha, gamma):
    logits, labels, weights = example(xp)
    x = md.tensor(logits, requires_grad=True)
    loss = F.sigmoid_focal_loss_with_labels(x, labels, weights, alpha=alpha, gamma=gamma)
    assert loss.shape == () and loss.dtype == np.float64
    assert loss.item() == pytest.approx(float(dense_focal_loss(logits, labels, weights, alpha, gamma)), rel=1e-12)

    # The gradient against the dense op's, which gets no gradient on the rows it dropped.
    loss.backward()
    dense = md.tensor(logits, requires_grad=True)
    kept = labels != IGNORED
    targets = (labels[:, None] == xp.arange(logits.shape[1])[None, :]).astype(logits.dtype)
    dense_loss = F.sigmoid_focal_loss(dense, targets, alpha, gamma, reduction="none") * (weights * kept)[:, None]
    dense_loss.sum().backward()
    np.testing.assert_allclose(backend.to_numpy(x.grad), backend.to_numpy(dense.grad), rtol=1e-12, atol=1e-300)
    assert not backend.to_numpy(x.grad)[backend.to_numpy(~kept)].any(), "ignored anchors get no gradient"


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 0.0), (0.25, 1.5)])
def test_gradcheck(xp, alpha, gamma):
    logits, labels, weights = example(xp, num_anchors=12, num_classes=4)
    logits = logits / 25          # no +-100 here: finite differences need a slope to measure
    gradcheck(lambda x: F.sigmoid_focal_loss_with_labels(x, labels, weights, alpha=alpha, gamma=gamma), [logits],
              name="sigmoid_focal_loss_with_labels")


def test_float32_is_float64_rounded(xp):
    logits, labels, weights = example(xp, num_anchors=300, num_classes=7)
    x64 = md.tensor(logits, requires_grad=True)
    x32 = md.tensor(logits.astype(np.float32), requires_grad=True)
    loss64 = F.sigmoid_focal_loss_with_labels(x64, labels, weights)
    loss32 = F.sigmoid_focal_loss_with_labels(x32, labels, weights.astype(np.float32))
    assert loss32.dtype == np.float32
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5)
    loss64.backward()
    loss32.backward()
    np.testing.assert_allclose(backend.to_numpy(x32.grad), backend.to_numpy(x64.grad), rtol=1e-5, atol=1e-12)


def test_upstream_gradient_scales_the_stored_one_and_one_is_free(xp):
    logits, labels, weights = example(xp)
    op = F.loss.SigmoidFocalLossWithLabels(0.25, 2.0)
    op.forward(logits, labels.astype(np.int32), weights)
    stored = op.grad
    assert op.backward(xp.asarray(1.0))[0] is stored               # no pass over the (A, K) gradient
    np.testing.assert_array_equal(backend.to_numpy(op.backward(xp.asarray(2.5))[0]), 2.5 * backend.to_numpy(stored))


def test_weights_default_to_one_and_lists_are_accepted(xp):
    logits, labels, _ = example(xp)
    ones = F.sigmoid_focal_loss_with_labels(logits, labels, xp.ones(len(labels)))
    assert F.sigmoid_focal_loss_with_labels(logits, labels).item() == ones.item()
    as_list = F.sigmoid_focal_loss_with_labels(logits, backend.to_numpy(labels).tolist())
    assert as_list.item() == ones.item()


def test_only_ignored_anchors_give_zero_loss_and_zero_gradient(xp):
    x = md.tensor(xp.ones((3, 4)), requires_grad=True)
    loss = F.sigmoid_focal_loss_with_labels(x, xp.full(3, IGNORED))
    loss.backward()
    assert loss.item() == 0 and not backend.to_numpy(x.grad).any()


def test_no_anchors_gives_zero(xp):
    x = md.tensor(xp.zeros((0, 4)), requires_grad=True)
    loss = F.sigmoid_focal_loss_with_labels(x, xp.zeros(0, dtype=np.int64))
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == (0, 4)


def test_bad_arguments_are_explained():
    logits = md.tensor(np.zeros((3, 4)))
    labels = np.array([0, -1, -2])
    name = "sigmoid_focal_loss_with_labels"
    with pytest.raises(ValueError, match=rf"{name}: logits must be \(A, K\).*got shape \(12,\)"):
        F.sigmoid_focal_loss_with_labels(md.tensor(np.zeros(12)), labels)
    with pytest.raises(ValueError, match=r"labels must be an integer array of shape \(3,\).*float64 and shape \(3,\)"):
        F.sigmoid_focal_loss_with_labels(logits, labels.astype(float))
    with pytest.raises(ValueError, match=r"labels must be classes 0\.\.3, BACKGROUND \(-1\) or IGNORED \(-2\); "
                                         r"got values from -2 to 4"):
        F.sigmoid_focal_loss_with_labels(logits, np.array([4, -1, -2]))
    with pytest.raises(ValueError, match="got values from -3 to 0"):
        F.sigmoid_focal_loss_with_labels(logits, np.array([0, -3, 0]))
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        F.sigmoid_focal_loss_with_labels(logits, labels, np.ones(4))
    with pytest.raises(ValueError, match="weights must be constants"):
        F.sigmoid_focal_loss_with_labels(logits, labels, md.tensor(np.ones(3), requires_grad=True))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        F.sigmoid_focal_loss_with_labels(logits, labels, gamma=-1)
    with pytest.raises(TypeError, match="logits must be float32 or float64"):
        F.sigmoid_focal_loss_with_labels(np.zeros((3, 4), np.int64), labels)


def test_label_codes_are_the_matchers():
    from minidet import matching
    assert (BACKGROUND, IGNORED) == (matching.BACKGROUND, matching.IGNORED)


@pytest.mark.gpu
def test_mixing_devices_names_the_op():
    if not backend.cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    logits = md.tensor(np.zeros((3, 4), np.float32), device="cuda")
    with pytest.raises(TypeError, match="SigmoidFocalLossWithLabels: inputs are on different devices"):
        F.sigmoid_focal_loss_with_labels(logits, np.array([0, -1, -2]))
