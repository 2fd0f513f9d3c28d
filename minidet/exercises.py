"""Checkers for the course's exercises: write your own version of a piece of RetinaNet, then check it.

    from minidet.exercises import check
    def my_iou(boxes1, boxes2): ...
    check("iou", my_iou)

``check`` calls your function on random inputs and on edge cases (boxes that only touch, an IoU exactly at a
threshold, logits of +-100, ...) and compares every result with minidet's own. It stops at the first difference
and says which case, which element, what was expected and what came back, and a hint: when your result is what a
common mistake gives (a "+ 1" in the box widths, ``>=`` where ``>`` belongs, ...), the hint names that mistake.

Each exercise, its function's arguments and what it returns (NumPy arrays in, NumPy arrays or numbers out):

- ``"iou"``: ``iou(boxes1 (N, 4), boxes2 (M, 4)) -> (N, M)``, boxes as (x1, y1, x2, y2)
- ``"anchors"``: ``cell_anchors(size, scales, aspect_ratios) -> (A, 4)``, one cell's anchors centred on (0, 0),
  ratio-major (all scales of the first ratio first), aspect ratio = h / w
- ``"encode"``: ``encode(boxes (N, 4), anchors (N, 4)) -> (N, 4)`` offsets (dx, dy, dw, dh)
- ``"match"``: ``match(anchors (A, 4), boxes (G, 4)) -> (A,)`` ints: the matched box, -1 background (best IoU
  < 0.4) or -2 ignored (0.4 <= IoU < 0.5)
- ``"smooth_l1"``: ``smooth_l1(input, target, beta) -> ``the loss of each element
- ``"focal_loss"``: ``focal_loss(logits, targets, alpha, gamma) -> ``the loss of each element
- ``"focal_loss_grad"``: ``focal_loss_grad(logits, targets, alpha, gamma) -> ``d loss / d logit of each element
- ``"nms"``: ``nms(boxes (N, 4), scores (N,), iou_threshold) -> ``the kept indices, highest score first
- ``"average_precision"``: ``average_precision(scores (D,), is_true_positive (D,), num_ground_truth) -> ``COCO's
  101-point AP of one class
"""

import dataclasses

import numpy as np

from minidet import functional as F
from minidet.anchors import cell_anchors
from minidet.autograd import Tensor
from minidet.boxes import box_iou, encode_boxes, nms
from minidet.evaluate import average_precision
from minidet.functional.loss import focal_loss_terms
from minidet.matching import match_anchors


class ExerciseFailed(AssertionError):
    """A checked function gave a result other than minidet's; the message says where and gives a hint."""


@dataclasses.dataclass
class Exercise:
    """One exercise: minidet's answer, the cases to try, and what typical mistakes give (with their hints)."""

    reference: object            # the function whose results are right
    cases: object                # rng -> [(description, args tuple)]
    mistakes: list               # [(a function that makes the mistake, the hint that names it)]
    hint: str                    # when the result matches no known mistake
    exact: bool = False          # integer results (indices, labels): equal, not close


def check(name, function, seed=0):
    """Run ``function`` on every case of exercise ``name`` and compare with minidet's results.

    Returns True when every case agrees, printing how many there were; raises ``ExerciseFailed`` at the first
    case that does not, naming the case, the first differing element, the expected and the received value, and a
    hint. The function is called with positional arguments, in the order the module docstring gives.
    """
    if name not in EXERCISES:
        raise ValueError(f"check: no exercise {name!r}; the exercises are {', '.join(EXERCISES)}")
    exercise = EXERCISES[name]
    cases = exercise.cases(np.random.default_rng(seed))
    for number, (description, args) in enumerate(cases, start=1):
        expected = exercise.reference(*args)
        try:
            got = function(*_copies(args))
        except Exception as error:       # the learner's code failed: say on which input, keep the cause
            raise ExerciseFailed(f'check("{name}"): case {number} of {len(cases)} ({description}) raised '
                                 f"{type(error).__name__}: {error}\n  inputs: {_show(args)}") from error
        difference = _difference(expected, got, exercise.exact)
        if difference is not None:
            raise ExerciseFailed(f'check("{name}"): case {number} of {len(cases)} ({description}) differs.\n'
                                 f"  inputs: {_show(args)}\n  {difference}\n  hint: {_hint(exercise, args, got)}")
    print(f'check("{name}"): correct on all {len(cases)} cases ({"; ".join(dict.fromkeys(d for d, _ in cases))})')
    return True


