"""Tests for minidet.matching: anchor labels from IoU, as torchvision's Matcher gives them, without the full matrix.

A worked example checked by hand, the boundaries (0.4 and 0.5 exactly), the ties, no boxes, padded batches, and
a plain-Python reference that builds the whole anchors x boxes IoU table and applies the rules one anchor at a
time, compared with ``match_anchors`` at several chunk sizes on boxes drawn by hypothesis.

Most examples are one-dimensional in disguise: every box spans y from 0 to 10, so an IoU is a ratio of
lengths along x, easy to check in one's head.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minidet.matching
from minidet.backend import to_numpy
from minidet.matching import BACKGROUND, DEFAULT_CHUNK_SIZE, IGNORED, match_anchors, match_anchors_batch

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BG, IGN = BACKGROUND, IGNORED


def boxes_on(xp, rows, dtype=np.float32):
    """(N, 4) array of the given rows (N may be 0) on xp's device."""
    return xp.asarray(np.array(rows, dtype=dtype).reshape(-1, 4))


def spans(xp, *intervals, dtype=np.float32):
    """Boxes from x1 to x2 and from y = 0 to 10, one per (x1, x2)."""
    return boxes_on(xp, [[x1, 0, x2, 10] for x1, x2 in intervals], dtype)


def match(xp, anchors, boxes, **options):
    matches, ious = match_anchors(anchors, boxes, **options)
    assert matches.dtype == np.int64 and ious.dtype == anchors.dtype
    assert matches.shape == ious.shape == (anchors.shape[0],)
    return to_numpy(matches).tolist(), to_numpy(ious)


# --- a plain-Python reference: the full table, then the rules one anchor at a time ---------------------------

