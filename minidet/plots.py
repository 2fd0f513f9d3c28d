"""Pictures of training, evaluation and detection, drawn with matplotlib and saved as PNG files.

- ``plot_losses``: the loss curves of a run (the rows of its ``metrics.jsonl``) and its learning rate.
- ``draw_detections``: one image with its detected boxes (and, if given, its ground truth) on a matplotlib Axes;
  ``plot_detection_grid`` draws several in a grid, ``save_detections`` one at its own size in pixels.
- ``plot_precision_recall``: per-class precision-recall curves at IoU 0.5 and 0.75 from pycocotools' array.

Every function builds a ``matplotlib.figure.Figure`` itself and never imports ``pyplot``: pyplot keeps global
state (the current figure, the backend) that a library should not change under its user, and a bare ``Figure``
saves to PNG with matplotlib's Agg renderer whatever backend is active, so this works on a machine without a display.

Coordinates: boxes are ``(x1, y1, x2, y2)`` in pixel-edge coordinates, where pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``. Images are shown with ``extent=(0, W, H, 0)`` so the drawn pixels and boxes
line up exactly (matplotlib's default puts pixel centres at whole numbers, half a pixel off).
"""

import math
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from minidet import backend
from minidet.data.transforms import resize

# pycocotools' IoU thresholds 0.50, 0.55, ..., 0.95: the first axis of its precision array.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


# --- helpers --------------------------------------------------------------------------------------------------------
def _save(fig, path, dpi):
    """Write ``fig`` to ``path`` as PNG (creating the parent folder if missing) and return the path as a str."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def class_colour(label, num_classes):
    """The colour of class ``label`` (0..K-1) as an RGBA tuple, the same in every picture of K classes.

    A qualitative colormap, whose neighbouring colours are easy to tell apart: ``tab10`` for up to 10 classes,
    ``tab20`` for more (its colours repeat after 20, so with more classes read the labels, not the colours).
    """
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return cmap(int(label) % cmap.N)


def _text_colour(rgba):
    """Black or white, whichever reads better on a background of colour ``rgba`` (by its perceived brightness)."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "white"


def _moving_average(values, window):
    """The trailing mean of the last ``window`` values at each position: (T,) -> (T,) float64.

    The first ``window - 1`` positions average the values seen so far, so the curve starts at the first point
    instead of ``window`` points in.
    """
    values = np.asarray(values, dtype=np.float64)
    sums = np.concatenate([[0.0], np.cumsum(values)])                         # (T + 1,) sums[i] = values[:i].sum()
    ends = np.arange(1, len(values) + 1)                                      # (T,)
    starts = np.maximum(ends - window, 0)                                     # (T,)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _image_hwc(image):
    """A (3, H, W) image in [0, 1] (NumPy or CuPy) -> (H, W, 3) NumPy float32, clipped to [0, 1] for imshow."""
    image = backend.to_numpy(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {image.shape}; "
                         "an (H, W, 3) image needs image.transpose(2, 0, 1) first")
    # Normalised images (ImageNet mean and std removed) fall outside [0, 1]; clip so imshow does not warn.
    return np.clip(image.transpose(1, 2, 0).astype(np.float32), 0, 1)


def _detection_arrays(name, target, with_scores):
    """Check a detections or targets dict; return its arrays in NumPy: boxes (D, 4), labels (D,), scores (D,)
    (all ones for targets, which have no scores)."""
    keys = ("boxes", "labels", "scores") if with_scores else ("boxes", "labels")
    missing = [key for key in keys if key not in target]
    if missing:
        raise ValueError(f"{name} has no {missing}: expected a dict with keys {list(keys)}")
    boxes = backend.to_numpy(target["boxes"]).reshape(-1, 4).astype(np.float64)
    labels = backend.to_numpy(target["labels"]).reshape(-1).astype(np.int64)
    scores = (backend.to_numpy(target["scores"]).reshape(-1).astype(np.float64) if with_scores
              else np.ones(len(boxes)))
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{name}: {len(boxes)} boxes, {len(labels)} labels"
                         + (f" and {len(scores)} scores" if with_scores else "") + "; they must be as many")
    return boxes, labels, scores


