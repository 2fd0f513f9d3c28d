"""Tests for minidet.boxes: IoU, box coding, clipping, checking, NMS.

Two kinds of oracle: cases small enough to compute by hand (with the arithmetic in the comment), and
plain-Python references (a double loop for IoU, a keep-or-drop loop for NMS) compared with minidet on boxes drawn
by hypothesis. The boxes are drawn on a half-pixel grid, so identical boxes, shared edges, zero-area boxes and
equal scores come up often, and every area is exact: only IoU's final division rounds, the same way in both.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidet.backend import to_numpy
from minidet.boxes import (
    DEFAULT_DECODE_CLAMP,
    batched_nms,
    box_area,
    box_iou,
    check_boxes,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    nms,
)

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def boxes_on(xp, rows, dtype=np.float32):
    """(N, 4) array of the given rows (N may be 0) on xp's device."""
    return xp.asarray(np.array(rows, dtype=dtype).reshape(-1, 4))


# --- plain-Python references ----------------------------------------------------------------------------------------

def iou_by_hand(a, b):
    """IoU of two boxes given as 4 numbers each, one pair at a time; 0 when the union is empty."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_by_hand(boxes, scores, labels, threshold):
    """Visit the boxes from the highest score down (equal scores: lower index first); keep a box unless it
    overlaps a kept box of the same label by more than ``threshold``."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all(labels[k] != labels[i] or iou_by_hand(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(i)
    return keep


# --- strategies -----------------------------------------------------------------------------------------------------

@st.composite
def grid_box(draw, min_size=0):
    """(x1, y1, x2, y2) on a half-pixel grid; sizes from ``min_size`` half-pixels up."""
    x1, y1 = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    w, h = draw(st.integers(min_size, 8)), draw(st.integers(min_size, 8))
    return [x1 / 2, y1 / 2, (x1 + w) / 2, (y1 + h) / 2]


def box_lists(min_size=0, max_boxes=8):
    return st.lists(grid_box(min_size), min_size=0, max_size=max_boxes)


# --- box_area and box_iou -------------------------------------------------------------------------------------------

def test_box_area_is_width_times_height_without_plus_one(xp):
    area = box_area(boxes_on(xp, [[0, 0, 10, 20], [5, 5, 5, 9], [1.5, 2, 3, 3]]))
    np.testing.assert_array_equal(to_numpy(area), np.array([200, 0, 1.5], np.float32))


@pytest.mark.parametrize("a, b, expected, why", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0, "identical boxes"),
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0, "disjoint boxes"),
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0, "boxes that touch along an edge share no area"),
    ([0, 0, 10, 10], [10, 10, 20, 20], 0.0, "boxes that touch at a corner"),
    ([0, 0, 4, 4], [1, 1, 3, 3], 0.25, "contained: inter 4 / union 16"),
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, "corner overlap: inter 1 / union (4 + 4 - 1)"),
    ([0, 0, 10, 10], [0, 5, 10, 15], 1 / 3, "half overlap: inter 50 / union 150"),
    ([0, 0, 10, 10], [5, 5, 5, 8], 0.0, "a zero-width box inside a box"),
    ([3, 3, 3, 3], [3, 3, 3, 3], 0.0, "two identical points: union 0, IoU 0 and not nan"),
])
def test_box_iou_on_hand_computed_pairs(xp, a, b, expected, why):
    iou = box_iou(boxes_on(xp, [a]), boxes_on(xp, [b]))
    assert iou.shape == (1, 1) and iou.dtype == np.float32
    assert float(iou[0, 0]) == pytest.approx(expected, abs=1e-7), why


def test_box_iou_shape_is_n_by_m_including_empty(xp):
    two, three = boxes_on(xp, [[0, 0, 1, 1]] * 2), boxes_on(xp, [[0, 0, 1, 1]] * 3)
    assert box_iou(two, three).shape == (2, 3)
    assert box_iou(boxes_on(xp, []), three).shape == (0, 3)
    assert box_iou(two, boxes_on(xp, [])).shape == (2, 0)