def _copies(args):
    """Copies of the array arguments, so that a function that changes its inputs cannot change the next check."""
    return tuple(np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args)


def _difference(expected, got, exact):
    """None when ``got`` is ``expected`` (within float32 rounding unless ``exact``), else a line saying where not."""
    expected = np.asarray(expected)
    try:
        got = np.asarray(got, dtype=np.float64 if not exact else None)
    except (TypeError, ValueError):
        return f"expected an array of shape {expected.shape}, got {type(got).__name__} {got!r}"
    if got.shape != expected.shape:
        shown = f" {got.tolist()}" if got.size <= 10 else ""
        return f"expected shape {expected.shape}{_values(expected)}, got shape {got.shape}{shown}"
    if exact:
        wrong = got != expected
    else:
        close = np.isclose(got, expected, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(expected).max(initial=0))))
        wrong = ~close | (np.isnan(got) & ~np.isnan(expected))
    if not wrong.any():
        return None
    index = tuple(int(i) for i in np.argwhere(wrong)[0])
    where = f"element {list(index)}" if index else "the result"
    return (f"{where}: expected {expected[index].item()!r}, got {got[index].item()!r} "
            f"({int(wrong.sum())} of {wrong.size} elements differ){_values(expected)}")


def _values(array):
    return f"; expected {array.tolist()}" if 1 < array.size <= 10 else ""


def _show(args):
    """The arguments as lists, rounded to 3 decimals (arrays of over 40 numbers by their shape only)."""
    parts = []
    for a in args:
        a = np.asarray(a)
        shown = np.round(a, 3) if a.dtype.kind == "f" else a
        parts.append(repr(shown.tolist()) if a.size <= 40 else f"an array of shape {a.shape}")
    return ", ".join(parts)


def _hint(exercise, args, got):
    for mistake, hint in exercise.mistakes:
        if _difference(mistake(*args), got, exercise.exact) is None:
            return hint
    return exercise.hint


# --- the cases ------------------------------------------------------------------------------------------------------

def _random_boxes(rng, count, scale=100.0):
    corners = rng.uniform(0, scale, size=(count, 2))
    sizes = rng.uniform(1, scale / 2, size=(count, 2))
    return np.concatenate([corners, corners + sizes], axis=1)


def _iou_cases(rng):
    return [("random boxes", (_random_boxes(rng, 5), _random_boxes(rng, 4))),
            ("random boxes", (_random_boxes(rng, 7), _random_boxes(rng, 3))),
            ("identical boxes", (np.array([[10.0, 20, 50, 60]]), np.array([[10.0, 20, 50, 60]]))),
            ("boxes that only touch at an edge", (np.array([[0.0, 0, 2, 2]]), np.array([[2.0, 0, 4, 2]]))),
            ("boxes far apart", (np.array([[0.0, 0, 2, 2]]), np.array([[5.0, 5, 7, 9]]))),
            ("one box inside the other", (np.array([[0.0, 0, 10, 10]]), np.array([[2.0, 3, 4, 6]]))),
            ("boxes 1 pixel wide", (np.array([[0.0, 0, 1, 1], [0, 0, 1, 3]]), np.array([[0.0, 0, 1, 2]])))]


