"""``Shapes``: a synthetic detection dataset drawn on the fly, the built-in data of ``minidet demo``.

Each image shows a few coloured circles, squares, triangles and crosses (the classes) on a cluttered background:
a colour gradient, smooth blotches and a few thin random lines that are not objects. Image ``i`` is drawn from its
own generator ``np.random.default_rng([seed, i])``, so it is the same whatever order the images are read in, and
the same on every machine.

The choices, and why:

- **Object sizes** are drawn log-uniformly from ``min_size = 24`` to ``max_size = 0.8 * image_size`` pixels (the
  side of the shape's square extent), so each octave of sizes is equally common, as each pyramid level is. The
  smallest anchor is 32 x 32 (P3, stride 8). A square box of side s inside a 32-pixel anchor has IoU s^2 / 32^2,
  which reaches the 0.5 needed for a positive match at s = 23; the anchor centres are 8 pixels apart, so a box
  can be off an anchor's centre by up to 4 pixels, and a 24-pixel box is then still inside the anchor (IoU
  0.5625). Smaller objects could never be matched, and the detector could never learn them.
- **Empty images**: a share ``empty_fraction = 0.1`` of the images (each one decided by its own generator) have
  no objects, so the model also sees pictures where the right answer is "nothing".
- **Overlap**: objects may overlap, but a new object is placed only where its box has IoU at most
  ``max_overlap = 0.3`` with every earlier box, where it leaves at least ``min_visible = 0.6`` of every
  earlier object's pixels visible, and where the box of what a covered object still shows keeps both sides at
  least ``min_size``. Larger objects are drawn first, so small ones are never hidden.
- **Tight boxes**: the box of an object is computed from its visible pixels: ``(x1, y1)`` is the top-left corner
  of its top-left-most pixel, ``(x2, y2)`` the bottom-right corner of its bottom-right-most pixel, so each edge
  touches a pixel of the object. The shapes have hard edges (no antialiasing), so "the object's pixels" is exact.
- **Quantised images**: every image is rounded to 8 bits, ``uint8 / 255`` in float32, the values a PNG can hold.
  ``export_coco`` then writes it losslessly, and reading the PNG back gives the same float32 bits: training on an
  exported folder sees exactly the images the generator makes.
"""

import math

import numpy as np

from minidet.boxes import box_iou
from minidet.data.transforms import resize_image

CLASSES = ("circle", "square", "triangle", "cross")


