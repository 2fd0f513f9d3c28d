"""The course's checkers (minidet/exercises.py): a correct solution, written here independently of minidet, passes;
each typical mistake is caught, with a message that names the case, the element and the mistake."""

import numpy as np
import pytest

from minidet.evaluate import average_precision, coco_evaluate
from minidet.exercises import EXERCISES, ExerciseFailed, check

# --- solutions a learner might write: loops and plain formulas ------------------------------------------------------

def iou(boxes1, boxes2, plus_one=0.0):
    out = np.zeros((len(boxes1), len(boxes2)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(boxes1):
        for j, (bx1, by1, bx2, by2) in enumerate(boxes2):
            w = max(0.0, min(ax2, bx2) - max(ax1, bx1) + plus_one)
            h = max(0.0, min(ay2, by2) - max(ay1, by1) + plus_one)
            area_a = (ax2 - ax1 + plus_one) * (ay2 - ay1 + plus_one)
            area_b = (bx2 - bx1 + plus_one) * (by2 - by1 + plus_one)
            out[i, j] = w * h / (area_a + area_b - w * h)
    return out


def cell_anchors(size, scales, aspect_ratios, swap=False):
    rows = []
    for ratio in aspect_ratios:
        for scale in scales:
            s = size * scale
            w, h = s / np.sqrt(ratio), s * np.sqrt(ratio)
            if swap:
                w, h = h, w
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return np.array(rows)


def nms(boxes, scores, iou_threshold, suppress_ties=False):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    while order:
        best = order.pop(0)
        keep.append(best)
        overlaps = [iou(boxes[best:best + 1], boxes[i:i + 1])[0, 0] for i in order]
        order = [i for i, o in zip(order, overlaps) if (o < iou_threshold if suppress_ties else o <= iou_threshold)]
    return np.array(keep, dtype=int)


def focal_loss(logits, targets, alpha, gamma, swap_alpha=False):
    p = 1 / (1 + np.exp(-logits))
    ce = np.logaddexp(0, logits) - targets * logits          # stable: softplus(x) - t x
    p_t = targets * p + (1 - targets) * (1 - p)
    a = 1 - alpha if swap_alpha else alpha
    alpha_t = a * targets + (1 - a) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def match(anchors, boxes, strict=False):
    if len(boxes) == 0:
        return np.full(len(anchors), -1)
    overlaps = iou(anchors, boxes)
    best, best_iou = overlaps.argmax(axis=1), overlaps.max(axis=1)
    positive = best_iou > 0.5 if strict else best_iou >= 0.5
    return np.where(positive, best, np.where(best_iou < 0.4, -1, -2))


def ap(scores, is_true_positive, num_ground_truth, envelope=True):
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(is_true_positive[order])
    precision, recall = tp / np.arange(1, len(tp) + 1), tp / num_ground_truth
    if envelope:
        precision = np.array([precision[i:].max() for i in range(len(precision))])
    values = []
    for level in np.linspace(0, 1, 101):
        reached = np.flatnonzero(recall >= level)
        values.append(precision[reached[0]] if len(reached) else 0.0)
    return float(np.mean(values))


def smooth_l1(input, target, beta, divide=True):
    d = np.abs(input - target)
    return np.where(d < beta, 0.5 * d ** 2 / (beta if divide else 1), d - 0.5 * beta)


CORRECT = {"iou": iou, "anchors": cell_anchors, "nms": nms, "focal_loss": focal_loss, "match": match,
           "average_precision": ap, "smooth_l1": smooth_l1}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_a_correct_solution_passes(name, capsys):
    assert check(name, CORRECT[name]) is True
    assert f'check("{name}"): correct on all' in capsys.readouterr().out


def test_every_exercise_passes_minidets_own_answer_and_the_correct_solutions_cover_most():
    for name, exercise in EXERCISES.items():
        assert check(name, exercise.reference)
    assert len(CORRECT) >= 7


# --- typical mistakes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, wrong, words", [
    ("iou", lambda a, b: iou(a, b, plus_one=1.0), "you add 1 to widths and heights"),
    ("nms", lambda b, s, t: nms(b, s, t, suppress_ties=True), "at exactly the threshold it stays"),
    ("focal_loss", lambda x, t, a, g: focal_loss(x, t, a, g, swap_alpha=True), "alpha weights the positives"),
    ("anchors", lambda size, s, r: cell_anchors(size, s, r, swap=True), "the aspect ratio is h / w"),
    ("match", lambda a, b: match(a, b, strict=True), "IoU >= 0.5, not > 0.5"),
    ("average_precision", lambda s, t, n: ap(s, t, n, envelope=False), "make precision monotone"),
    ("smooth_l1", lambda x, t, b: smooth_l1(x, t, b, divide=False), "0.5 d^2 / beta"),
])
def test_a_typical_mistake_is_caught_and_named(name, wrong, words):
    with pytest.raises(ExerciseFailed) as failure:
        check(name, wrong)
    message = str(failure.value)
    assert words in message
    assert f'check("{name}"): case' in message and "expected" in message and "got" in message


