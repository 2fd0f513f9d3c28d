"""Boxes: area, IoU, the (dx, dy, dw, dh) box coding, clipping, checking, and non-maximum suppression.

A box is ``(x1, y1, x2, y2)`` in pixels, with (x1, y1) the top-left and (x2, y2) the bottom-right corner. Widths
and heights are ``x2 - x1`` and ``y2 - y1`` (torchvision's convention: no "+ 1" as in the old Pascal VOC code),
so a box from 0 to 10 is 10 pixels wide.

Plain arrays in, plain arrays out: nothing here is differentiable, and every function takes NumPy or CuPy
arrays. Shapes use N and M for numbers of boxes. The arithmetic follows torchvision operation by operation: IoU,
and so NMS and matching, agree with it bit for bit in float32; the box coding can differ in the last bit, where
NumPy's and PyTorch's ``log`` and ``exp`` round differently.
"""

import math

from minidet.backend import check_same_device, get_array_module, to_numpy

# Decoding exponentiates dw and dh. Early in training the regression subnet can predict anything, and
# exp(100) overflows float32, so dw and dh are clamped first: no decoded box is more than 1000/16 = 62.5 times
# wider or taller than its anchor. Detectron and torchvision use this value.
DEFAULT_DECODE_CLAMP = math.log(1000.0 / 16)


def box_area(boxes):
    """Area of each box.

    Args:
        boxes: (N, 4) as (x1, y1, x2, y2).

    Returns:
        (N,) ``(x2 - x1) * (y2 - y1)``, in the dtype of ``boxes``.
    """
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1, boxes2):
    """Intersection over union of every box in ``boxes1`` with every box in ``boxes2``.

    IoU = area(A and B) / area(A or B), from 0 (no overlap) to 1 (the same box).

    Args:
        boxes1: (N, 4) as (x1, y1, x2, y2).
        boxes2: (M, 4).

    Returns:
        (N, M) array: entry [i, j] is the IoU of ``boxes1[i]`` and ``boxes2[j]``, in the dtype NumPy's promotion
        rules give the two inputs (float32 for two float32 arrays). A pair whose union has area 0 (two zero-area
        boxes) gets IoU 0, not the nan of 0 / 0 that torchvision gives.

    The order of operations is part of the specification (the CUDA matching kernel repeats it, so that both
    give the same bits): ``inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))``,
    ``union = (area1 + area2) - inter``, ``iou = inter / union``.
    """
    check_same_device("box_iou", [boxes1, boxes2])
    xp = get_array_module(boxes1, boxes2)
    area1 = box_area(boxes1)                                                # (N,)
    area2 = box_area(boxes2)                                                # (M,)
    # The intersection is the box from the larger top-left corner to the smaller bottom-right corner.
    top_left = xp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])        # (N, M, 2)
    bottom_right = xp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])    # (N, M, 2)
    # Boxes that do not overlap give a negative width or height: clamp it to 0.
    width_height = xp.maximum(bottom_right - top_left, 0)                  # (N, M, 2)
    inter = width_height[:, :, 0] * width_height[:, :, 1]                  # (N, M)
    union = area1[:, None] + area2[None, :] - inter                         # (N, M)
    # Divide only where the union is positive: 0 / 0 would be nan (and a warning).
    has_area = union > 0                                                    # (N, M)
    return xp.where(has_area, inter / xp.where(has_area, union, 1), 0)