# --- training -------------------------------------------------------------------------------------------------------
def plot_losses(rows, path, smooth=20):
    """Draw the loss curves of a training run and save them as a PNG.

    Top panel: the total loss, the classification (focal) loss and the box regression loss against the step;
    each raw value as a faint line and its moving average over ``smooth`` rows as a solid line. The y axis is
    logarithmic when every value is positive: the losses fall by large factors, and on a log scale the late,
    slow progress stays visible. Bottom panel: the learning rate (log scale too, so the warm-up and each
    x0.1 step read as equal steps).

    Args:
        rows: the rows of ``metrics.jsonl`` (``TrainResult.metrics``), dicts with at least ``step``, ``lr``,
            ``loss``, ``classification`` and ``box_regression``; one row or more.
        path: where to write the PNG.
        smooth: the window of the moving average, in rows (with ``log_every`` > 1 a row is several steps).

    Returns:
        the path written, a str.

    Raises:
        ValueError: no rows, a row without one of the keys, or ``smooth`` not a whole number >= 1.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("plot_losses: no rows to plot; train for at least one step (metrics.jsonl is empty)")
    if int(smooth) != smooth or smooth < 1:
        raise ValueError(f"plot_losses: smooth must be a whole number of rows, 1 or more, got {smooth!r}")
    needed = ("step", "lr", "loss", "classification", "box_regression")
    for i, row in enumerate(rows):
        missing = [key for key in needed if key not in row]
        if missing:
            raise ValueError(f"plot_losses: row {i} has no {missing}; pass the rows of metrics.jsonl as train "
                             f"writes them (keys {list(needed)})")
    steps = np.array([row["step"] for row in rows])                                    # (T,)
    curves = [("total loss", "loss", "black"), ("classification", "classification", "tab:blue"),
              ("box regression", "box_regression", "tab:orange")]
    values = {key: np.array([row[key] for row in rows], dtype=np.float64) for _, key, _ in curves}
    lr = np.array([row["lr"] for row in rows], dtype=np.float64)                       # (T,)
    window = min(int(smooth), len(rows))
    # A line through one point draws nothing; a marker does.
    marker = "o" if len(rows) == 1 else None

    fig = Figure(figsize=(7, 5), layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for label, key, colour in curves:
        averaged = _moving_average(values[key], window)
        loss_ax.plot(steps, values[key], color=colour, alpha=0.25, linewidth=0.8, marker=marker)
        loss_ax.plot(steps, averaged, color=colour, linewidth=1.8, marker=marker,
                     label=f"{label} (last {averaged[-1]:.3g})")
    if all((v > 0).all() for v in values.values()):
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(f"training losses: faint raw, solid mean of the last {window} row{'s' if window != 1 else ''}")
    loss_ax.grid(True, which="both", alpha=0.3)
    loss_ax.legend(loc="upper right", fontsize="small")

    lr_ax.plot(steps, lr, color="tab:green", marker=marker)
    if (lr > 0).all():
        lr_ax.set_yscale("log")
    lr_ax.set_xlabel("step")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))            # no step 0.96 when there are few steps
    lr_ax.set_ylabel("learning rate")
    lr_ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path, dpi=120)


# --- detections -----------------------------------------------------------------------------------------------------
def draw_detections(ax, image, detections, class_names, score_thresh=0.3, targets=None):
    """Draw one image with its detections (and optionally its ground truth) on a matplotlib Axes.

    Each detection scoring at least ``score_thresh`` is drawn as a box in its class's colour with a label
    "name 0.93" on top; the best detections are drawn last, so they lie on top of weaker overlapping ones. Each
    ground-truth box, if ``targets`` is given, is a dashed line of alternating white and black dashes, which reads
    on light and dark backgrounds alike.

    Args:
        ax: a matplotlib Axes; its axis lines are turned off and its limits set to the image.
        image: (3, H, W) float in [0, 1] (values outside are clipped), NumPy or CuPy.
        detections: {"boxes": (D, 4) x1y1x2y2 pixels, "scores": (D,), "labels": (D,) int in 0..K-1}, as one entry
            of ``RetinaNet.predict``'s list.
        class_names: the K class names, indexed by label.
        score_thresh: detections scoring below this are not drawn.
        targets: None, or {"boxes": (G, 4), "labels": (G,)} the ground truth.

    Returns:
        the number of detections drawn.

    Raises:
        ValueError: an image that is not (3, H, W), a dict without its keys or with arrays of different lengths,
            or a label with no name in ``class_names``.
    """
    pixels = _image_hwc(image)                                                   # (H, W, 3)
    height, width = pixels.shape[:2]
    num_classes = len(class_names)
    boxes, labels, scores = _detection_arrays("detections", detections, with_scores=True)
    true_boxes, true_labels, _ = (_detection_arrays("targets", targets, with_scores=False) if targets is not None
                                  else (np.zeros((0, 4)), np.zeros(0, np.int64), None))
    for name, found in (("detections", labels), ("targets", true_labels)):
        outside = found[(found < 0) | (found >= num_classes)]
        if len(outside):
            raise ValueError(f"draw_detections: {name} hold label {outside[0]} but there are {num_classes} class "
                             "names; pass the names of all the model's classes, in label order")

    ax.imshow(pixels, extent=(0, width, height, 0), interpolation="nearest")
    for x1, y1, x2, y2 in true_boxes:
        # A black line under a white dashed one: white and black dashes in turn.
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="black", linewidth=2.0))
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=2.0,
                               linestyle=(0, (3, 3))))

    shown = np.flatnonzero(scores >= score_thresh)
    shown = shown[np.argsort(scores[shown], kind="stable")]                      # lowest first, best on top
    for i in shown:
        x1, y1, x2, y2 = boxes[i]
        colour = class_colour(labels[i], num_classes)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.8))
        # The label sits just above the box; for a box at (or near) the top edge it goes inside, so it stays visible.
        above = y1 >= 0.06 * height
        ax.text(x1, y1 if above else y1 + 1, f"{class_names[labels[i]]} {scores[i]:.2f}",
                va="bottom" if above else "top", ha="left", fontsize=7, color=_text_colour(colour),
                bbox=dict(facecolor=colour, edgecolor="none", alpha=0.85, pad=1.0), clip_on=True)
    # Boxes may reach past the image; keep the view on the image itself.
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    return len(shown)


def _class_legend(class_names, with_targets):
    """Legend handles: one coloured patch per class, and the ground truth's dashed line if it is drawn."""
    handles = [Patch(facecolor="none", edgecolor=class_colour(k, len(class_names)), linewidth=1.8, label=name)
               for k, name in enumerate(class_names)]
    if with_targets:
        handles.append(Line2D([], [], color="black", linestyle=(0, (3, 3)), label="ground truth"))
    return handles