def iou_by_hand(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_by_hand(anchors, boxes, high, low, allow_low_quality_matches, match_zero_iou=False):
    """torchvision's Matcher, written out: ``table[i][j]`` is the IoU of anchor i and box j. Without
    ``match_zero_iou``, minidet's rule: a box whose best IoU is 0 promotes nothing."""
    if not boxes or not anchors:
        return [BACKGROUND] * len(anchors), [0.0] * len(anchors)
    table = [[iou_by_hand(a, b) for b in boxes] for a in anchors]
    # max() returns the first of equal maxima: ties go to the lowest box index.
    best_box = [max(range(len(boxes)), key=lambda j: row[j]) for row in table]
    best_iou = [row[j] for row, j in zip(table, best_box)]
    matches = [j if iou >= high else IGNORED if iou >= low else BACKGROUND for iou, j in zip(best_iou, best_box)]
    if allow_low_quality_matches:
        for j in range(len(boxes)):
            best_for_box = max(row[j] for row in table)
            for i, row in enumerate(table):
                if row[j] == best_for_box and (best_for_box > 0 or match_zero_iou):
                    matches[i] = best_box[i]
    return matches, best_iou


@st.composite
def grid_box(draw):
    """(x1, y1, x2, y2) on a one-pixel grid, zero-area boxes included: ties and exact 0.4 / 0.5 IoUs are common."""
    x1, y1 = draw(st.integers(0, 8)), draw(st.integers(0, 8))
    return [x1, y1, x1 + draw(st.integers(0, 6)), y1 + draw(st.integers(0, 6))]


# --- a worked example ---------------------------------------------------------------------------------------------

def test_worked_example_of_five_anchors_and_two_boxes(xp):
    boxes = spans(xp, (0, 10), (20, 30))
    anchors = spans(xp,
                    (0, 10),    # a0: the same as box 0: IoU 1                               -> positive, box 0
                    (2, 12),    # a1: overlaps box 0 by 8 of 12: IoU 0.67 >= 0.5               -> positive, box 0
                    (5, 15),    # a2: overlaps box 0 by 5 of 15: IoU 0.33 < 0.4                -> background
                    (16, 26),   # a3: overlaps box 1 by 6 of 14: IoU 0.43, between 0.4 and 0.5 -> ignored
                    (40, 50))   # a4: overlaps nothing: IoU 0                                  -> background
    matches, ious = match(xp, anchors, boxes)
    assert matches == [0, 0, BG, IGN, BG]
    np.testing.assert_allclose(ious, [1, 8 / 12, 5 / 15, 6 / 14, 0], rtol=1e-6)

    # With low-quality matches, box 1, whose best anchor (a3, IoU 0.43) is not positive, gets it anyway.
    # Box 0's best anchor, a0, is positive already.
    matches, low_quality_ious = match(xp, anchors, boxes, allow_low_quality_matches=True)
    assert matches == [0, 0, BG, 1, BG]
    np.testing.assert_array_equal(low_quality_ious, ious)   # the IoUs do not change, only the labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_iou_exactly_0_5_is_positive_and_exactly_0_4_is_ignored(xp, dtype):
    boxes = spans(xp, (0, 10), dtype=dtype)
    # Lengths 5, 4, 3 and 4.5 inside the box's 10: IoU 0.5, 0.4, 0.3 and 0.45. A correctly rounded 4 / 10 is
    # the dtype's 0.4, which is also what the threshold 0.4 is rounded to: IoU >= 0.5 is positive, IoU >= 0.4
    # ignored, IoU < 0.4 background.
    anchors = spans(xp, (0, 5), (0, 4), (0, 3), (0, 4.5), dtype=dtype)
    matches, ious = match(xp, anchors, boxes)
    assert ious[0] == dtype(0.5) and ious[1] == dtype(0.4)
    assert matches == [0, IGN, BG, IGN]


@pytest.mark.parametrize("threshold_type", [float, np.float64])
def test_thresholds_are_rounded_to_the_dtype_of_the_ious_as_pytorch_does(xp, threshold_type):
    # 7 / 10 rounds to float32(0.7) = 0.69999998..., just below the double 0.7. PyTorch compares a float32 IoU with
    # the threshold rounded to float32, so this anchor is positive at high = 0.7, even when the threshold comes as
    # a NumPy float64 (which NumPy alone would compare in float64).
    matches, ious = match(xp, spans(xp, (0, 7)), spans(xp, (0, 10)), high=threshold_type(0.7), low=threshold_type(0.4))
    assert ious[0] == np.float32(0.7) and float(ious[0]) < 0.7
    assert matches == [0]


def test_a_box_with_several_best_anchors_promotes_all_of_them(xp):
    boxes = spans(xp, (0, 10))
    # Anchors a0 and a1 both overlap the box by 5 of 15 (IoU 1/3, the same bits): both are its best. a2 is far.
    anchors = spans(xp, (-5, 5), (5, 15), (30, 40))
    assert match(xp, anchors, boxes)[0] == [BG, BG, BG]
    assert match(xp, anchors, boxes, allow_low_quality_matches=True)[0] == [0, 0, BG]


def test_a_promoted_anchor_takes_its_own_best_box(xp):
    # Box 0 (0 to 2) is small: its best anchor is a0 (IoU 2/10 = 0.2). But a0 overlaps box 1 (5 to 15) more
    # (IoU 5/15 = 0.33), so torchvision promotes a0 to box 1, its own best box, not to box 0. Box 1's best anchor
    # is a1 (the same box, IoU 1).
    boxes = spans(xp, (0, 2), (5, 15))
    anchors = spans(xp, (0, 10), (5, 15), (30, 40))
    assert match(xp, anchors, boxes)[0] == [BG, 1, BG]
    assert match(xp, anchors, boxes, allow_low_quality_matches=True)[0] == [1, 1, BG]


def test_a_box_that_overlaps_no_anchor_promotes_nothing_but_every_anchor_it_misses_in_torchvision(xp):
    # Box 0 is far from every anchor: its best IoU is 0, which every anchor "ties". minidet's rule: no anchor says
    # anything about it, so it promotes none. torchvision (match_zero_iou) promotes every anchor, each to its own
    # best box; an anchor that overlaps nothing has box 0 as its best (all IoUs 0, the first wins).
    boxes = spans(xp, (100, 110), (0, 10))
    anchors = spans(xp, (0, 10), (40, 50), (60, 70))
    matches, ious = match(xp, anchors, boxes, allow_low_quality_matches=True)
    assert matches == [1, BG, BG]
    matches, ious = match(xp, anchors, boxes, allow_low_quality_matches=True, match_zero_iou=True)
    assert matches == [1, 0, 0]
    np.testing.assert_array_equal(ious, [1, 0, 0])


def test_ties_between_boxes_go_to_the_lowest_box_index(xp):
    # The anchor (0 to 10) overlaps boxes 0 (-5 to 5) and 1 (5 to 15) by 5 of 15 each (IoU 1/3), and is the same
    # as boxes 2 and 3 (IoU 1).
    anchor, boxes = spans(xp, (0, 10)), spans(xp, (-5, 5), (5, 15), (0, 10), (0, 10))
    assert match(xp, anchor, boxes)[0] == [2]
    assert match(xp, anchor, boxes[:2], high=0.3, low=0.2)[0] == [0]


@pytest.mark.parametrize("allow_low_quality_matches", [False, True])
def test_no_boxes_makes_every_anchor_background_with_iou_0(xp, allow_low_quality_matches):
    anchors = spans(xp, (0, 10), (5, 15))
    matches, ious = match(xp, anchors, boxes_on(xp, []), allow_low_quality_matches=allow_low_quality_matches)
    assert matches == [BG, BG]
    np.testing.assert_array_equal(ious, [0, 0])


def test_no_anchors_gives_empty_results(xp):
    matches, ious = match(xp, boxes_on(xp, []), spans(xp, (0, 10)), allow_low_quality_matches=True)
    assert matches == [] and ious.shape == (0,)


def test_boxes_are_converted_to_the_anchors_dtype(xp):
    matches, ious = match(xp, spans(xp, (0, 10)), spans(xp, (0, 10), dtype=np.float64))
    assert matches == [0] and ious.dtype == np.float32


def test_bad_arguments_are_refused_with_a_reason(xp):
    anchors, boxes = spans(xp, (0, 10)), spans(xp, (0, 10))
    with pytest.raises(ValueError, match=r"low \(0.6\) must not be greater than high \(0.5\)"):
        match_anchors(anchors, boxes, high=0.5, low=0.6)
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        match_anchors(anchors, boxes, chunk_size=0)
    with pytest.raises(TypeError, match="anchors must be float32 or float64, got int64"):
        match_anchors(xp.asarray(np.array([[0, 0, 10, 10]])), boxes)


# --- chunks ----------------------------------------------------------------------------------------------------

def test_the_iou_table_is_computed_one_chunk_of_anchors_at_a_time(monkeypatch):
    """Never more than chunk_size anchors' IoUs at once: memory O(chunk_size * G), not O(A * G).

    NumPy only: CuPy arrays go to the CUDA kernel, which never builds an IoU table at all."""
    xp = np
    seen = []
    real_box_iou = minidet.matching.box_iou

    def recording_box_iou(anchors, boxes):
        seen.append(anchors.shape[0])
        return real_box_iou(anchors, boxes)

    monkeypatch.setattr(minidet.matching, "box_iou", recording_box_iou)
    anchors = spans(xp, *[(x, x + 10) for x in range(20)])
    match_anchors(anchors, spans(xp, (0, 10), (5, 25)), chunk_size=7, allow_low_quality_matches=True)
    assert seen == [7, 7, 6] * 2   # two passes over 20 anchors
    seen.clear()
    match_anchors(anchors, spans(xp, (0, 10)), chunk_size=7)
    assert seen == [7, 7, 6]       # without low-quality matches, one pass


@pytest.mark.parametrize("allow_low_quality_matches", [False, True])
def test_chunked_results_equal_one_chunk_exactly(xp, allow_low_quality_matches):
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 40, size=(300, 2))
    anchors = xp.asarray(np.concatenate([corners, corners + rng.integers(1, 12, size=(300, 2))], 1).astype(np.float32))
    boxes = anchors[rng.choice(300, 9, replace=False)] + 1.5
    options = dict(high=0.5, low=0.4, allow_low_quality_matches=allow_low_quality_matches)
    whole_matches, whole_ious = match(xp, anchors, boxes, chunk_size=10**9, **options)
    assert set(whole_matches) - {BG, IGN}, "the example should have some positives"
    for chunk_size in (1, 7, DEFAULT_CHUNK_SIZE):
        matches, ious = match(xp, anchors, boxes, chunk_size=chunk_size, **options)
        assert matches == whole_matches, f"chunk_size {chunk_size}"
        np.testing.assert_array_equal(ious, whole_ious, f"chunk_size {chunk_size}")