def _centres_and_sizes(boxes):
    """(cx, cy, w, h) of (N, 4) boxes, four (N,) arrays, with torchvision's arithmetic: cx = x1 + 0.5 * w."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_boxes(boxes, anchors, weights=(1.0, 1.0, 1.0, 1.0)):
    """The regression targets of ``boxes`` relative to ``anchors``: what the regression subnet learns to predict.

    With centres ``cx = x1 + 0.5 * w``, ``cy = y1 + 0.5 * h`` (g for the box, a for its anchor) and the weights
    (wx, wy, ww, wh)::

        dx = wx * (gcx - acx) / aw        dw = ww * log(gw / aw)
        dy = wy * (gcy - acy) / ah        dh = wh * log(gh / ah)

    Offsets are measured in anchor widths and heights, and sizes as log-ratios, so the same deltas mean the same
    relative change for a 32-pixel and a 512-pixel anchor. This is torchvision's ``BoxCoder.encode_single``,
    operation for operation.

    Args:
        boxes: (N, 4) float32 or float64, the ground-truth box matched to each anchor.
        anchors: (N, 4), converted to the dtype of ``boxes``.
        weights: (wx, wy, ww, wh), scales for the four deltas (RetinaNet uses 1s; Faster R-CNN's second stage
            uses (10, 10, 5, 5)).

    Returns:
        (N, 4) deltas (dx, dy, dw, dh), in the dtype of ``boxes``.
    """
    check_same_device("encode_boxes", [boxes, anchors])
    _check_float("encode_boxes", "boxes", boxes)
    xp = get_array_module(boxes, anchors)
    anchors = anchors.astype(boxes.dtype, copy=False)
    wx, wy, ww, wh = weights

    anchor_cx, anchor_cy, anchor_w, anchor_h = _centres_and_sizes(anchors)
    box_cx, box_cy, box_w, box_h = _centres_and_sizes(boxes)

    dx = wx * (box_cx - anchor_cx) / anchor_w
    dy = wy * (box_cy - anchor_cy) / anchor_h
    dw = ww * xp.log(box_w / anchor_w)
    dh = wh * xp.log(box_h / anchor_h)
    return xp.stack([dx, dy, dw, dh], axis=1)        # (N, 4)


def decode_boxes(deltas, anchors, weights=(1.0, 1.0, 1.0, 1.0), clamp=DEFAULT_DECODE_CLAMP):
    """The boxes that ``deltas`` describe relative to ``anchors``: the inverse of ``encode_boxes``.

    ::

        cx = dx / wx * aw + acx           w = exp(min(dw / ww, clamp)) * aw
        cy = dy / wy * ah + acy           h = exp(min(dh / wh, clamp)) * ah
        box = (cx - 0.5 w, cy - 0.5 h, cx + 0.5 w, cy + 0.5 h)

    This is torchvision's ``BoxCoder.decode_single``, operation for operation.

    Args:
        deltas: (N, 4) float32 or float64, (dx, dy, dw, dh) as ``encode_boxes`` makes them.
        anchors: (N, 4), converted to the dtype of ``deltas``.
        weights: the weights the deltas were encoded with.
        clamp: the largest dw / ww and dh / wh that are exponentiated (see ``DEFAULT_DECODE_CLAMP``); it
            bounds how much larger than its anchor a box can become, and keeps ``exp`` finite.

    Returns:
        (N, 4) boxes (x1, y1, x2, y2), in the dtype of ``deltas``.
    """
    check_same_device("decode_boxes", [deltas, anchors])
    _check_float("decode_boxes", "deltas", deltas)
    xp = get_array_module(deltas, anchors)
    anchors = anchors.astype(deltas.dtype, copy=False)
    wx, wy, ww, wh = weights

    anchor_cx, anchor_cy, anchor_w, anchor_h = _centres_and_sizes(anchors)
    dx = deltas[:, 0] / wx                           # (N,)
    dy = deltas[:, 1] / wy
    dw = xp.minimum(deltas[:, 2] / ww, clamp)
    dh = xp.minimum(deltas[:, 3] / wh, clamp)

    cx = dx * anchor_w + anchor_cx
    cy = dy * anchor_h + anchor_cy
    half_w = 0.5 * (xp.exp(dw) * anchor_w)
    half_h = 0.5 * (xp.exp(dh) * anchor_h)
    return xp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)   # (N, 4)


def clip_boxes(boxes, size):
    """Clip boxes to the image: x into [0, W], y into [0, H].

    Args:
        boxes: (N, 4) as (x1, y1, x2, y2).
        size: (H, W), the image's height and width (PyTorch's order).

    Returns:
        (N, 4) clipped boxes, a new array in the dtype of ``boxes``. A box wholly outside the image becomes a
        zero-width or zero-height box on the border.
    """
    xp = get_array_module(boxes)
    height, width = size
    upper = xp.asarray([width, height, width, height], dtype=boxes.dtype)   # (4,): the bound of each coordinate
    return xp.minimum(xp.maximum(boxes, 0), upper)                          # (N, 4) against (4,)


def check_boxes(boxes, image_index=None):
    """Raise ``ValueError`` unless ``boxes`` are usable ground-truth boxes; return None if they are.

    Usable means: shape (N, 4), a numeric (integer or floating) dtype, every value finite, and every box with
    x2 > x1 and y2 > y1. A zero-width box has IoU 0 with every anchor and an infinite log-ratio when encoded, so
    one bad annotation would put nan into the loss; it is better to stop with a message that says which box it is.

    Args:
        boxes: (N, 4) array (or anything ``asarray`` accepts) as (x1, y1, x2, y2).
        image_index: which image the boxes belong to, named in the message when given.

    The message names the image, the first bad box's index and values, the number of bad boxes, and what to do.
    """
    xp = get_array_module(boxes)
    boxes = xp.asarray(boxes)
    where = f"check_boxes: image {image_index}" if image_index is not None else "check_boxes"
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must have shape (N, 4), one row (x1, y1, x2, y2) per box; "
                         f"got shape {tuple(boxes.shape)}")
    if boxes.dtype.kind not in "iuf":
        raise ValueError(f"{where}: boxes must hold numbers (an integer or floating dtype), got dtype {boxes.dtype}")

    finite = xp.isfinite(boxes).all(axis=1)                                      # (N,)
    positive_size = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])    # (N,), False for nan too
    bad = xp.flatnonzero(~(finite & positive_size))
    if bad.size == 0:
        return
    index = int(bad[0])
    x1, y1, x2, y2 = to_numpy(boxes[index]).tolist()
    if not bool(finite[index]):
        problem = "has a value that is not finite"
    elif x2 <= x1:
        problem = f"has x2 <= x1 (width {x2 - x1:g})"
    else:
        problem = f"has y2 <= y1 (height {y2 - y1:g})"
    others = f" ({bad.size} of the {boxes.shape[0]} boxes are bad)" if bad.size > 1 else ""
    raise ValueError(f"{where}, box {index}: ({x1:g}, {y1:g}, {x2:g}, {y2:g}) {problem}{others}. Boxes are "
                     "(x1, y1, x2, y2) in pixels with x2 > x1 and y2 > y1: remove or fix this annotation")


def nms(boxes, scores, iou_threshold):
    """Non-maximum suppression: of several boxes around one object, keep the highest-scoring one.

    Greedy, as in torchvision.ops.nms: take the remaining box with the highest score and keep it; drop every
    remaining box whose IoU with it is greater than ``iou_threshold`` (a box at exactly the threshold stays);
    repeat until no box remains. Equal scores keep their input order (a stable sort), so the result is
    deterministic.

    Args:
        boxes: (N, 4) as (x1, y1, x2, y2).
        scores: (N,) the score of each box.
        iou_threshold: boxes that overlap a kept box by more than this are dropped.

    Returns:
        (K,) int64 indices into ``boxes`` of the kept boxes, highest score first. Empty input gives an empty
        array.

    Each step is one vectorised IoU of the kept box with all the remaining ones, so the Python loop runs once
    per kept box, and the work is O(N K).
    """
    check_same_device("nms", [boxes, scores])
    xp = get_array_module(boxes, scores)
    _check_nms_inputs("nms", boxes, scores=scores)
    # Indices from the highest score to the lowest; negating the scores gives a descending sort that stays stable.
    remaining = xp.argsort(-scores, kind="stable")                                  # (N,)
    keep = []
    while remaining.size > 0:
        best = int(remaining[0])
        keep.append(best)
        rest = remaining[1:]
        iou_with_best = box_iou(boxes[best:best + 1], boxes[rest])[0]             # (len(rest),)
        remaining = rest[iou_with_best <= iou_threshold]
    return xp.asarray(keep, dtype=xp.int64)


def batched_nms(boxes, scores, labels, iou_threshold):
    """Class-wise NMS: ``nms`` within each label, so boxes of different classes never suppress each other.

    A cat and a dog that overlap are both kept; two overlapping cats are not. Same result as
    torchvision.ops.batched_nms.

    Args:
        boxes: (N, 4) as (x1, y1, x2, y2).
        scores: (N,).
        labels: (N,) integer class of each box.
        iou_threshold: as in ``nms``.

    Returns:
        (K,) int64 indices into ``boxes`` of the kept boxes of all classes, highest score first; equal scores
        in increasing index order.
    """
    check_same_device("batched_nms", [boxes, scores, labels])
    xp = get_array_module(boxes, scores, labels)
    _check_nms_inputs("batched_nms", boxes, scores=scores, labels=labels)
    kept = [xp.zeros(0, dtype=xp.int64)]   # so that concatenate has something to join when there are no boxes
    for label in xp.unique(labels):
        of_this_class = xp.flatnonzero(labels == label)                             # (n,) indices into boxes
        kept.append(of_this_class[nms(boxes[of_this_class], scores[of_this_class], iou_threshold)])
    # Merge the classes: by decreasing score, equal scores by increasing index (sorting the indices first and
    # then sorting stably by score gives that).
    keep = xp.sort(xp.concatenate(kept))
    return keep[xp.argsort(-scores[keep], kind="stable")]


def _check_float(op_name, name, array):
    # Integer boxes would make the anchors integers too (they are converted to the same dtype) and truncate them.
    if array.dtype.kind != "f":
        raise TypeError(f"{op_name}: {name} must be float32 or float64, got {array.dtype}; "
                        f"convert it first, e.g. {name}.astype('float32')")


def _check_nms_inputs(op_name, boxes, **per_box):
    """Raise ValueError unless ``boxes`` is (N, 4) and each array in ``per_box`` is (N,)."""
    if boxes.ndim == 2 and boxes.shape[1] == 4 and all(tuple(a.shape) == (boxes.shape[0],) for a in per_box.values()):
        return
    given = ", ".join(f"{name} {tuple(a.shape)}" for name, a in per_box.items())
    raise ValueError(f"{op_name}: boxes must have shape (N, 4) and {' and '.join(per_box)} shape (N,); "
                     f"got boxes {tuple(boxes.shape)}, {given}")