@PROPERTY
@given(rows1=box_lists(), rows2=box_lists())
def test_box_iou_equals_a_double_loop_is_symmetric_and_lies_in_0_1(xp, rows1, rows2):
    iou = to_numpy(box_iou(boxes_on(xp, rows1, np.float64), boxes_on(xp, rows2, np.float64)))
    expected = np.array([[iou_by_hand(a, b) for b in rows2] for a in rows1]).reshape(len(rows1), len(rows2))
    np.testing.assert_array_equal(iou, expected)
    np.testing.assert_array_equal(iou, to_numpy(box_iou(boxes_on(xp, rows2, np.float64),
                                                        boxes_on(xp, rows1, np.float64))).T)
    assert ((iou >= 0) & (iou <= 1)).all()


# --- encode_boxes and decode_boxes ----------------------------------------------------------------------------------

# Anchor (0, 0, 10, 20): centre (5, 10), size 10 x 20. Box (5, 0, 25, 10): centre (15, 5), size 20 x 10.
ANCHOR = [[0, 0, 10, 20]]
BOX = [[5, 0, 25, 10]]
# dx = (15 - 5) / 10 = 1, dy = (5 - 10) / 20 = -0.25, dw = log(20 / 10), dh = log(10 / 20)
DELTAS = [1.0, -0.25, math.log(2), math.log(0.5)]


def test_encode_boxes_on_a_hand_computed_case(xp):
    deltas = encode_boxes(boxes_on(xp, BOX, np.float64), boxes_on(xp, ANCHOR, np.float64))
    np.testing.assert_allclose(to_numpy(deltas), [DELTAS], rtol=1e-15)


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0),     # Faster R-CNN's second-stage weights
                                     (10.0, 5.0, 2.0, 1.0)])     # all different: wx and wy swapped would show
def test_weights_scale_each_delta_and_decode_divides_them_back_out(xp, weights):
    deltas = encode_boxes(boxes_on(xp, BOX, np.float64), boxes_on(xp, ANCHOR, np.float64), weights)
    np.testing.assert_allclose(to_numpy(deltas), [np.multiply(DELTAS, weights)], rtol=1e-15)
    decoded = decode_boxes(deltas, boxes_on(xp, ANCHOR, np.float64), weights)
    np.testing.assert_allclose(to_numpy(decoded), BOX, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encode_and_decode_keep_the_dtype(xp, dtype):
    deltas = encode_boxes(boxes_on(xp, BOX, dtype), boxes_on(xp, ANCHOR, np.float64))
    assert deltas.dtype == dtype
    assert decode_boxes(deltas, boxes_on(xp, ANCHOR, np.float64)).dtype == dtype


def test_encode_and_decode_refuse_integer_boxes(xp):
    with pytest.raises(TypeError, match="encode_boxes: boxes must be float32 or float64"):
        encode_boxes(xp.asarray(np.array(BOX)), boxes_on(xp, ANCHOR))
    with pytest.raises(TypeError, match="decode_boxes: deltas must be float32 or float64"):
        decode_boxes(xp.asarray(np.array([[0, 0, 0, 0]])), boxes_on(xp, ANCHOR))


def test_decode_clamps_dw_and_dh_before_the_exponential(xp):
    anchor = boxes_on(xp, [[0, 0, 10, 10]])
    huge = boxes_on(xp, [[0, 0, 1000, 1000]])    # exp(1000) overflows: without the clamp the box would be inf
    box = to_numpy(decode_boxes(huge, anchor))[0]
    assert np.isfinite(box).all()
    # Centre (5, 5) from dx = dy = 0 (times the anchor size); width exp(log(1000 / 16)) * 10 = 625.
    np.testing.assert_allclose(box, [5 - 312.5, 5 - 312.5, 5 + 312.5, 5 + 312.5], rtol=1e-6)

    # Below the clamp nothing changes; a smaller clamp caps the size at exp(clamp) * 10.
    np.testing.assert_allclose(to_numpy(decode_boxes(boxes_on(xp, [[0, 0, 1, 1]]), anchor))[0],
                               [5 - 5 * math.e, 5 - 5 * math.e, 5 + 5 * math.e, 5 + 5 * math.e], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(decode_boxes(boxes_on(xp, [[0, 0, 1, 1]]), anchor, clamp=0.0))[0],
                               [0, 0, 10, 10], rtol=1e-6)
    assert DEFAULT_DECODE_CLAMP == math.log(1000 / 16)


@PROPERTY
@given(pairs=st.lists(st.tuples(grid_box(min_size=1), grid_box(min_size=1)), max_size=8),
       weights=st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.5, 2.0, 1.5, 3.0)]))
