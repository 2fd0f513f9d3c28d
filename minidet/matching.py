"""IoU matching: which ground-truth box, if any, each anchor is responsible for.

RetinaNet labels every anchor from its best IoU with the image's ground-truth boxes:

- IoU >= 0.5: **positive**, matched to that box (it learns the box's class and regresses to the box);
- IoU < 0.4: **background** (it learns "no object" for every class);
- in between: **ignored** (no loss at all: too close to call).

With ``allow_low_quality_matches`` (torchvision's preset, after Faster R-CNN's RPN), every box also gets its
best anchors even when their IoU is below 0.5, so no box that some anchor overlaps goes without a positive anchor.

This module is the NumPy reference for the CUDA matching kernel (kernels/iou_match.cu): the kernel gives the same
outputs, bit for bit, and both functions below use it when their inputs are CuPy arrays. Neither ever builds the
full (A, G) IoU matrix: here anchors are processed in chunks, so memory stays proportional to the chunk, not to
A * G; in the kernel each thread keeps one anchor's best box as it loops over the boxes.
"""

from minidet import cuda
from minidet.backend import check_same_device, get_array_module, is_cupy_array
from minidet.boxes import box_iou
from minidet.functional.loss import BACKGROUND, IGNORED

# The codes in ``matches`` of anchors without a box, the same values as torchvision's Matcher: BACKGROUND (-1) when
# the best IoU < low, a negative example; IGNORED (-2) when low <= best IoU < high, no loss. They are the focal
# loss's label codes (defined there), so the matches serve as its labels as they are.

# Anchors per chunk. A chunk's IoU arithmetic needs about 45 bytes per (anchor, box) pair in float32 at its peak
# (see match_anchors), so 4096 anchors against 100 boxes use about 18 MB; 120,000 anchors make 30 chunks. Chunks
# of this size are also faster on a CPU than one big matrix, which does not fit in the caches.
DEFAULT_CHUNK_SIZE = 4096


def match_anchors(anchors, boxes, high=0.5, low=0.4, allow_low_quality_matches=False,
                  chunk_size=DEFAULT_CHUNK_SIZE, *, match_zero_iou=False):
    """Match each anchor to its best ground-truth box, or mark it background or ignored.

    Same results as torchvision's ``Matcher(high, low, allow_low_quality_matches)`` applied to
    ``box_iou(boxes, anchors)``, without building that matrix.

    Rules, for an anchor whose best IoU over the boxes is ``iou`` and ``box`` the box that gives it:

    - ``iou >= high``: ``matches = box``; ``low <= iou < high``: ``IGNORED``; ``iou < low``: ``BACKGROUND``.
      The thresholds are rounded to the dtype of the IoUs before comparing, as PyTorch does (for float32
      anchors, an IoU of float32(0.4) counts as 0.4).
    - Ties: when several boxes give the same best IoU, ``box`` is the one with the lowest index (as
      ``numpy.argmax`` and ``torch.max`` on the CPU do).
    - Low-quality matches (if allowed): for each box, find its best IoU over all anchors. Every anchor whose IoU
      with that box equals that value, ties included, becomes positive, matched to **its own** best box
      ``box`` (usually the same box; torchvision's ``set_low_quality_matches_`` does exactly this). A box that
      overlaps no anchor at all (its best IoU is 0) promotes nothing: no anchor says anything about it. With
      ``match_zero_iou`` it is treated like any other box, as torchvision does: because ties count, it then
      promotes every anchor that does not overlap it either (thousands), each to its own best box.
    - No boxes: every anchor is ``BACKGROUND`` with IoU 0.

    Args:
        anchors: (A, 4) float32 or float64 as (x1, y1, x2, y2).
        boxes: (G, 4) ground-truth boxes of one image; converted to the dtype of ``anchors``.
        high: the IoU from which an anchor is positive (0.5 in RetinaNet).
        low: the IoU below which an anchor is background (0.4); ``low <= high``.
        allow_low_quality_matches: also make each box's best anchors positive (see above).
        chunk_size: how many anchors get their IoUs computed at once.
        match_zero_iou: with low-quality matches, also promote the "best" anchors of a box no anchor overlaps
            (torchvision's rule, for the torchvision preset's exact parity; see above).

    Returns:
        matches: (A,) int64, the index of the matched box in ``boxes``, or ``BACKGROUND`` (-1) or ``IGNORED`` (-2).
        ious: (A,) each anchor's best IoU over the boxes, in the dtype of ``anchors`` (0 when there are no boxes).

    Memory: the outputs and a few (A,) arrays, plus one chunk's IoUs and their temporaries: about 45 bytes per
    (anchor, box) pair of the chunk in float32 at the peak (measured with tracemalloc), so about
    45 * chunk_size * G bytes, whatever A is.

    Low-quality matches need each box's best IoU over *all* anchors before any anchor can be promoted, so they
    take a second pass over the chunks that recomputes the IoUs with the same function and compares them with
    ``==``. That is exact: the same arithmetic on the same inputs gives the same bits, whatever the chunk size.

    CuPy arrays go to the CUDA kernel (``minidet.cuda.match_anchors_batch``), which gives the same results and
    needs no chunks (``chunk_size`` is then only checked).
    """
    check_same_device("match_anchors", [anchors, boxes])
    _check_options("match_anchors", anchors, high, low, chunk_size)
    xp = get_array_module(anchors, boxes)
    dtype = anchors.dtype
    num_anchors, num_boxes = anchors.shape[0], boxes.shape[0]
    if num_boxes == 0:
        return xp.full(num_anchors, BACKGROUND, dtype=xp.int64), xp.zeros(num_anchors, dtype=dtype)
    boxes = boxes.astype(dtype, copy=False)
    if is_cupy_array(anchors):   # the CUDA kernel, for a batch of one image
        counts = xp.full(1, num_boxes, dtype=xp.int32)
        matches, ious = cuda.match_anchors_batch(anchors, boxes[None], counts, high, low, allow_low_quality_matches,
                                                 match_zero_iou=match_zero_iou)
        return matches[0], ious[0]
    high, low = dtype.type(high), dtype.type(low)   # compare in the IoUs' dtype, as PyTorch does

    # Pass 1: each anchor's best box, and each box's best IoU over all anchors.
    best_iou = xp.empty(num_anchors, dtype=dtype)              # (A,)
    best_box = xp.empty(num_anchors, dtype=xp.int64)           # (A,)
    best_iou_of_box = xp.zeros(num_boxes, dtype=dtype)         # (G,) IoUs are >= 0, so 0 is where a max starts
    for rows, iou in _iou_chunks(anchors, boxes, chunk_size):  # iou: (C, G) for the C anchors in rows
        best_box[rows] = iou.argmax(axis=1)                    # (C,) the first maximum: the lowest box index
        best_iou[rows] = iou.max(axis=1)                       # (C,)
        best_iou_of_box = xp.maximum(best_iou_of_box, iou.max(axis=0))   # (G,)

    matches = best_box.copy()
    matches[best_iou < low] = BACKGROUND
    matches[(best_iou >= low) & (best_iou < high)] = IGNORED

    if allow_low_quality_matches:
        # Pass 2: promote every anchor that is (one of) some box's best, to its own best box. A box whose best IoU
        # is 0 gets NaN as its best unless match_zero_iou: no IoU equals NaN, so it promotes nothing.
        if not match_zero_iou:
            best_iou_of_box = xp.where(best_iou_of_box > 0, best_iou_of_box, dtype.type(xp.nan))    # (G,)
        for rows, iou in _iou_chunks(anchors, boxes, chunk_size):
            is_best_of_a_box = (iou == best_iou_of_box[None, :]).any(axis=1)   # (C, G) -> (C,)
            chunk_matches = matches[rows]                      # a view: writing to it writes to matches
            chunk_matches[is_best_of_a_box] = best_box[rows][is_best_of_a_box]
    return matches, best_iou


