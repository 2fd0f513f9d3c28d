"""minidet against torchvision's own Python code: anchors, box coding, IoU, matching, the focal loss, and a smoke
test of torchvision's RetinaNet itself.

tests/test_reference_torch.py compares minidet's ops with torch, and torchvision's detection rules written out by
hand. This file runs torchvision's real code instead, through the ``torchvision`` fixture (tests/conftest.py),
which makes torchvision importable on a CPU-only torch (tests/torchvision_cpu.py). Everything skips where torch or
torchvision is not installed.

What is *not* compared here: NMS. On a CPU-only torch, ``torchvision.ops.nms`` runs the shim's Python ``nms``,
written in this repository, so the comparison would be circular; tests/test_boxes.py checks minidet's NMS against
a brute-force version instead.
"""

import math

import numpy as np
import pytest

import minidet as md
import minidet.functional as F
from minidet.anchors import AnchorGenerator
from minidet.boxes import DEFAULT_DECODE_CLAMP, box_iou, decode_boxes, encode_boxes
from minidet.matching import match_anchors
from minidet.testing import assert_close

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.reference

STRIDES = (8, 16, 32, 64, 128)   # P3 ... P7

# NumPy and torch each compute float32 log and exp with their own vectorised routines, each within a couple of
# units in the last place (ulps) of the exact value; on the same inputs they disagree in about a third of the
# elements, by up to 3 ulps (measured on 180,000 anchors). The box coding allows 4 ulps where a log or an exp is
# involved, and nothing anywhere else.
LOG_EXP_ULPS = 4