def test_decode_undoes_encode(xp, pairs, weights):
    boxes = boxes_on(xp, [box for box, _ in pairs], np.float64)
    anchors = boxes_on(xp, [anchor for _, anchor in pairs], np.float64)
    deltas = encode_boxes(boxes, anchors, weights)
    assert deltas.shape == (len(pairs), 4)
    np.testing.assert_allclose(to_numpy(decode_boxes(deltas, anchors, weights)), to_numpy(boxes), atol=1e-12)


# --- clip_boxes -----------------------------------------------------------------------------------------------------

def test_clip_boxes_clamps_x_to_the_width_and_y_to_the_height(xp):
    boxes = boxes_on(xp, [[-5, -3, 120, 60], [10, 20, 30, 40], [150, 70, 160, 80]])
    clipped = clip_boxes(boxes, (50, 100))   # (H, W)
    np.testing.assert_array_equal(to_numpy(clipped), [[0, 0, 100, 50],
                                                      [10, 20, 30, 40],      # inside: unchanged
                                                      [100, 50, 100, 50]])   # outside: flat on the border
    assert clipped.dtype == np.float32


# --- check_boxes ----------------------------------------------------------------------------------------------------

def test_check_boxes_accepts_good_boxes_and_no_boxes(xp):
    assert check_boxes(boxes_on(xp, [[0, 0, 1, 1], [2.5, 3, 4, 9]]), image_index=0) is None
    assert check_boxes(boxes_on(xp, [])) is None
    assert check_boxes(xp.asarray(np.array([[0, 0, 1, 1]], np.int64))) is None


@pytest.mark.parametrize("bad_box, problem", [
    ([10, 20, 10, 40], r"x2 <= x1 \(width 0\)"),
    ([12, 20, 10, 40], r"x2 <= x1 \(width -2\)"),
    ([10, 40, 30, 40], r"y2 <= y1 \(height 0\)"),
    ([10, 20, np.nan, 40], "not finite"),
    ([10, 20, np.inf, 40], "not finite"),
])
def test_check_boxes_names_the_image_the_box_its_values_and_the_fix(xp, bad_box, problem):
    boxes = boxes_on(xp, [[0, 0, 5, 5], bad_box, [1, 1, 2, 2]])
    with pytest.raises(ValueError, match=problem) as error:
        check_boxes(boxes, image_index=3)
    message = str(error.value)
    assert "image 3, box 1:" in message
    assert ", ".join(f"{v:g}" for v in bad_box) in message
    assert "remove or fix this annotation" in message


def test_check_boxes_counts_the_bad_boxes_and_works_without_an_image_index(xp):
    with pytest.raises(ValueError, match=r"check_boxes, box 0: .*\(2 of the 3 boxes are bad\)") as error:
        check_boxes(boxes_on(xp, [[5, 5, 5, 5], [0, 0, 1, 1], [3, 3, 1, 1]]))
    assert "image" not in str(error.value)


@pytest.mark.parametrize("boxes, expected", [
    (np.zeros((2, 5), np.float32), r"image 7: boxes must have shape \(N, 4\).*got shape \(2, 5\)"),
    (np.zeros(4, np.float32), r"shape \(N, 4\).*got shape \(4,\)"),
    (np.ones((1, 4), bool), r"\(an integer or floating dtype\), got dtype bool"),
])
def test_check_boxes_refuses_wrong_shapes_and_dtypes(xp, boxes, expected):
    with pytest.raises(ValueError, match=expected):
        check_boxes(xp.asarray(boxes), image_index=7)


# --- nms and batched_nms --------------------------------------------------------------------------------------------

def kept(xp, function, *args):
    keep = function(*args)
    assert keep.dtype == np.int64
    return to_numpy(keep).tolist()