def _anchor_cases(rng):
    return [("the paper's P3", (32, (1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (0.5, 1.0, 2.0))),
            ("one scale, tall and wide ratios", (64, (1.0,), (0.25, 4.0))),
            ("two scales, three ratios", (16, (1.0, 1.5), (0.5, 1.0, 3.0))),
            ("a random size", (float(rng.uniform(8, 256)), (1.0, 1.3), (0.5, 2.0)))]


def _encode_cases(rng):
    anchors = _random_boxes(rng, 6)
    boxes = anchors + rng.uniform(-5, 5, size=anchors.shape)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return [("random boxes near their anchors", (boxes, anchors)),
            ("a box equal to its anchor", (np.array([[10.0, 10, 42, 42]]), np.array([[10.0, 10, 42, 42]]))),
            ("a box twice as wide, shifted right", (np.array([[16.0, 0, 80, 32]]), np.array([[0.0, 0, 32, 32]]))),
            ("a tall box on a wide anchor", (np.array([[0.0, 0, 10, 40]]), np.array([[-15.0, 10, 25, 30]])))]


def _match_cases(rng):
    anchors = np.array([[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 25], [30, 30, 40, 40], [0, 0, 10, 40]])
    boxes = np.array([[0.0, 0, 10, 10], [31, 31, 41, 41]])
    grid = np.array([[x, y, x + 32, y + 32] for x in range(0, 96, 16) for y in range(0, 96, 16)], dtype=np.float64)
    return [("anchors with IoU exactly 1, 0.5, 0.4 and 0.25 with the first box", (anchors, boxes)),
            ("random boxes on a grid of anchors", (grid, _random_boxes(rng, 3))),
            ("random boxes on a grid of anchors", (grid, _random_boxes(rng, 5))),
            ("an image without boxes", (grid, np.zeros((0, 4))))]


def _smooth_l1_cases(rng):
    beta = 0.11
    return [("random differences", (rng.normal(0, 0.3, 12), rng.normal(0, 0.3, 12), beta)),
            ("differences at and around beta", (np.array([0.0, 0.05, 0.11, 0.2, -0.11, -1.0]), np.zeros(6), beta)),
            ("beta = 1", (rng.normal(0, 2, 8), np.zeros(8), 1.0))]


def _focal_cases(rng):
    logits = rng.normal(0, 3, 10)
    targets = (rng.random(10) < 0.3).astype(np.float64)
    return [("random logits and 0/1 targets", (logits, targets, 0.25, 2.0)),
            ("gamma = 0: cross-entropy weighted by alpha", (logits, targets, 0.25, 0.0)),
            ("alpha = 0.75, gamma = 1", (logits, 1 - targets, 0.75, 1.0)),
            ("logits of -100 and +100 with both targets", (np.array([-100.0, 100, -100, 100]),
                                                           np.array([0.0, 0, 1, 1]), 0.25, 2.0))]


def _nms_cases(rng):
    # Box 1 has IoU exactly 0.5 with box 0 (intersection 2, union 4): at threshold 0.5 it stays.
    at_threshold = (np.array([[0.0, 0, 2, 2], [0, 0, 2, 1], [5, 5, 6, 6]]), np.array([0.9, 0.8, 0.7]), 0.5)
    boxes = _random_boxes(rng, 12, scale=40)
    return [("a box at IoU exactly 0.5 with a better one", at_threshold),
            ("scores not in order", (np.array([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]),
                                     np.array([0.3, 0.9, 0.5]), 0.5)),
            ("twelve overlapping random boxes", (boxes, rng.random(12), 0.5)),
            ("twelve overlapping random boxes, threshold 0.3", (boxes, rng.random(12), 0.3))]


def _ap_cases(rng):
    return [("detections alternately right and wrong", (np.array([0.9, 0.8, 0.7, 0.6]),
                                                          np.array([True, False, True, False]), 2)),
            ("fewer right detections than boxes", (np.array([0.9, 0.5, 0.4]), np.array([True, True, False]), 4)),
            ("scores not in order", (np.array([0.2, 0.9, 0.5, 0.7]), np.array([True, False, True, True]), 3)),
            ("random detections", (rng.random(20), rng.random(20) < 0.6, 15))]


# --- typical mistakes -----------------------------------------------------------------------------------------------

def _iou_with(boxes1, boxes2, extra=0.0, clamp=True, subtract=True):
    """IoU with typical slips: ``extra`` added to widths and heights, no clamp of negative overlaps, a union that
    does not subtract the intersection."""
    top_left = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    sides = bottom_right - top_left + extra
    if clamp:
        sides = np.maximum(sides, 0)
    inter = sides[..., 0] * sides[..., 1]
    area1 = np.prod(boxes1[:, 2:] - boxes1[:, :2] + extra, axis=1)
    area2 = np.prod(boxes2[:, 2:] - boxes2[:, :2] + extra, axis=1)
    union = area1[:, None] + area2[None, :] - (inter if subtract else 0)
    return inter / union


def _ratio_as_w_over_h(size, scales, aspect_ratios):
    return cell_anchors(size, scales, tuple(1 / r for r in aspect_ratios))


def _scale_major(size, scales, aspect_ratios):
    per_ratio = cell_anchors(size, scales, aspect_ratios).reshape(len(aspect_ratios), len(scales), 4)
    return per_ratio.transpose(1, 0, 2).reshape(-1, 4)


def _encode_by_box_size(boxes, anchors):
    deltas = encode_boxes(boxes, anchors)
    scale = (anchors[:, 2:] - anchors[:, :2]) / (boxes[:, 2:] - boxes[:, :2])
    return np.concatenate([deltas[:, :2] * scale, deltas[:, 2:]], axis=1)


def _encode_without_log(boxes, anchors):
    deltas = encode_boxes(boxes, anchors)
    return np.concatenate([deltas[:, :2], np.exp(deltas[:, 2:])], axis=1)


def _match_strict_high(anchors, boxes):
    matches, ious = match_anchors(anchors, boxes)
    return np.where((matches >= 0) & (ious <= 0.5), -2, matches)


def _match_codes_swapped(anchors, boxes):
    matches = match_anchors(anchors, boxes)[0]
    return np.select([matches == -1, matches == -2], [-2, -1], matches)


def _smooth_l1_without_beta(input, target, beta):
    d = np.abs(input - target)
    return np.where(d < beta, 0.5 * d ** 2, d - 0.5 * beta)


def _smooth_l1_plain_linear(input, target, beta):
    d = np.abs(input - target)
    return np.where(d < beta, 0.5 * d ** 2 / beta, d)


def _focal_alpha_swapped(logits, targets, alpha, gamma):
    return focal_loss_terms(logits, targets, 1 - alpha, gamma)[0]


def _focal_p_not_pt(logits, targets, alpha, gamma):
    p = 1 / (1 + np.exp(-logits))
    ce = np.logaddexp(0, logits) - targets * logits
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p) ** gamma * ce


