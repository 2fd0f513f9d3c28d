"""Do the anchors fit the data? The numbers and pictures behind ``minidet inspect-anchors``.

An object teaches the detector only through its positive anchors: those with IoU >= 0.5 with its box. A box
whose best IoU with *every* anchor is below 0.5 gets none (with the paper preset): its anchors are only ever
shown as background, or ignored, and the detector never learns to find it. That happens when the box is too
small for the smallest anchors, larger than the largest, or too elongated for the 1:2, 1:1 and 2:1 shapes.

Since IoU <= smaller area / larger area, a box can reach 0.5 with some anchor only if its area is between half
the smallest anchor's area and twice the largest one's: with the paper's anchors, sizes sqrt(w * h) from
sqrt(32^2 / 2) = 22.6 to sqrt(2) * 812.7 = 1149 pixels (tutorials/06_anchors.py derives the lower bound).

    stats = anchor_statistics(dataset)            # each box's best IoU with the anchors RetinaNet uses for it
    print(stats.summary())                        # how many boxes can never be positive, and what to do
    plot_anchor_report(stats, "report.png")       # box sizes against anchor sizes; best IoUs against 0.5
    plot_matched_anchors(dataset, [0, 1], "matched.png")   # the positive anchors of each box, as training sees them

Shapes: B boxes in the whole dataset, G boxes in one image, M anchors of one image, L pyramid levels (5).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from minidet.anchors import DEFAULT_ASPECT_RATIOS, AnchorGenerator
from minidet.boxes import box_iou
from minidet.data.transforms import resize, resized_size, scale_boxes
from minidet.matching import match_anchors
from minidet.models.retinanet import BACKGROUND_IOU, POSITIVE_IOU, SIZE_DIVISOR
from minidet.models.retinanet import PRESETS as MODEL_PRESETS

__all__ = ["AnchorStats", "AnchorFit", "anchor_statistics", "fit_anchors", "plot_anchor_report",
           "plot_matched_anchors"]

# From this share of unmatchable boxes on, the summary suggests changes: a few boxes lost to odd shapes are
# normal, a twentieth of the data never trained on is not.
HIGH_SHARE = 0.05
# Anchors per IoU computation: box_iou's temporaries take about 45 bytes per (anchor, box) pair, so 4096 anchors
# against 100 boxes need about 18 MB, where all 150,000 anchors of an 800 x 1333 image would need 700 MB.
CHUNK_SIZE = 4096
# fit_anchors scores its choices on at most this many images, and picks the three aspect ratios from these sets.
FIT_MAX_IMAGES = 500
FIT_RATIO_SETS = ((0.5, 1.0, 2.0), (1 / 3, 1.0, 3.0), (0.25, 1.0, 4.0))
# One colour per pyramid level (P3 first), shared by both pictures.
LEVEL_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


@dataclass
class AnchorStats:
    """Each ground-truth box of a dataset against the anchors RetinaNet uses for its image.

    Fields:
        box_sizes: (B,) float32, each box's size sqrt(w * h) in pixels.
        best_iou: (B,) float32, each box's best IoU with any anchor of its image.
        best_level: (B,) int64, the level of that best anchor, 0 for the first (P3); ties go to the finer level.
        image_index: (B,) int64, the dataset index of each box's image (to pick images for
            ``plot_matched_anchors``).
        level_names: L names, "P3" ... "P7".
        anchor_sizes: L tuples, the anchor sizes of each level (every scale), as ``AnchorGenerator.scaled_sizes``.
        matchable_size_range: (smallest, largest) box size that can reach ``iou_threshold`` with some anchor:
            half the smallest anchor area and twice the largest, as sizes (a necessary condition, not enough).
        preset: the anchor preset, "paper" or "torchvision".
        low_quality_matches: whether the model's preset of that name also makes each box's best anchors positive.
        num_images: how many images were looked at.
        iou_threshold: the IoU from which an anchor is positive (0.5).
    """

    box_sizes: np.ndarray
    best_iou: np.ndarray
    best_level: np.ndarray
    image_index: np.ndarray
    level_names: tuple
    anchor_sizes: tuple
    matchable_size_range: tuple
    preset: str
    low_quality_matches: bool
    num_images: int
    iou_threshold: float = POSITIVE_IOU

    @property
    def num_boxes(self):
        """B, the number of ground-truth boxes."""
        return int(self.box_sizes.shape[0])

    @property
    def unmatchable(self):
        """(B,) bool: the boxes whose best IoU is below the threshold (no anchor reaches 0.5 with them)."""
        return self.best_iou < self.iou_threshold

    @property
    def share_unmatchable(self):
        """The share of boxes with no anchor at IoU >= 0.5, from 0 to 1; 0.0 when there are no boxes at all."""
        return float(self.unmatchable.mean()) if self.num_boxes else 0.0

    @property
    def level_counts(self):
        """(L,) int64: how many boxes have their best anchor on each level."""
        return np.bincount(self.best_level, minlength=len(self.level_names))

    def summary(self):
        """A few lines for a terminal: the boxes, the anchors, the share that cannot match, and what to do."""
        head = f"Anchors ({self.preset!r} preset) against the boxes of {self.num_images} images"
        if self.num_boxes == 0:
            return (f"{head}:\n  no ground-truth boxes at all, so there is nothing to match the anchors with.\n"
                    "  Check that the dataset has annotations (and that this is the split you meant).")
        images_with_boxes = len(np.unique(self.image_index))
        low, high = self.matchable_size_range
        anchors = ", ".join(f"{name} {min(sizes):.0f}-{max(sizes):.0f}"
                            for name, sizes in zip(self.level_names, self.anchor_sizes))
        levels = ", ".join(f"{name} {count}" for name, count in zip(self.level_names, self.level_counts))
        unmatchable = self.unmatchable
        lines = [
            f"{head}:",
            f"  boxes: {self.num_boxes} in {images_with_boxes} images; images without boxes: "
            f"{self.num_images - images_with_boxes}",
            f"  box sizes sqrt(w*h): {self.box_sizes.min():.1f} to {self.box_sizes.max():.1f} px, "
            f"median {np.median(self.box_sizes):.1f}",
            f"  anchor sizes: {anchors} px",
            f"  a box can reach IoU {self.iou_threshold} with some anchor only from {low:.1f} to {high:.0f} px",
            f"  boxes whose best anchor is on each level: {levels}",
            f"  best IoU of a box with any anchor: lowest {self.best_iou.min():.2f}, median "
            f"{np.median(self.best_iou):.2f}",
            f"  unmatchable (best IoU < {self.iou_threshold}): {int(unmatchable.sum())} of {self.num_boxes} boxes "
            f"({self.share_unmatchable:.1%})",
        ]
        if not unmatchable.any():
            return "\n".join(lines)
        untouched = int((self.best_iou == 0).sum())
        if untouched:
            lines.append(f"  of them, {untouched} overlap no anchor at all (best IoU 0): boxes far smaller than the "
                         "anchor grid, or outside the image")
        if self.low_quality_matches:
            lines.append("  the torchvision preset still makes each of them positive on its best anchors "
                         "(low-quality matches), at an IoU below 0.5" + (
                             "; a box that overlaps none promotes every anchor that misses it too, as torchvision "
                             "does" if untouched else ""))
        else:
            lines.append(f"  with the {self.preset!r} preset they get no positive anchor: training only ever "
                         "shows their anchors as background (or ignores them), so they are never detected")
        if self.share_unmatchable >= HIGH_SHARE:
            too_small = int((unmatchable & (self.box_sizes < low)).sum())
            too_large = int((unmatchable & (self.box_sizes > high)).sum())
            lines.append("  suggestions:")
            if too_small:
                lines.append(f"  - {too_small} are smaller than {low:.1f} px, where no anchor can reach IoU "
                             f"{self.iou_threshold}: resize the images larger (a larger min_size) or use smaller "
                             "anchors")
            if too_large:
                lines.append(f"  - {too_large} are larger than {high:.0f} px: resize the images smaller or use "
                             "larger anchors")
            others = int(unmatchable.sum()) - too_small - too_large
            if others:
                lines.append(f"  - {others} are of a size some anchor has but still miss: shapes far from "
                             "the anchors' aspect ratios (1:2, 1:1, 2:1), or sizes near the ends of the range, "
                             "where an anchor must sit almost exactly on the box")
            if not self.low_quality_matches:
                lines.append("  - or train with the torchvision preset: its low-quality matches give each box its "
                             "best anchors whatever their IoU")
        return "\n".join(lines)


def anchor_statistics(dataset, preset="paper", anchor_sizes=None, aspect_ratios=None, min_size=None, max_size=None,
                      size_divisor=SIZE_DIVISOR, max_images=None):
    """Each ground-truth box's best IoU with the anchors RetinaNet would use for its image.

    Each image is first resized as training resizes it (``min_size``, ``max_size``: see
    ``minidet.data.transforms.resize_factor``), its boxes with it, then padded to a multiple of ``size_divisor`` on
    its own (as ``collate`` pads a batch of one), and gets the anchors of the model for that size: the same
    ``AnchorGenerator``, on feature maps of ceil(H / stride) x ceil(W / stride), what the stride-2 convolutions of
    the backbone and the pyramid give.

    Args:
        dataset: a sequence of ``(image (3, H, W), {"boxes": (G, 4) x1y1x2y2 pixels, ...})``. A dataset with
            ``sizes`` and ``targets`` (as ``CocoDataset``) is read from those, without decoding its images.
        preset: the anchor preset, ``"paper"`` or ``"torchvision"``.
        anchor_sizes, aspect_ratios: the anchors, as ``RetinaNet`` takes them (None: the preset's).
        min_size, max_size: the resize of training (``TrainConfig``'s); None and None: the images as they are.
        size_divisor: images are padded to multiples of this (32, the stride of C5).
        max_images: look at only the first ``max_images`` images; None for all of them.

    Returns:
        ``AnchorStats`` with one entry per box (none for images without boxes).
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"anchor_statistics: max_images must be None or at least 0, got {max_images}")
    samples = _samples(dataset, min_size, max_size, size_divisor, max_images)
    return _statistics(samples, _generator(preset, anchor_sizes, aspect_ratios))


@dataclass
class AnchorFit:
    """What ``fit_anchors`` found: the anchors, and the boxes against the preset's anchors and against them.

    Fields:
        anchor_sizes: 5 base sizes, P3-P7, in pixels (``TrainConfig.anchor_sizes``).
        aspect_ratios: the shapes h / w (``TrainConfig.aspect_ratios``).
        before, after: ``AnchorStats`` of the preset's anchors and of the fitted ones.
    """

    anchor_sizes: list
    aspect_ratios: list
    before: AnchorStats
    after: AnchorStats

    def summary(self):
        """Two lines: the unmatchable share before and after, and the settings that give it."""
        sizes = ",".join(f"{s:g}" for s in self.anchor_sizes)
        ratios = ",".join(f"{r:g}" for r in self.aspect_ratios)
        return (f"fitted anchors: sizes {sizes} px (P3-P7), aspect ratios {ratios}: unmatchable boxes "
                f"{self.before.share_unmatchable:.1%} -> {self.after.share_unmatchable:.1%}\n"
                f"  train with them: --anchor-sizes {sizes} --aspect-ratios {ratios}")


def fit_anchors(dataset, preset="paper", min_size=None, max_size=None, size_divisor=SIZE_DIVISOR,
                max_images=FIT_MAX_IMAGES):
    """Anchors that let as many of the dataset's boxes as possible reach IoU 0.5 with some anchor.

    The anchors keep the paper's structure, which the subnets' weights are shared under: one base size per level,
    doubling from level to level as the stride does, three scales of it per level, and the same aspect ratios on
    every level. So two things are chosen: the base size of P3 (sizes b, 2b, 4b, 8b, 16b, for b from 8 to 64 px
    in steps of 2^(1/3)) and the set of three aspect ratios (1:2 1:1 2:1, 1:3 1:1 3:1 or 1:4 1:1 4:1). Each
    choice is scored by ``anchor_statistics`` on the same images, resized as in training; of the choices within
    half a percentage point of the best share of matchable boxes, the one closest to the preset's anchors wins.

    Args:
        dataset, preset, min_size, max_size, size_divisor: as for ``anchor_statistics``.
        max_images: score on at most this many images (the first ones).

    Returns:
        ``AnchorFit``; its ``before`` is the preset's anchors.
    """
    samples = _samples(dataset, min_size, max_size, size_divisor, max_images)
    before = _statistics(samples, _generator(preset, None, None))
    candidates = []
    for step in range(-6, 4):                              # P3 base 32 * 2^(step/3): 8 ... 64 px
        base = 32 * 2 ** (step / 3)
        for ratio_set, ratios in enumerate(FIT_RATIO_SETS):
            sizes = [round(base * 2 ** level, 1) for level in range(5)]
            stats = _statistics(samples, _generator(preset, sizes, ratios))
            distance = abs(step) + 3 * ratio_set          # steps of 2^(1/3) away from 32 px, 1:2 1:1 2:1 first
            candidates.append((stats.share_unmatchable, distance, sizes, list(ratios), stats))
    best = min(share for share, *_ in candidates)
    _, _, sizes, ratios, after = min((c for c in candidates if c[0] <= best + 0.005), key=lambda c: c[1])
    return AnchorFit(sizes, ratios, before, after)


def _generator(preset, anchor_sizes, aspect_ratios):
    return AnchorGenerator(preset, sizes=anchor_sizes, aspect_ratios=aspect_ratios or DEFAULT_ASPECT_RATIOS)


def _samples(dataset, min_size, max_size, size_divisor, max_images):
    """Per image with boxes: (index, padded (H, W) after the resize, (G, 4) boxes after the resize)."""
    num_images = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    samples = []
    for index in range(num_images):
        if hasattr(dataset, "sizes") and hasattr(dataset, "targets"):
            size, boxes = dataset.sizes[index], dataset.targets[index]["boxes"]
        else:
            image, target = dataset[index]
            size, boxes = image.shape[-2:], target["boxes"]
        height, width = (int(v) for v in size)
        new_h, new_w = resized_size(height, width, min_size, max_size)
        boxes = scale_boxes(_as_boxes(boxes), (new_w / width, new_h / height))      # (G, 4)
        padded = tuple(-(-n // size_divisor) * size_divisor for n in (new_h, new_w))
        samples.append((index, padded, boxes))
    return _Samples(samples, num_images)


@dataclass
class _Samples:
    items: list
    num_images: int


def _statistics(samples, generator):
    """``AnchorStats`` of the boxes of ``samples`` (from ``_samples``) against ``generator``'s anchors."""
    sizes, best_ious, best_levels, image_index = [], [], [], []
    anchors_of_size = {}                                   # padded (H, W) -> its anchors per level, made once
    for index, padded, boxes in samples.items:
        if len(boxes) == 0:
            continue
        if padded not in anchors_of_size:
            anchors_of_size[padded] = _level_anchors(generator, padded)
        best_per_level = np.stack([_best_iou_per_box(anchors, boxes) for anchors in anchors_of_size[padded]])  # (L, G)
        best_levels.append(best_per_level.argmax(axis=0))                  # (G,) the first maximum: finer level
        best_ious.append(best_per_level.max(axis=0))                       # (G,)
        sides = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)               # (G, 2) w, h; 0 for a flipped box
        sizes.append(np.sqrt(sides[:, 0] * sides[:, 1]))                    # (G,)
        image_index.append(np.full(len(boxes), index, dtype=np.int64))

    def joined(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    # IoU <= smaller area / larger area, so IoU 0.5 needs an area from half the smallest anchor's to twice the
    # largest's. Measured on the cell anchors themselves: the torchvision preset's rounding makes some anchors a
    # little smaller than their nominal size (46 x 22 = 1012 < 32^2 on P3).
    areas = np.concatenate([(c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) for c in generator.cell_anchors])
    matchable = (math.sqrt(POSITIVE_IOU * float(areas.min())), math.sqrt(float(areas.max()) / POSITIVE_IOU))
    preset = generator.preset
    return AnchorStats(
        box_sizes=joined(sizes, np.float32), best_iou=joined(best_ious, np.float32),
        best_level=joined(best_levels, np.int64), image_index=joined(image_index, np.int64),
        level_names=tuple(f"P{int(math.log2(s))}" for s in generator.strides),
        anchor_sizes=tuple(tuple(float(s) for s in sizes) for sizes in generator.scaled_sizes),
        matchable_size_range=matchable, preset=preset,
        low_quality_matches=bool(MODEL_PRESETS[preset]["allow_low_quality_matches"]),
        num_images=samples.num_images)


def _as_boxes(boxes):
    """(G, 4) float32 from whatever array-like a dataset gives, also for zero boxes."""
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _level_anchors(generator, padded):
    """The anchors of one image padded to ``padded`` (H, W), split by level: L float32 arrays (H_l * W_l * A, 4),
    P3 first."""
    feature_sizes = [(-(-padded[0] // s), -(-padded[1] // s)) for s in generator.strides]   # ceil(H / stride)
    strides = generator.level_strides(padded, feature_sizes)
    return generator.grid_anchors(feature_sizes, strides)


def _best_iou_per_box(anchors, boxes):
    """(G,) the best IoU of each of the (G, 4) boxes over the (M, 4) anchors, M anchors taken in chunks."""
    best = np.zeros(len(boxes), dtype=np.float32)                             # (G,) IoUs are >= 0
    for start in range(0, len(anchors), CHUNK_SIZE):
        iou = box_iou(anchors[start:start + CHUNK_SIZE], boxes)               # (C, G)
        best = np.maximum(best, iou.max(axis=0))                              # (G,)
    return best


def plot_anchor_report(stats, path):
    """Write a PNG of two histograms: box sizes against the anchor sizes, and each box's best IoU against 0.5.

    Args:
        stats: an ``AnchorStats`` from ``anchor_statistics``.
        path: where to write the PNG; missing folders are created.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    size_ax, iou_ax = fig.subplots(1, 2)

    # (a) Box sizes on a log axis: each pyramid level's anchors are one octave, so equal widths on the page.
    low, high = stats.matchable_size_range
    sizes = stats.box_sizes[stats.box_sizes > 0]          # a zero-area box has no place on a log axis
    span = np.concatenate([sizes, [low, max(map(max, stats.anchor_sizes))]])
    bins = np.geomspace(span.min() / 1.1, span.max() * 1.1, 40)
    size_ax.hist(sizes, bins=bins, color="0.3", alpha=0.6, zorder=3)   # see-through: the anchor lines show
    for name, level_sizes, colour in zip(stats.level_names, stats.anchor_sizes, LEVEL_COLOURS):
        size_ax.axvspan(min(level_sizes), max(level_sizes), color=colour, alpha=0.15)
        for size in level_sizes:
            size_ax.axvline(size, color=colour, lw=1.2, label=name if size == level_sizes[0] else None)
    size_ax.axvline(low, color="red", ls=":", label=f"smallest matchable ({low:.1f} px)")
    size_ax.set_xscale("log")
    size_ax.set_xlabel("box size sqrt(w * h), pixels (log scale)")
    size_ax.set_ylabel("boxes")
    size_ax.set_title(f"{stats.num_boxes} boxes against the anchor sizes ({stats.preset!r} preset)")
    size_ax.legend(fontsize=8)

    # (b) Best IoUs, with bins that have 0.5 as an edge, so the bars left of the line are the unmatchable boxes.
    iou_ax.hist(stats.best_iou, bins=np.linspace(0, 1, 21), color="0.55")
    iou_ax.axvline(stats.iou_threshold, color="red", ls="--", label=f"IoU {stats.iou_threshold}: positive")
    iou_ax.set_xlim(0, 1)
    iou_ax.set_xlabel("best IoU of the box with any anchor")
    iou_ax.set_ylabel("boxes")
    iou_ax.set_title(f"unmatchable (best IoU < {stats.iou_threshold}): {stats.share_unmatchable:.1%}")
    iou_ax.legend(fontsize=8)

    if stats.num_boxes == 0:
        for ax in (size_ax, iou_ax):
            ax.text(0.5, 0.5, "no boxes in the dataset", transform=ax.transAxes, ha="center", va="center")
    return _save(fig, path)


def plot_matched_anchors(dataset, indices, path, preset="paper", columns=4, anchor_sizes=None, aspect_ratios=None,
                         min_size=None, max_size=None):
    """Write a PNG with, for each chosen image, its boxes and the anchors matched to them as positive.

    The anchors are matched with ``minidet.matching.match_anchors`` at the model's thresholds and with the
    preset's low-quality matches, so the picture shows what training sees. Anchors are coloured by level; the
    ground-truth boxes are white, and a box that gets no positive anchor is red and dashed, marked "no anchor"
    (usually because no anchor reaches IoU 0.5 with it; rarely because its anchors all match a box they overlap
    more).

    Args:
        dataset: a sequence of ``(image (3, H, W) in [0, 1], {"boxes": (G, 4), ...})``.
        indices: the dataset indices of the images to draw, at least one.
        path: where to write the PNG; missing folders are created.
        preset: ``"paper"`` or ``"torchvision"``.
        columns: images per row.
        anchor_sizes, aspect_ratios, min_size, max_size: as for ``anchor_statistics``; each image is drawn as
            training sees it, after the resize.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("plot_matched_anchors: give at least one image index")
    generator = _generator(preset, anchor_sizes, aspect_ratios)
    low_quality = MODEL_PRESETS[preset]["allow_low_quality_matches"]
    columns = max(1, min(int(columns), len(indices)))
    rows = -(-len(indices) // columns)
    fig = Figure(figsize=(3.6 * columns, 3.6 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax in axes[len(indices):]:
        ax.set_axis_off()
    for ax, index in zip(axes, indices):
        image, target = dataset[index]
        boxes = _as_boxes(target["boxes"])                                  # (G, 4)
        image, boxes, _ = resize(image, boxes, min_size, max_size)
        padded = tuple(-(-int(n) // SIZE_DIVISOR) * SIZE_DIVISOR for n in image.shape[-2:])
        level_anchors = _level_anchors(generator, padded)
        level_of_anchor = np.repeat(np.arange(len(level_anchors)), [len(a) for a in level_anchors])   # (M,)
        anchors = np.concatenate(level_anchors)                             # (M, 4)
        matches, _ = match_anchors(anchors, boxes, POSITIVE_IOU, BACKGROUND_IOU, low_quality,
                                   match_zero_iou=MODEL_PRESETS[preset]["match_zero_iou"])   # (M,)
        height, width = image.shape[-2:]
        # extent: pixel (row, col) covers [col, col + 1) x [row, row + 1), the coordinates the boxes use.
        ax.imshow(np.clip(np.transpose(image, (1, 2, 0)), 0, 1), extent=(0, width, height, 0))
        positive = np.flatnonzero(matches >= 0)                             # (P,)
        for a in positive:
            _draw_box(ax, anchors[a], LEVEL_COLOURS[level_of_anchor[a]], lw=0.8)
        for g, box in enumerate(boxes):
            if (matches == g).any():
                _draw_box(ax, box, "white", lw=1.8)
            else:
                _draw_box(ax, box, "red", lw=1.8, ls="--")
                ax.text(box[0], box[1] - 1, "no anchor", color="red", fontsize=7, va="bottom")
        # Large anchors reach past the image: widen the view to show them whole.
        drawn = np.concatenate([anchors[positive], boxes, [[0, 0, width, height]]])   # (P + G + 1, 4)
        ax.set_xlim(drawn[:, 0].min(), drawn[:, 2].max())
        ax.set_ylim(drawn[:, 3].max(), drawn[:, 1].min())                   # y grows downwards, as in the image
        ax.set_title(f"image {index}: boxes {len(boxes)}, positive anchors {len(positive)}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    names = [f"P{int(math.log2(s))}" for s in generator.strides]
    handles = [Line2D([], [], color=c, label=f"{n} anchor") for n, c in zip(names, LEVEL_COLOURS)]
    handles += [Line2D([], [], color="white", lw=1.8, label="box"),
                Line2D([], [], color="red", lw=1.8, ls="--", label="box with no positive anchor")]
    legend = fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    legend.get_frame().set_facecolor("0.8")                                 # so the white "box" line shows
    return _save(fig, path)


def _draw_box(ax, box, colour, lw, ls="-"):
    """Draw one (x1, y1, x2, y2) box as an unfilled rectangle."""
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=lw, ls=ls))


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