def test_nms_keeps_the_best_of_overlapping_boxes_and_boxes_elsewhere(xp):
    # Boxes 0 and 1 overlap with IoU 81 / 119 = 0.68; box 2 is apart from them; box 3, the best of all, overlaps
    # box 2 with IoU 100 / 120 = 0.83.
    boxes = boxes_on(xp, [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [20, 20, 30, 32]])
    scores = xp.asarray(np.array([0.9, 0.8, 0.7, 0.95], np.float32))
    assert kept(xp, nms, boxes, scores, 0.5) == [3, 0]
    assert kept(xp, nms, boxes, scores, 0.7) == [3, 0, 1]
    assert kept(xp, nms, boxes, scores, 0.9) == [3, 0, 1, 2]


def test_nms_keeps_a_box_whose_iou_is_exactly_the_threshold(xp):
    # Inter 2, union 4: IoU exactly 0.5. Only an IoU *greater* than the threshold suppresses.
    boxes = boxes_on(xp, [[0, 0, 4, 1], [0, 0, 2, 1]])
    scores = xp.asarray(np.array([0.9, 0.8], np.float32))
    assert kept(xp, nms, boxes, scores, 0.5) == [0, 1]
    assert kept(xp, nms, boxes, scores, 0.499) == [0]


def test_nms_with_identical_boxes_and_equal_scores_keeps_the_first(xp):
    boxes = boxes_on(xp, [[0, 0, 2, 2]] * 3)
    assert kept(xp, nms, boxes, xp.asarray(np.full(3, 0.5, np.float32)), 0.5) == [0]
    assert kept(xp, nms, boxes, xp.asarray(np.array([0.5, 0.7, 0.7], np.float32)), 0.5) == [1]
    # With a threshold of 1, identical boxes (IoU 1) do not suppress each other: all kept, ties in index order.
    assert kept(xp, nms, boxes, xp.asarray(np.array([0.5, 0.7, 0.7], np.float32)), 1.0) == [1, 2, 0]


def test_nms_and_batched_nms_of_no_boxes_are_empty_int64(xp):
    no_boxes, no_scores = boxes_on(xp, []), xp.zeros(0, dtype=np.float32)
    assert kept(xp, nms, no_boxes, no_scores, 0.5) == []
    assert kept(xp, batched_nms, no_boxes, no_scores, xp.zeros(0, dtype=np.int64), 0.5) == []


def test_nms_refuses_mismatched_shapes(xp):
    with pytest.raises(ValueError, match=r"nms: boxes must have shape \(N, 4\) and scores shape \(N,\)"):
        nms(boxes_on(xp, [[0, 0, 1, 1]] * 2), xp.zeros(3, dtype=np.float32), 0.5)
    with pytest.raises(ValueError, match=r"batched_nms: .*labels \(1,\)"):
        batched_nms(boxes_on(xp, [[0, 0, 1, 1]] * 2), xp.zeros(2, dtype=np.float32), xp.zeros(1, np.int64), 0.5)


def test_batched_nms_suppresses_only_within_a_class_and_sorts_all_by_score(xp):
    # Boxes 0 and 1 are the same box; so are 2 and 3. Box 0 and 1 differ in class, 2 and 3 do not.
    boxes = boxes_on(xp, [[0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 30, 10], [20, 0, 30, 10]])
    scores = xp.asarray(np.array([0.6, 0.9, 0.8, 0.7], np.float32))
    labels = xp.asarray(np.array([0, 1, 2, 2]))
    assert kept(xp, batched_nms, boxes, scores, labels, 0.5) == [1, 2, 0]


@PROPERTY
@given(data=st.data(), rows=box_lists(max_boxes=10),
       threshold=st.sampled_from([0.0, 0.2, 0.25, 1 / 3, 0.5, 0.7, 1.0]))
def test_nms_and_batched_nms_equal_a_plain_greedy_loop(xp, data, rows, threshold):
    n = len(rows)
    # Few distinct scores and labels, so that ties and classes matter.
    scores = data.draw(st.lists(st.sampled_from([0.1, 0.5, 0.75, 0.9]), min_size=n, max_size=n), label="scores")
    labels = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n), label="labels")
    boxes = boxes_on(xp, rows, np.float64)
    scores_array = xp.asarray(np.array(scores, np.float64))
    assert kept(xp, nms, boxes, scores_array, threshold) == nms_by_hand(rows, scores, [0] * n, threshold)
    assert (kept(xp, batched_nms, boxes, scores_array, xp.asarray(np.array(labels, np.int64)), threshold)
            == nms_by_hand(rows, scores, labels, threshold))