def _focal_grad_without_modulator_term(logits, targets, alpha, gamma):
    p = 1 / (1 + np.exp(-logits))
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (targets * (1 - p) + (1 - targets) * p) ** gamma * (p - targets)


def _nms_suppress_at_threshold(boxes, scores, iou_threshold):
    return nms(boxes, scores, np.nextafter(iou_threshold, -np.inf))


def _nms_input_order(boxes, scores, iou_threshold):
    return np.sort(nms(boxes, scores, iou_threshold))


def _ap_without_envelope(scores, is_true_positive, num_ground_truth):
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(is_true_positive[order])
    precision, recall = hits / np.arange(1, len(order) + 1), hits / num_ground_truth
    where = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.where(where < len(recall), precision[np.minimum(where, len(recall) - 1)], 0).mean())


def _ap_recall_over_detections(scores, is_true_positive, num_ground_truth):
    return average_precision(scores, is_true_positive, len(scores))


def _smooth_l1(input, target, beta):
    return F.smooth_l1_loss(Tensor(input), Tensor(target), reduction="none", beta=beta).numpy()


def _focal_grad(logits, targets, alpha, gamma):
    return focal_loss_terms(logits, targets, alpha, gamma)[1]


EXERCISES = {
    "iou": Exercise(box_iou, _iou_cases, [
        (lambda a, b: _iou_with(a, b, extra=1.0), "you add 1 to widths and heights (the convention of pixel "
         "indices that include both ends); here boxes are continuous: w = x2 - x1"),
        (lambda a, b: _iou_with(a, b, clamp=False), "boxes that do not overlap give negative widths or heights of "
         "the intersection; clamp each to 0 before multiplying (two negatives make a positive area)"),
        (lambda a, b: _iou_with(a, b, subtract=False), "the union is area1 + area2 - intersection: the overlap is "
         "counted twice otherwise")],
        "the intersection runs from the larger (x1, y1) to the smaller (x2, y2); "
        "IoU = inter / (area1 + area2 - inter)"),
    "anchors": Exercise(cell_anchors, _anchor_cases, [
        (_ratio_as_w_over_h, "the aspect ratio is h / w: ratio 2 is a tall anchor, h = S * sqrt(2), "
         "w = S / sqrt(2)"),
        (_scale_major, "the order is ratio-major: all scales of the first ratio, then all scales of the next")],
        "each anchor has size S = size * scale, h = S * sqrt(ratio), w = S / sqrt(ratio), and the row "
        "(-w/2, -h/2, w/2, h/2)"),
    "encode": Exercise(encode_boxes, _encode_cases, [
        (_encode_by_box_size, "dx and dy are measured in the anchor's width and height, not the box's"),
        (_encode_without_log, "dw and dh are log-ratios: log(box width / anchor width)")],
        "use centres and sizes: dx = (box cx - anchor cx) / anchor w, dw = log(box w / anchor w)"),
    "match": Exercise(lambda anchors, boxes: match_anchors(anchors, boxes)[0], _match_cases, [
        (_match_strict_high, "an anchor with IoU exactly 0.5 is positive: the rule is IoU >= 0.5, not > 0.5"),
        (_match_codes_swapped, "background (IoU < 0.4) is -1 and ignored (0.4 <= IoU < 0.5) is -2")],
        "take each anchor's best box (the lowest index among ties): >= 0.5 that box, < 0.4 background (-1), "
        "else ignored (-2)", exact=True),
    "smooth_l1": Exercise(_smooth_l1, _smooth_l1_cases, [
        (_smooth_l1_without_beta, "the quadratic part is 0.5 d^2 / beta: without the division it does not meet "
         "the linear part at |d| = beta"),
        (_smooth_l1_plain_linear, "the linear part is |d| - 0.5 beta, so that the two parts meet at |d| = beta")],
        "0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta, with d = input - target"),
    "focal_loss": Exercise(lambda *args: focal_loss_terms(*args)[0], _focal_cases, [
        (_focal_alpha_swapped, "alpha weights the positives (target 1) and 1 - alpha the negatives, not the other "
         "way round"),
        (_focal_p_not_pt, "the modulating factor is (1 - p_t)^gamma, where p_t is p for a positive and 1 - p for "
         "a negative, not (1 - p)^gamma for both")],
        "loss = alpha_t (1 - p_t)^gamma * cross-entropy; at logits of +-100, compute the cross-entropy from "
        "softplus (np.logaddexp(0, x)) rather than log(sigmoid(x)), which gives log(0)"),
    "focal_loss_grad": Exercise(_focal_grad, _focal_cases, [
        (_focal_grad_without_modulator_term, "the modulating factor depends on the logit too: add the term "
         "alpha_t * gamma (1 - p_t)^(gamma - 1) (1 - 2t) p (1 - p) * cross-entropy")],
        "differentiate alpha_t (1 - p_t)^gamma ce by the product rule: d ce/dx = p - t, d(1 - p_t)/dx = "
        "(1 - 2t) p (1 - p)"),
    "nms": Exercise(nms, _nms_cases, [
        (_nms_suppress_at_threshold, "a box is dropped when its IoU with a kept box is greater than the threshold; "
         "at exactly the threshold it stays (> , not >=)"),
        (_nms_input_order, "return the kept indices highest score first, not in input order")],
        "sort by score (highest first); keep the best, drop the rest whose IoU with it is > threshold; repeat",
        exact=True),
    "average_precision": Exercise(average_precision, _ap_cases, [
        (_ap_without_envelope, "make precision monotone first: at each recall, the best precision at that recall "
         "or any higher one"),
        (_ap_recall_over_detections, "recall is true positives / ground-truth boxes, not / detections")],
        "sort by score; after each detection precision = TP / detections so far and recall = TP / boxes; take "
        "the envelope, read it at recall 0, 0.01, ..., 1 (0 beyond the highest recall) and average"),
}