@PROPERTY
@given(anchor_rows=st.lists(grid_box(), max_size=12), box_rows=st.lists(grid_box(), max_size=5),
       thresholds=st.sampled_from([(0.5, 0.4), (0.5, 0.5), (0.6, 0.25), (1.0, 0.0)]),
       allow_low_quality_matches=st.booleans(), match_zero_iou=st.booleans(),
       chunk_size=st.sampled_from([1, 3, 7, DEFAULT_CHUNK_SIZE]), dtype=st.sampled_from([np.float32, np.float64]))
def test_match_anchors_equals_the_full_table_reference(xp, anchor_rows, box_rows, thresholds,
                                                      allow_low_quality_matches, match_zero_iou, chunk_size, dtype):
    high, low = thresholds
    # The reference gets scalars of the dtype (coordinates and thresholds), so its arithmetic rounds as the
    # arrays' does, and the IoUs can be compared exactly.
    anchors_by_hand = [[dtype(v) for v in row] for row in anchor_rows]
    boxes_by_hand = [[dtype(v) for v in row] for row in box_rows]
    expected_matches, expected_ious = match_by_hand(anchors_by_hand, boxes_by_hand, dtype(high), dtype(low),
                                                    allow_low_quality_matches, match_zero_iou)
    matches, ious = match(xp, boxes_on(xp, anchor_rows, dtype), boxes_on(xp, box_rows, dtype), high=high, low=low,
                          allow_low_quality_matches=allow_low_quality_matches, chunk_size=chunk_size,
                          match_zero_iou=match_zero_iou)
    assert matches == expected_matches
    np.testing.assert_array_equal(ious, np.array(expected_ious, dtype))