def _iou_chunks(anchors, boxes, chunk_size):
    """Yield ``(rows, box_iou(anchors[rows], boxes))`` for consecutive slices ``rows`` of ``chunk_size`` anchors.

    Both passes of ``match_anchors`` get their IoUs from here, so they compute them the same way.
    """
    for start in range(0, anchors.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        yield rows, box_iou(anchors[rows], boxes)


def match_anchors_batch(anchors, boxes, counts, high=0.5, low=0.4, allow_low_quality_matches=False,
                        chunk_size=DEFAULT_CHUNK_SIZE, *, match_zero_iou=False):
    """``match_anchors`` for a batch of images that share their anchors (the CUDA kernel's signature).

    Images have different numbers of boxes, so the boxes come padded to the largest number, with a count per
    image: the slots ``boxes[b, counts[b]:]`` are padding, never read, whatever they hold.

    Args:
        anchors: (A, 4) float32 or float64, the same for every image.
        boxes: (B, Gmax, 4) the boxes of each image, padded.
        counts: (B,) integers, how many of each image's Gmax slots are real boxes (0 <= counts[b] <= Gmax).
        high, low, allow_low_quality_matches, chunk_size, match_zero_iou: as in ``match_anchors``.

    Returns:
        matches: (B, A) int64, per image as ``match_anchors`` gives it.
        ious: (B, A) in the dtype of ``anchors``.

    CuPy arrays go to the CUDA kernel, all images at once; NumPy arrays to ``match_anchors``, one image at a time.
    """
    check_same_device("match_anchors_batch", [anchors, boxes, counts])
    xp = get_array_module(anchors, boxes, counts)
    num_images, max_boxes = boxes.shape[0], boxes.shape[1]
    if tuple(counts.shape) != (num_images,):
        raise ValueError(f"match_anchors_batch: counts must have shape (B,) = ({num_images},) for boxes of shape "
                         f"{tuple(boxes.shape)}, got {tuple(counts.shape)}")
    if not bool(((counts >= 0) & (counts <= max_boxes)).all()):
        raise ValueError(f"match_anchors_batch: every count must be between 0 and Gmax = {max_boxes} "
                         f"(the padded number of boxes), got {counts.tolist()}")
    _check_options("match_anchors_batch", anchors, high, low, chunk_size)
    if is_cupy_array(anchors):   # the CUDA kernel: every image in one launch (two with low-quality matches)
        return cuda.match_anchors_batch(anchors, boxes, counts, high, low, allow_low_quality_matches,
                                        match_zero_iou=match_zero_iou)
    matches = xp.empty((num_images, anchors.shape[0]), dtype=xp.int64)   # (B, A)
    ious = xp.empty((num_images, anchors.shape[0]), dtype=anchors.dtype)  # (B, A)
    for b in range(num_images):
        matches[b], ious[b] = match_anchors(anchors, boxes[b, :int(counts[b])], high, low,
                                            allow_low_quality_matches, chunk_size, match_zero_iou=match_zero_iou)
    return matches, ious


def _check_options(op_name, anchors, high, low, chunk_size):
    if not low <= high:
        raise ValueError(f"{op_name}: low ({low}) must not be greater than high ({high})")
    if chunk_size < 1:
        raise ValueError(f"{op_name}: chunk_size must be at least 1, got {chunk_size}")
    if anchors.dtype.kind != "f":
        raise TypeError(f"{op_name}: anchors must be float32 or float64, got {anchors.dtype}")