def plot_detection_grid(images, detections, class_names, path, targets=None, score_thresh=0.3, columns=4):
    """Draw several images with their detections (and ground truth, if given) in a grid, and save it as a PNG.

    Args:
        images: N images, a sequence of (3, H, W) arrays or an (N, 3, H, W) array, floats in [0, 1]; their sizes
            may differ.
        detections: N dicts {"boxes": (D, 4), "scores": (D,), "labels": (D,)}, ``RetinaNet.predict``'s list.
        class_names: the K class names.
        path: where to write the PNG.
        targets: None, or N dicts {"boxes": (G, 4), "labels": (G,)} the ground truth.
        score_thresh: detections scoring below this are not drawn.
        columns: images per row of the grid (fewer when there are fewer images).

    Returns:
        the path written, a str.

    Raises:
        ValueError: no images, or not one detections dict (and targets dict) per image.
    """
    images, detections = list(images), list(detections)
    if not images:
        raise ValueError("plot_detection_grid: no images to draw; pass at least one")
    if len(detections) != len(images) or (targets is not None and len(targets) != len(images)):
        counts = f"{len(images)} images, {len(detections)} detections"
        counts += "" if targets is None else f" and {len(targets)} targets"
        raise ValueError(f"plot_detection_grid: {counts}; pass one of each per image")
    if int(columns) != columns or columns < 1:
        raise ValueError(f"plot_detection_grid: columns must be a whole number, 1 or more, got {columns!r}")
    columns = min(int(columns), len(images))
    rows = math.ceil(len(images) / columns)

    fig = Figure(figsize=(3 * columns, 3 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()                   # (rows * columns,)
    for i, ax in enumerate(axes):
        if i >= len(images):
            ax.set_axis_off()                                      # the empty cells of a last, shorter row
            continue
        target = None if targets is None else targets[i]
        drawn = draw_detections(ax, images[i], detections[i], class_names, score_thresh, target)
        title = f"image {i}: {drawn} detection{'s' if drawn != 1 else ''}"
        if target is not None:
            num_objects = len(backend.to_numpy(target["boxes"]).reshape(-1, 4))
            title += f", {num_objects} object{'s' if num_objects != 1 else ''}"
        ax.set_title(title, fontsize=9)
    fig.legend(handles=_class_legend(class_names, targets is not None), loc="outside lower center",
               ncols=min(len(class_names) + (targets is not None), 6), fontsize="small", frameon=False)
    fig.suptitle(f"detections scoring {score_thresh:g} or more")
    return _save(fig, path, dpi=100)


# A picture this many pixels on its longer side is drawn in under a second; a 4000 x 3000 photo drawn at its own
# size took 15 s.
MAX_PICTURE_SIDE = 1024


def save_detections(image, detections, class_names, path, score_thresh=0.3, max_side=MAX_PICTURE_SIDE):
    """Save one image with its detections as a PNG of the image's own size: W x H pixels for a (3, H, W) image,
    or, for an image longer than ``max_side``, the image shrunk (and its boxes with it) to ``max_side`` on its
    longer side.

    The image fills the whole picture (no margins, no title), one pixel of the PNG per pixel of the image, so
    the boxes can be compared with the image's pixels (what ``minidet detect`` writes).

    Args:
        image: (3, H, W) float in [0, 1].
        detections: {"boxes": (D, 4), "scores": (D,), "labels": (D,)}.
        class_names: the K class names.
        path: where to write the PNG.
        score_thresh: detections scoring below this are not drawn.
        max_side: the longest side of the picture, in pixels.

    Returns:
        the path written, a str.
    """
    image = backend.to_numpy(image)
    height, width = image.shape[-2:]
    if max(height, width) > max_side:
        image, boxes, _ = resize(image, backend.to_numpy(detections["boxes"]), None, max_side)
        detections = {**detections, "boxes": boxes}
        height, width = image.shape[-2:]
    dpi = 100
    # A figure of W/dpi x H/dpi inches saved at dpi dots per inch is W x H pixels. No layout engine and no
    # bbox_inches="tight": either would change the size.
    fig = Figure(figsize=(width / dpi, height / dpi))
    ax = fig.add_axes((0, 0, 1, 1))
    draw_detections(ax, image, detections, class_names, score_thresh)
    return _save(fig, path, dpi=dpi)


# --- evaluation -----------------------------------------------------------------------------------------------------
def plot_precision_recall(precision, recall_points, class_names, path):
    """Draw each class's precision-recall curve at IoU 0.5 and at IoU 0.75 (two panels) and save them as a PNG.

    A class's AP at an IoU threshold is the mean of its precision at the 101 recall points (COCO's definition);
    the legend gives each class's AP, the title their mean (mAP) over the classes that have ground truth.
    Classes with no ground truth, where pycocotools writes -1, are skipped and named in the legend.

    Args:
        precision: pycocotools' precision for one area range and one detection limit, (10, R, K): IoU
            thresholds 0.50, 0.55, ..., 0.95, R recall points, K classes; -1 where undefined. From a
            ``COCOeval`` after ``accumulate()``: ``coco_eval.eval["precision"][:, :, :, 0, -1]`` (area "all",
            at most 100 detections).
        recall_points: (R,) the recall at each point, ``coco_eval.params.recThrs`` (0, 0.01, ..., 1: R = 101).
        class_names: the K class names.
        path: where to write the PNG.

    Returns:
        the path written, a str.

    Raises:
        ValueError: ``precision`` is not (10, R, K) for R recall points and K class names (with a hint for
            pycocotools' whole 5-D array), or a class is -1 at some recall points only.
    """
    precision = np.asarray(backend.to_numpy(precision), dtype=np.float64)
    recall_points = np.asarray(backend.to_numpy(recall_points), dtype=np.float64).reshape(-1)
    num_classes = len(class_names)
    if precision.ndim == 5:
        raise ValueError(f"plot_precision_recall: precision has shape {precision.shape}, pycocotools' whole "
                         "(T, R, K, areas, max detections) array; pass precision[:, :, :, 0, -1] (area 'all', "
                         "the largest detection limit)")
    expected = (len(COCO_IOU_THRESHOLDS), len(recall_points), num_classes)
    if precision.shape != expected:
        raise ValueError(f"plot_precision_recall: precision has shape {precision.shape}, expected {expected}: "
                         f"{len(COCO_IOU_THRESHOLDS)} IoU thresholds, one row per recall point "
                         f"({len(recall_points)} given) and one column per class ({num_classes} names)")
    undefined = precision == -1                                                  # (10, R, K)
    # pycocotools writes -1 for a whole class or not at all; a partial -1 means the array was sliced wrongly.
    partial = undefined.any(axis=1) & ~undefined.all(axis=1)                     # (10, K)
    if partial.any():
        t, k = np.argwhere(partial)[0]
        raise ValueError(f"plot_precision_recall: class {class_names[k]!r} at IoU {COCO_IOU_THRESHOLDS[t]:.2f} "
                         "has -1 at some recall points but not all; pycocotools writes -1 for whole classes only. "
                         "Is precision pycocotools' eval['precision'][:, :, :, 0, -1]?")

    fig = Figure(figsize=(10, 5.2), layout="constrained")
    for ax, iou in zip(fig.subplots(1, 2, sharey=True), (0.5, 0.75)):
        t = int(np.argmin(np.abs(COCO_IOU_THRESHOLDS - iou)))
        aps = []
        for k, name in enumerate(class_names):
            if undefined[t, 0, k]:
                # An invisible line, only to name the skipped class in the legend.
                ax.plot([], [], linestyle="none", label=f"{name}: no ground truth, skipped")
                continue
            ap = precision[t, :, k].mean()
            aps.append(ap)
            ax.plot(recall_points, precision[t, :, k], color=class_colour(k, num_classes), linewidth=1.6,
                    label=f"{name}: AP {ap:.3f}")
        summary = (f"mAP {np.mean(aps):.3f} over {len(aps)} of {num_classes} classes" if aps
                   else "no class has ground truth")
        ax.set_title(f"IoU {iou:.2f}: {summary}", fontsize=10)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall")
        ax.grid(True, alpha=0.3)
        # Upper right: where precision-recall curves, which fall as recall grows, leave room.
        ax.legend(loc="upper right", ncols=1 if num_classes <= 8 else 2, fontsize="small", framealpha=0.85)
    fig.axes[0].set_ylabel("precision (interpolated)")
    fig.suptitle("precision-recall per class (COCO: 101 recall points)")
    return _save(fig, path, dpi=100)


__all__ = ["plot_losses", "draw_detections", "plot_detection_grid", "save_detections", "plot_precision_recall",
           "class_colour", "COCO_IOU_THRESHOLDS"]