def to_float_image(pixels):
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], as ``uint8 / 255`` computed in float32.

    This is the same division matplotlib's ``imread`` does for an 8-bit PNG, so an image that went through a PNG
    comes back with identical bits.
    """
    return np.ascontiguousarray(np.divide(pixels, 255, dtype=np.float32).transpose(2, 0, 1))


def shape_mask(name, size, centre, grid):
    """The pixels of one shape, as a boolean mask over ``grid``.

    Args:
        name: one of ``CLASSES``.
        size: the side of the shape's square extent, in pixels.
        centre: (cx, cy) in pixel-edge coordinates.
        grid: (ys, xs), broadcastable arrays of pixel-centre coordinates (``row + 0.5``, ``col + 0.5``).

    Returns:
        boolean mask of the broadcast shape of ``grid``.
    """
    ys, xs = grid
    dx, dy = xs - centre[0], ys - centre[1]
    r = size / 2
    if name == "circle":
        return dx * dx + dy * dy <= r * r
    if name == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if name == "triangle":
        # Pointing up: apex at the top, base (as wide as the extent) at the bottom; half-width grows with y.
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if name == "cross":
        arm = r / 3
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ValueError(f"shape_mask: unknown shape {name!r}; the shapes are {CLASSES}")


class Shapes:
    """A synthetic detection dataset: ``dataset[i]`` is ``(image, target)``, drawn the first time it is asked for.

    Each image is drawn once: its 8-bit pixels and its target are kept (3 bytes a pixel, about 50 MB for 1024 images
    of 128 x 128), and later reads only turn the pixels into floats, which takes a small fraction of the time of
    drawing (training reads every image once an epoch).

    Args:
        num_images: the length of the dataset.
        image_size: images are square, ``image_size`` pixels on a side (use a multiple of 32 to feed the model
            without padding).
        seed: with the index, the seed of each image's generator.
        min_size, max_size: the range of object sizes in pixels (default 24 and ``0.8 * image_size``; see the
            module docstring for why).
        max_objects: each non-empty image has 1 to ``max_objects`` objects (fewer when they do not fit).
        empty_fraction: the share of images with no objects.
        max_overlap: the largest IoU allowed between two objects' boxes.
        min_visible: the smallest share of an object's pixels that later objects may leave visible.

    Items:
        image: (3, H, W) float32 in [0, 1], multiples of 1/255.
        target: {"boxes": (G, 4) float32 tight boxes (x1, y1, x2, y2) in pixels, "labels": (G,) int64 in
        0..K-1, indices into ``classes``}.
    """

    classes = CLASSES

    def __init__(self, num_images, image_size=128, seed=0, min_size=24, max_size=None, max_objects=6,
                 empty_fraction=0.1, max_overlap=0.3, min_visible=0.6):
        max_size = 0.8 * image_size if max_size is None else max_size
        if not 1 <= min_size <= max_size <= image_size:
            raise ValueError(f"Shapes: need 1 <= min_size <= max_size <= image_size, got min_size {min_size}, "
                             f"max_size {max_size}, image_size {image_size}")
        if num_images < 0 or max_objects < 1 or not 0 <= empty_fraction <= 1:
            raise ValueError(f"Shapes: need num_images >= 0, max_objects >= 1 and empty_fraction in [0, 1], got "
                             f"{num_images}, {max_objects}, {empty_fraction}")
        self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
        self.min_size, self.max_size, self.max_objects = float(min_size), float(max_size), int(max_objects)
        self.empty_fraction, self.max_overlap, self.min_visible = empty_fraction, max_overlap, min_visible
        self._drawn = {}                                 # index -> (pixels (H, W, 3) uint8, target)

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        index = self._check_index(index)
        if index not in self._drawn:
            pixels, target, _ = self._draw_pixels(index)
            self._drawn[index] = pixels, target
        pixels, target = self._drawn[index]
        # Copies of the target, so that a caller who changes them in place cannot change what the next read gives.
        return to_float_image(pixels), {key: value.copy() for key, value in target.items()}

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def __repr__(self):
        return (f"Shapes(num_images={self.num_images}, image_size={self.image_size}, seed={self.seed}, "
                f"classes={self.classes})")

    def draw(self, index):
        """Draw image ``index`` anew: ``(image, target, masks)`` with masks (G, H, W) bool, each object's visible
        pixels. ``dataset[index]`` is the first two; the masks let tests check that every box is tight.
        """
        pixels, target, masks = self._draw_pixels(self._check_index(index))
        return to_float_image(pixels), target, masks

    def _check_index(self, index):
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"Shapes: index {index} is out of range for {self.num_images} images")
        return int(index) % self.num_images

    def _draw_pixels(self, index):
        """Image ``index`` as (pixels (H, W, 3) uint8, target, masks)."""
        rng = np.random.default_rng([self.seed, index])
        size = self.image_size
        canvas = self._background(rng)                                            # (H, W, 3) float32
        ys = np.arange(size, dtype=np.float32)[:, None] + 0.5                     # (H, 1) pixel centres
        xs = np.arange(size, dtype=np.float32)[None, :] + 0.5                     # (1, W)

        count = 0 if rng.random() < self.empty_fraction else int(rng.integers(1, self.max_objects + 1))
        # Log-uniform sizes, largest first, so that small objects are drawn on top of large ones.
        sizes = np.sort(np.exp(rng.uniform(math.log(self.min_size), math.log(self.max_size), count)))[::-1]
        labels = rng.integers(0, len(self.classes), count)

        owner = np.full((size, size), -1, dtype=np.int64)     # (H, W): which object each pixel shows, -1 none
        pixel_counts, boxes, kept_labels = [], [], []
        for extent, label in zip(sizes, labels):
            placed = self._place(rng, self.classes[label], extent, owner, pixel_counts, boxes, (ys, xs))
            if placed is None:
                continue                       # no free spot after several tries: the image gets one object fewer
            mask, box = placed
            owner[mask] = len(boxes)
            pixel_counts.append(int(mask.sum()))
            boxes.append(box)
            kept_labels.append(label)
            canvas[mask] = self._colour(rng, canvas[mask].mean(axis=0))

        masks = owner[None] == np.arange(len(boxes))[:, None, None]               # (G, H, W) visible pixels
        tight = [_tight_box(m) for m in masks]
        pixels = np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)           # (H, W, 3) 8-bit
        target = {"boxes": np.array(tight, dtype=np.float32).reshape(-1, 4),
                  "labels": np.array(kept_labels, dtype=np.int64)}
        return pixels, target, masks

    def _place(self, rng, name, extent, owner, pixel_counts, boxes, grid, tries=20):
        """Find a spot for one shape: (mask (H, W) bool, box) or None. See the module docstring for the rules."""
        size = self.image_size
        r = extent / 2
        for _ in range(tries):
            centre = rng.uniform(r, size - r, 2)                                     # (cx, cy), fully inside
            box = np.array([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r])
            if boxes and box_iou(box[None], np.array(boxes)).max() > self.max_overlap:
                continue
            mask = shape_mask(name, extent, centre, grid)                             # (H, W)
            if not mask.any():
                continue
            if pixel_counts:
                shown = np.bincount(owner[owner >= 0], minlength=len(pixel_counts))             # (G,) now
                covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(pixel_counts))  # (G,) by this one
                # What each earlier object would still show, against all it had when it was drawn.
                if (shown - covered < self.min_visible * np.array(pixel_counts)).any():
                    continue
                # And the box of what each covered object still shows keeps both sides at least min_size.
                if any(min(_box_size((owner == j) & ~mask)) < self.min_size for j in np.flatnonzero(covered)):
                    continue
            return mask, box
        return None

    def _background(self, rng):
        """(H, W, 3) float32 clutter: a gradient between two muted colours, smooth blotches, and thin lines."""
        size = self.image_size
        low, high = rng.uniform(0.15, 0.85, (2, 3))                                # two colours (3,)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size                # (H, W) each, in [0, 1)
        t = (np.cos(angle) * xs + np.sin(angle) * ys)                              # (H, W)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        canvas = low + (high - low) * t[..., None]                                 # (H, W, 3)
        # Smooth blotches: a coarse 4 x 4 grid of random colour offsets, bilinearly enlarged.
        coarse = rng.normal(0, 0.08, (3, 4, 4)).astype(np.float32)
        canvas += resize_image(coarse, (size, size)).transpose(1, 2, 0)
        # Thin lines (1 to 2 pixels wide) that cross the image: clutter, not objects.
        centres_y, centres_x = ys * size + 0.5, xs * size + 0.5                    # (H, W) pixel centres
        for _ in range(int(rng.integers(0, 5))):
            (x0, y0), (x1, y1) = rng.uniform(0, size, (2, 2))
            width = rng.uniform(0.5, 1.0)
            distance = _distance_to_segment(centres_x, centres_y, x0, y0, x1, y1)   # (H, W)
            canvas[distance <= width] = rng.uniform(0, 1, 3)
        canvas += rng.normal(0, 0.015, canvas.shape)                               # faint sensor noise
        return canvas.astype(np.float32)

    @staticmethod
    def _colour(rng, background, tries=10):
        """An RGB colour (3,) that stands out from ``background`` (3,): mean channel difference at least 0.3."""
        for _ in range(tries):
            colour = rng.uniform(0, 1, 3)
            if np.abs(colour - background).mean() >= 0.3:
                return colour
        return np.where(background > 0.5, 0.05, 0.95)                             # the far corner of the cube


def _tight_box(mask):
    """The tight (x1, y1, x2, y2) box of the True pixels of an (H, W) mask: pixel edges, x2 and y2 exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)


def _box_size(mask):
    """(width, height) of the tight box of an (H, W) mask's True pixels."""
    x1, y1, x2, y2 = _tight_box(mask)
    return x2 - x1, y2 - y1


def _distance_to_segment(px, py, x0, y0, x1, y1):
    """Distance from points (px, py) (arrays of one shape) to the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    length2 = max(dx * dx + dy * dy, 1e-12)
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / length2, 0, 1)               # projection onto the segment
    return np.hypot(px - (x0 + t * dx), py - (y0 + t * dy))