def padded_feature_sizes(image_size):
    """The (H_l, W_l) of P3-P7 for a padded image: ceil(size / stride), as stride-2 convolutions with padding give."""
    height, width = image_size
    return [(-(-height // s), -(-width // s)) for s in STRIDES]


def torchvision_anchors(torchvision, image_size, feature_sizes, num_images=2):
    """Anchors from torchvision's AnchorGenerator, built exactly as ``retinanet_resnet50_fpn`` builds it."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.retinanet import _default_anchorgen

    generator = _default_anchorgen()
    # Only the shapes are read: a broadcast zero stands in for the padded batch and for each feature map.
    images = torch.zeros(()).expand(num_images, 3, *image_size)
    # The images inside the padded batch may be smaller than it; the anchors do not depend on that.
    image_list = ImageList(images, [tuple(image_size), (image_size[0] - 5, image_size[1] - 7)][:num_images])
    feature_maps = [torch.zeros(()).expand(num_images, 256, h, w) for h, w in feature_sizes]
    return generator, generator(image_list, feature_maps)


def assert_within_ulps(actual, expected, scale, ulps, name):
    """|actual - expected| <= ulps * spacing(scale), element by element (``scale``: the size of the operands)."""
    bound = ulps * np.spacing(np.abs(scale).astype(expected.dtype))
    error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    bad = np.argwhere(~(error <= bound))
    if bad.size:
        index = tuple(bad[0])
        raise AssertionError(f"{name}: {len(bad)} elements differ by more than {ulps} ulps; first at {index}: "
                             f"minidet {actual[index]!r}, torchvision {expected[index]!r}")


# --- anchors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_size", [(64, 96), (128, 128), (96, 160), (800, 1216)], ids=str)
def test_anchors_equal_torchvision_anchor_generator(torchvision, image_size):
    """Every anchor of every level, bit for bit, including the odd strides of 64 x 96 (P6: 64 x 48)."""
    feature_sizes = padded_feature_sizes(image_size)
    generator_tv, anchors_tv = torchvision_anchors(torchvision, image_size, feature_sizes)
    generator_md = AnchorGenerator(preset="torchvision")

    assert [tuple(s) for s in generator_tv.sizes] == generator_md.scaled_sizes
    assert generator_tv.num_anchors_per_location() == [generator_md.num_anchors_per_location] * len(STRIDES)
    for level, (cell_tv, cell_md) in enumerate(zip(generator_tv.cell_anchors, generator_md.cell_anchors)):
        np.testing.assert_array_equal(cell_md, cell_tv.numpy(), err_msg=f"cell anchors of level {level}")

    anchors_md = generator_md(image_size, feature_sizes)
    assert anchors_md.dtype == np.float32
    assert len(anchors_tv) == 2   # one per image of the batch, all the same
    for image, anchors in enumerate(anchors_tv):
        assert anchors.dtype == torch.float32
        np.testing.assert_array_equal(anchors_md, anchors.numpy(), err_msg=f"anchors of image {image}")


# --- box coding ------------------------------------------------------------------------------------------------

def anchors_and_boxes(seed, image_size=(128, 128)):
    """torchvision-preset anchors and, for each, a box near it: centre moved by ~0.3 of its size, sides scaled
    by ~exp(+-0.5). Returns two (A, 4) float32 arrays."""
    anchors = AnchorGenerator(preset="torchvision")(image_size, padded_feature_sizes(image_size))
    rng = np.random.default_rng(seed)
    n = len(anchors)
    width, height = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]               # (A,)
    cx = anchors[:, 0] + width / 2 + rng.normal(0, 0.3, n) * width                            # (A,)
    cy = anchors[:, 1] + height / 2 + rng.normal(0, 0.3, n) * height
    w, h = width * np.exp(rng.normal(0, 0.5, n)), height * np.exp(rng.normal(0, 0.5, n))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)  # (A, 4)
    return anchors, boxes


def test_default_decode_clamp_is_torchvisions(torchvision):
    from torchvision.models.detection._utils import BoxCoder

    assert BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).bbox_xform_clip == DEFAULT_DECODE_CLAMP == math.log(1000.0 / 16)


@pytest.mark.parametrize("image_size", [(128, 128), (800, 1216)], ids=str)
def test_encode_boxes_matches_torchvision_box_coder(torchvision, image_size):
    """dx, dy exactly; dw, dh (a log each) within LOG_EXP_ULPS of the value."""
    from torchvision.models.detection._utils import BoxCoder

    anchors, boxes = anchors_and_boxes(1, image_size)
    expected = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).encode_single(torch.from_numpy(boxes),
                                                                    torch.from_numpy(anchors)).numpy()
    actual = encode_boxes(boxes, anchors)
    assert actual.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(actual[:, :2], expected[:, :2], err_msg="dx, dy")
    assert_within_ulps(actual[:, 2:], expected[:, 2:], expected[:, 2:], LOG_EXP_ULPS, "dw, dh")


@pytest.mark.parametrize("image_size", [(128, 128), (800, 1216)], ids=str)
def test_decode_boxes_matches_torchvision_box_coder(torchvision, image_size):
    """Random deltas, some beyond the clamp (dw, dh of 10 and 100) and some very negative (-100).

    Each coordinate is a centre plus or minus a half-size, and the half-size goes through exp, so the error
    allowed is LOG_EXP_ULPS of the larger of the two terms: max(|x1|, |x2|) for x1 and x2.
    """
    from torchvision.models.detection._utils import BoxCoder

    anchors, _ = anchors_and_boxes(2, image_size)
    rng = np.random.default_rng(3)
    deltas = rng.normal(0, 1, anchors.shape).astype(np.float32)
    deltas[:30, 2:] = [[10.0, 100.0], [100.0, -100.0], [DEFAULT_DECODE_CLAMP, 4.0]] * 10   # clamped, and not
    expected = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).decode_single(torch.from_numpy(deltas),
                                                                    torch.from_numpy(anchors)).numpy()
    actual = decode_boxes(deltas, anchors)
    assert actual.dtype == expected.dtype == np.float32
    assert np.isfinite(expected).all()
    half_extent = np.maximum(np.abs(expected[:, :2]), np.abs(expected[:, 2:]))   # (A, 2): max(|x1|, |x2|), ...
    assert_within_ulps(actual, expected, np.concatenate([half_extent, half_extent], axis=1), LOG_EXP_ULPS,
                       "decoded boxes")


def test_box_coding_ulp_check_can_fail(torchvision):
    """The tolerance above is a few ulps, not a few percent: a coordinate off by 1e-5 relative is caught."""
    from torchvision.models.detection._utils import BoxCoder

    anchors, boxes = anchors_and_boxes(1)
    expected = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).encode_single(torch.from_numpy(boxes),
                                                                    torch.from_numpy(anchors)).numpy()
    off = encode_boxes(boxes, anchors) * np.float32(1 + 1e-5)
    with pytest.raises(AssertionError, match="dw, dh: .* differ by more than 4 ulps"):
        assert_within_ulps(off[:, 2:], expected[:, 2:], expected[:, 2:], LOG_EXP_ULPS, "dw, dh")


# --- IoU -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_iou_equals_torchvision_bit_for_bit(torchvision, dtype):
    """Random boxes on a coarse grid (many equal edges and identical boxes), some of zero width or height.

    torchvision gives nan for a pair whose union has zero area (0 / 0); minidet gives 0 there, as documented.
    Everywhere else the two are equal to the last bit.
    """
    rng = np.random.default_rng(4)
    corners = rng.integers(0, 12, (2, 60, 2)) * 0.5 + rng.random((2, 60, 2)) * (rng.random((2, 60, 2)) < 0.3)
    sizes = rng.integers(0, 8, (2, 60, 2)) * 0.75                             # 0: a zero width or height
    boxes1, boxes2 = (np.concatenate([c, c + s], axis=1).astype(dtype) for c, s in zip(corners, sizes))
    boxes2[:5] = boxes1[:5]                                                   # identical pairs
    expected = torchvision.ops.box_iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2)).numpy()
    actual = box_iou(boxes1, boxes2)
    assert actual.dtype == expected.dtype == dtype

    zero_union = np.isnan(expected)
    areas1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    areas2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    assert zero_union.any(), "the data should contain pairs of zero-area boxes"
    np.testing.assert_array_equal(zero_union, (areas1[:, None] == 0) & (areas2[None, :] == 0))
    np.testing.assert_array_equal(actual[zero_union], 0)
    np.testing.assert_array_equal(actual[~zero_union], expected[~zero_union])
    assert ((expected > 0) & (expected < 1)).mean() > 0.1, "the data should contain partial overlaps"


# --- matching --------------------------------------------------------------------------------------------------

def matching_case(case, seed):
    """(anchors, boxes) as float32 (A, 4) and (G, 4), for a Matcher comparison.

    The anchors are the torchvision preset's for a 64 x 96 image (1161 anchors with integer corners, so many
    anchors tie for a box's best IoU), followed by a few of a 10 x 10 square (area 100, so that an IoU of exactly
    0.4 or 0.5 is easy to make).
    """
    anchors = AnchorGenerator(preset="torchvision")((64, 96), padded_feature_sizes((64, 96)))
    squares = np.array([[0, 0, 10, 10], [40, 20, 50, 30], [70, 40, 80, 50]], np.float32)
    anchors = np.concatenate([anchors, squares])
    rng = np.random.default_rng(seed)
    if case == "random":
        # boxes with integer corners (ties), a duplicate (two boxes tie for an anchor), and an anchor itself
        corner = rng.integers(-10, 90, (10, 2))
        boxes = np.concatenate([corner, corner + rng.integers(4, 60, (10, 2))], axis=1).astype(np.float32)
        boxes = np.concatenate([boxes, boxes[:1], anchors[rng.integers(0, len(anchors), 1)]])
    elif case == "near the thresholds":
        # A box over the left part of a square: IoU = its width / 10, exactly 0.4 and 0.5, and one around them.
        fractions = [0.4, 0.5, rng.choice([0.4 - 1e-6, 0.4 + 1e-6, 0.5 - 1e-6, 0.5 + 1e-6])]
        boxes = np.array([[x1, y1, x1 + 10 * f, y2] for (x1, y1, _, y2), f in zip(squares, fractions)], np.float32)
        # and random boxes whose IoU with some anchor is close to a threshold: a square anchor shrunk on one side
        picks = anchors[rng.integers(0, len(anchors) - 3, 6)]
        shrink = np.sqrt(rng.choice([0.4, 0.5], 6) + rng.normal(0, 1e-6, 6))
        boxes = np.concatenate([boxes, np.concatenate([picks[:, :2], picks[:, :2] + shrink[:, None] *
                                                       (picks[:, 2:] - picks[:, :2])], axis=1)]).astype(np.float32)
    elif case == "a box that overlaps no anchor":
        # Its best IoU is 0, so with low-quality matches every anchor with IoU 0 is promoted (torchvision's rule)
        boxes = np.array([[10, 10, 40, 30], [5000, 5000, 5010, 5010]], np.float32)
    else:
        raise ValueError(case)
    return anchors, boxes


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("allow_low_quality_matches", [True, False], ids=["low-quality", "strict"])
@pytest.mark.parametrize("case", ["random", "near the thresholds", "a box that overlaps no anchor"])
def test_match_anchors_equals_torchvision_matcher(torchvision, case, allow_low_quality_matches, seed):
    from torchvision.models.detection._utils import Matcher

    anchors, boxes = matching_case(case, seed)
    iou = torchvision.ops.box_iou(torch.from_numpy(boxes), torch.from_numpy(anchors))         # (G, A)
    expected = Matcher(0.5, 0.4, allow_low_quality_matches=allow_low_quality_matches)(iou).numpy()
    matches, best_iou = match_anchors(anchors, boxes, 0.5, 0.4, allow_low_quality_matches, chunk_size=500,
                                      match_zero_iou=True)

    np.testing.assert_array_equal(best_iou, iou.max(dim=0).values.numpy(), err_msg="best IoU of each anchor")
    mismatched = np.flatnonzero(matches != expected)
    assert mismatched.size == 0, (
        f"{mismatched.size} anchors matched differently; first: anchor {mismatched[0]}, minidet "
        f"{matches[mismatched[0]]}, torchvision {expected[mismatched[0]]}, IoUs {iou[:, mismatched[0]].tolist()}")
    # the cases exercise what they should
    assert (expected >= 0).any()
    if case == "a box that overlaps no anchor" and allow_low_quality_matches:
        assert (expected >= 0).all(), "every anchor ties for the far box's best IoU (0), so every one is promoted"
    else:
        assert (expected == -1).any()
    if case == "near the thresholds":
        assert (expected == -2).any() and np.isin(np.float32([0.4, 0.5]), best_iou).all()
    if case == "a box that overlaps no anchor" and allow_low_quality_matches:
        # minidet's own rule: a box no anchor overlaps promotes nothing; only the near box's best anchors are added
        own, _ = match_anchors(anchors, boxes, 0.5, 0.4, True, chunk_size=500)
        strict, _ = match_anchors(anchors, boxes, 0.5, 0.4, False, chunk_size=500)
        near_best = iou[0].numpy() == iou[0].max().item()                                 # (A,)
        np.testing.assert_array_equal(own, np.where(near_best, 0, strict))
        assert (own >= 0).sum() == near_best.sum() < 10


# --- focal loss ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 2.0), (0.25, 0.0), (0.5, 1.5), (0.9, 5.0)], ids=str)
def test_sigmoid_focal_loss_equals_torchvision(torchvision, alpha, gamma, reduction):
    """Forward and the gradient of the logits, against ``torchvision.ops.sigmoid_focal_loss`` itself, with logits
    of +-100 (confidently right and wrong) and soft targets among the others."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((16, 5)) * 3).astype(np.float32)
    t = (rng.random((16, 5)) < 0.3).astype(np.float32)
    x.reshape(-1)[:4], t.reshape(-1)[:4] = [100, -100, 100, -100], [0, 1, 1, 0]
    t[-1] = rng.random(5).astype(np.float32)                                  # one row of soft targets
    g = rng.standard_normal(() if reduction != "none" else x.shape).astype(np.float32)

    x_md, x_t = md.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    y_md = F.sigmoid_focal_loss(x_md, t, alpha=alpha, gamma=gamma, reduction=reduction)
    y_t = torchvision.ops.sigmoid_focal_loss(x_t, torch.from_numpy(t), alpha=alpha, gamma=gamma, reduction=reduction)
    assert y_md.dtype == np.float32
    assert_close(y_md.numpy(), y_t.detach().numpy(), 1e-5, name="forward")
    y_md.backward(g)
    y_t.backward(torch.from_numpy(np.array(g)))
    assert_close(x_md.grad, x_t.grad.numpy(), 1e-5, name="gradient of the logits")


# --- torchvision's RetinaNet through the fixture ---------------------------------------------------------------

def test_torchvision_retinanet_runs_inference_through_the_fixture(torchvision):
    """The fixture is good enough for model parity tests: RetinaNet builds and detects, NMS included.

    The score threshold is lowered to 0 so that the randomly initialised model (whose scores sit near the
    prior 0.01) sends boxes through ``batched_nms`` and so through ``torchvision::nms``.
    """
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    model.eval()
    model.score_thresh = 0.0
    with torch.no_grad():
        (detections,) = model([torch.rand(3, 128, 128)])
    boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"]
    assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape
    assert 0 < len(scores) <= model.detections_per_img
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    assert bool((scores[:-1] >= scores[1:]).all()), "detections sorted by score"
    assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 128).all()), "boxes clipped to the image"
    # what NMS guarantees: no two kept boxes of one class overlap by more than nms_thresh
    iou = torchvision.ops.box_iou(boxes, boxes)
    same_class = labels[:, None] == labels[None, :]
    overlapping = (iou > model.nms_thresh) & same_class & ~torch.eye(len(labels), dtype=torch.bool)
    assert not bool(overlapping.any())