# --- batches ------------------------------------------------------------------------------------------------------

def test_a_batch_matches_each_image_on_its_own_and_never_reads_the_padding(xp):
    anchors = spans(xp, (0, 10), (2, 12), (16, 26), (40, 50), (60, 70))
    real = [[[0, 0, 10, 10], [20, 0, 30, 10]],     # image 0: two boxes
            [],                                     # image 1: none
            [[60, 0, 70, 10], [40, 0, 48, 10], [15, 0, 25, 10]]]   # image 2: three boxes
    counts = xp.asarray(np.array([len(r) for r in real], np.int64))

    def padded_with(garbage):
        """(B, Gmax = 4, 4): each image's boxes, then rows of ``garbage`` up to 4."""
        return xp.asarray(np.stack([np.concatenate([np.array(r, np.float32).reshape(-1, 4), garbage[:4 - len(r)]])
                                    for r in real]))

    # Padding that would change labels if it were read: boxes equal to anchors, nan, inf, a huge box.
    padded = padded_with(np.array([[40, 0, 50, 10], [np.nan] * 4, [-1e9, -1e9, 1e9, 1e9], [2, 0, 12, 10]],
                                  np.float32))
    other_padded = padded_with(np.array([[0, 0, 10, 10], [16, 0, 26, 10], [np.inf] * 4, [60, 0, 70, 10]],
                                        np.float32))
    for allow_low_quality_matches in (False, True):
        matches, ious = match_anchors_batch(anchors, padded, counts,
                                            allow_low_quality_matches=allow_low_quality_matches)
        assert matches.shape == ious.shape == (3, 5) and matches.dtype == np.int64 and ious.dtype == np.float32
        for b, rows in enumerate(real):
            one_matches, one_ious = match(xp, anchors, boxes_on(xp, rows),
                                          allow_low_quality_matches=allow_low_quality_matches)
            assert to_numpy(matches[b]).tolist() == one_matches, f"image {b}"
            np.testing.assert_array_equal(to_numpy(ious[b]), one_ious, f"image {b}")
        # Other garbage, the same answer.
        matches_again, ious_again = match_anchors_batch(anchors, other_padded, counts,
                                                        allow_low_quality_matches=allow_low_quality_matches)
        np.testing.assert_array_equal(to_numpy(matches_again), to_numpy(matches))
        np.testing.assert_array_equal(to_numpy(ious_again), to_numpy(ious))

    # Spelled out for image 0 (the worked example's boxes) and image 1 (no boxes), without low-quality matches.
    matches, _ = match_anchors_batch(anchors, padded, counts)
    assert to_numpy(matches[0]).tolist() == [0, 0, IGN, BG, BG]
    assert to_numpy(matches[1]).tolist() == [BG] * 5


def test_a_batch_refuses_counts_that_do_not_fit_the_padding(xp):
    anchors, boxes = spans(xp, (0, 10)), xp.zeros((2, 3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"counts must have shape \(B,\) = \(2,\)"):
        match_anchors_batch(anchors, boxes, xp.asarray(np.array([1, 1, 1])))
    with pytest.raises(ValueError, match=r"between 0 and Gmax = 3 .* got \[1, 4\]"):
        match_anchors_batch(anchors, boxes, xp.asarray(np.array([1, 4])))


def test_an_empty_batch_gives_empty_results(xp):
    matches, ious = match_anchors_batch(spans(xp, (0, 10)), xp.zeros((0, 3, 4), dtype=np.float32),
                                        xp.zeros(0, dtype=np.int64))
    assert matches.shape == ious.shape == (0, 1)