def test_the_message_names_the_case_the_element_and_both_values():
    with pytest.raises(ExerciseFailed) as failure:
        check("iou", lambda a, b: iou(a, b, plus_one=1.0))
    first_line, inputs, difference, hint = str(failure.value).splitlines()
    assert "case 1 of 7 (random boxes) differs" in first_line
    assert inputs.startswith("  inputs: [[")
    assert difference.startswith("  element [") and "expected" in difference and "elements differ" in difference


def test_an_unknown_mistake_gets_the_exercises_general_hint():
    with pytest.raises(ExerciseFailed, match="hint: the intersection runs from the larger"):
        check("iou", lambda a, b: iou(a, b) * 0.9)


def test_a_wrong_shape_an_exception_and_a_missing_exercise_are_reported():
    with pytest.raises(ExerciseFailed, match=r"(?s)expected shape \(5, 4\).*got shape \(4, 5\)"):
        check("iou", lambda a, b: iou(a, b).T)
    with pytest.raises(ExerciseFailed, match="raised ZeroDivisionError: division by zero"):
        check("nms", lambda b, s, t: 1 / 0)
    with pytest.raises(ValueError, match="no exercise 'nmx'; the exercises are iou, anchors"):
        check("nmx", nms)


def test_unstable_focal_loss_is_caught_at_logits_of_100():
    def naive(x, t, alpha, gamma):
        p = 1 / (1 + np.exp(-x))
        with np.errstate(all="ignore"):
            ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        return alpha_t * (1 - (t * p + (1 - t) * (1 - p))) ** gamma * ce

    with np.errstate(over="ignore"):
        with pytest.raises(ExerciseFailed, match=r"(?s)logits of -100 and \+100.*softplus"):
            check("focal_loss", naive)


def test_a_function_that_changes_its_inputs_cannot_change_the_expected_answer():
    def in_place(boxes, scores, threshold):
        kept = nms(boxes, scores, threshold)
        scores[:] = 0
        return kept

    assert check("nms", in_place)


# --- the AP reference is pycocotools' ---------------------------------------------------------------------------------

class OneImage(list):
    classes = ("thing",)


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_equals_pycocotools_on_random_detections(seed):
    rng = np.random.default_rng(seed)
    boxes = np.array([[x, y, x + 30, y + 30] for x in range(0, 300, 50) for y in range(0, 300, 50)], np.float32)
    found = rng.permutation(len(boxes))[:rng.integers(1, len(boxes))]            # boxes some detection hits
    misses = rng.integers(0, 8)
    detected = np.concatenate([boxes[found], np.tile([[600, 600, 630, 630]], (misses, 1))]).astype(np.float32)
    scores = rng.permutation(len(detected)).astype(np.float32) / len(detected) + 0.01     # distinct
    image = np.zeros((3, 700, 700), np.float32)
    dataset = OneImage([(image, {"boxes": boxes, "labels": np.zeros(len(boxes), np.int64)})])
    result = coco_evaluate(dataset, [{"boxes": detected, "scores": scores,
                                       "labels": np.zeros(len(detected), np.int64)}])
    is_true_positive = np.arange(len(detected)) < len(found)
    assert average_precision(scores, is_true_positive, len(boxes)) == pytest.approx(result.ap50, abs=1e-12)


def test_average_precision_needs_a_ground_truth_box():
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        average_precision(np.array([0.5]), np.array([True]), 0)
