"""Anchors: the fixed reference boxes that RetinaNet classifies and refines.

RetinaNet does not search for objects; it looks at a fixed set of boxes, the *anchors*, and for each one predicts
K class probabilities and 4 offsets that move it onto an object. This module builds that set. Plain arrays in,
plain arrays out: no gradients flow through anchors.

Shapes and dtypes
-----------------
A anchors per cell (9), L pyramid levels (5: P3-P7), level l has a feature map of H_l x W_l cells and
stride s_l (8, 16, 32, 64, 128 pixels). Boxes are (x1, y1, x2, y2) in pixels of the padded input image, float32.

    cell_anchors(...)            -> (A, 4)                    centred at (0, 0)
    AnchorGenerator()(...)       -> (sum_l H_l * W_l * A, 4)  for one image; every image of a padded batch shares it

Why these anchors
-----------------
Per cell, the paper's 3 aspect ratios h/w {0.5, 1, 2} times 3 scales {2^0, 2^(1/3), 2^(2/3)} of a base size of
4 x stride (32 pixels on P3 ... 512 on P7): the 15 sizes over P3-P7 form one geometric series (ratio 2^(1/3)), an
object of an anchor's size reaches IoU 0.62 with it however it falls between the centres, and objects under about
23 pixels reach 0.5 with no anchor. Tutorial step 6 (``tutorials/06_anchors.py``) draws them and derives the
last two.

Anchor order (must equal the heads' channel order)
--------------------------------------------------
Inside a cell, anchors are ratio-major, scale-minor (torchvision's order, used by both presets):

    a = ratio_index * len(scales) + scale_index      # a = 0..8: (0.5, 2^0), (0.5, 2^(1/3)), ..., (2, 2^(2/3))

Within a level the anchors run (y, x, a) with a fastest: row (y * W_l + x) * A + a; the levels follow each other
P3, P4, ..., P7. This order is a contract with the classification and regression subnets. They output
(N, A*K, H, W) and (N, A*4, H, W); the model views these as (N, A, K, H, W), permutes them to (N, H, W, A, K) and
reshapes them to (N, H*W*A, K), so channel a * K + k (and a * 4 + j for the box offsets) lands on the row of
anchor a in cell (y, x). If the two orders disagreed, every prediction would be scored against the wrong anchor,
and pretrained torchvision weights would not load correctly.

Two presets
-----------
========================  =====================================  ================================================
                          ``"paper"`` (default)                  ``"torchvision"``
========================  =====================================  ================================================
scaled sizes              size * scale, kept as floats           ``int(size * scale)``: 32, 40, 50; 64, 80, 101; ...
cell anchor corners       exact (float32 of the float64 value)   computed in float32, then ``round()`` (half even)
anchor centres            (i + 0.5) * stride: the cell centre    i * stride: the cell's top-left corner
stride                    given per level (8, 16, 32, 64, 128)   image size // feature size, per axis
========================  =====================================  ================================================

The torchvision preset reproduces ``torchvision.models.detection.anchor_utils.AnchorGenerator`` as built by
``retinanet_resnet50_fpn`` value for value, so that its pretrained weights give the same detections here.
"""

import numpy as np

from minidet import backend

PRESETS = ("paper", "torchvision")
DEFAULT_STRIDES = (8, 16, 32, 64, 128)                   # P3 ... P7
DEFAULT_SCALES = (2 ** (0 / 3), 2 ** (1 / 3), 2 ** (2 / 3))  # 1.0, 1.26, 1.587
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)                  # h / w

__all__ = ["PRESETS", "DEFAULT_STRIDES", "DEFAULT_SCALES", "DEFAULT_ASPECT_RATIOS", "scaled_sizes",
           "cell_anchors", "AnchorGenerator"]


def _check_preset(preset):
    if preset not in PRESETS:
        raise ValueError(f"unknown anchor preset {preset!r}: use one of {PRESETS}")


def scaled_sizes(size, scales=DEFAULT_SCALES, preset="paper"):
    """The anchor sizes (square roots of the areas) of one level: ``size * scale`` for each scale.

    ``"paper"`` keeps them as floats (32, 40.32, 50.80); ``"torchvision"`` truncates them with ``int()`` as
    torchvision's ``retinanet_resnet50_fpn`` does (32, 40, 50). Returns a tuple of Python numbers.
    """
    _check_preset(preset)
    if preset == "torchvision":
        return tuple(int(size * scale) for scale in scales)
    return tuple(float(size * scale) for scale in scales)


def cell_anchors(size, scales=DEFAULT_SCALES, aspect_ratios=DEFAULT_ASPECT_RATIOS, preset="paper"):
    """The anchors of one cell, centred at (0, 0): one per (aspect ratio, scale) pair, ratio-major.

    Args:
        size: the level's base size in pixels (4 x stride: 32 on P3).
        scales: multipliers of ``size`` (default 2^0, 2^(1/3), 2^(2/3)).
        aspect_ratios: h / w of each anchor (default 0.5, 1, 2).
        preset: ``"paper"`` or ``"torchvision"`` (see the module docstring).

    Returns:
        NumPy float32 array (A, 4), A = len(aspect_ratios) * len(scales), rows (-w/2, -h/2, w/2, h/2), row
        a = ratio_index * len(scales) + scale_index. An anchor of scaled size S and ratio r has
        h = S * sqrt(r) and w = S / sqrt(r): area S^2 whatever the ratio, and h / w = r.

    Example (paper): size 32, ratio 0.5, scale 1 -> w = 32 * sqrt(2) = 45.25, h = 22.63:
    the row (-22.63, -11.31, 22.63, 11.31). The torchvision preset rounds it to (-23, -11, 23, 11).
    """
    sizes = scaled_sizes(size, scales, preset)
    if preset == "torchvision":
        # Exactly torchvision's arithmetic: float32 throughout, so the rounding below sees the same values.
        sizes = np.asarray(sizes, dtype=np.float32)                    # (S,)
        ratios = np.asarray(aspect_ratios, dtype=np.float32)           # (R,)
        h_ratios = np.sqrt(ratios)                                     # (R,)
        w_ratios = 1 / h_ratios                                        # (R,)
        ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)          # (R*S,) ratio-major
        hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)          # (R*S,)
        corners = np.stack([-ws, -hs, ws, hs], axis=1) / 2             # (A, 4)
        return np.round(corners)                                       # half to even, like torch.round
    sizes = np.asarray(sizes, dtype=np.float64)                        # (S,)
    root = np.sqrt(np.asarray(aspect_ratios, dtype=np.float64))        # (R,) sqrt(h / w)
    ws = (sizes[None, :] / root[:, None]).reshape(-1)                  # (R*S,) ratio-major
    hs = (sizes[None, :] * root[:, None]).reshape(-1)                  # (R*S,)
    corners = np.stack([-ws, -hs, ws, hs], axis=1) / 2                 # (A, 4)
    return corners.astype(np.float32)


class AnchorGenerator:
    """All anchors of an image, level after level (P3 first), in the order the heads predict them.

    Args:
        preset: ``"paper"`` (default) or ``"torchvision"``.
        sizes: base size of each level; default 4 x stride (32, 64, 128, 256, 512).
        scales: size multipliers shared by all levels; default 2^0, 2^(1/3), 2^(2/3).
        aspect_ratios: h / w, shared by all levels; default (0.5, 1, 2).
        strides: the stride of each level in pixels; default (8, 16, 32, 64, 128). The paper preset places its
            anchors with these; the torchvision preset, like torchvision, derives each level's stride from the
            image and feature sizes instead (``image_size // feature_size``) and uses these only for counting.

    Attributes:
        cell_anchors: list of L NumPy float32 arrays (A, 4), one per level (see ``cell_anchors``).
        scaled_sizes: per level, the A // len(aspect_ratios) anchor sizes (torchvision calls these ``sizes``).
        num_anchors_per_location: A, the same on every level (9). torchvision's method of that name returns
            the list [A] * L instead.

    Example::

        gen = AnchorGenerator()
        feature_sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]    # P3-P7 of a 64 x 96 image
        anchors = gen((64, 96), feature_sizes)                         # (9 * 129, 4) = (1161, 4)
        per_level = np.split(anchors, np.cumsum(gen.num_anchors_per_level(feature_sizes))[:-1])
    """

    def __init__(self, preset="paper", sizes=None, scales=DEFAULT_SCALES, aspect_ratios=DEFAULT_ASPECT_RATIOS,
                 strides=DEFAULT_STRIDES):
        _check_preset(preset)
        strides = tuple(int(s) for s in strides)
        sizes = tuple(4 * s for s in strides) if sizes is None else tuple(sizes)
        if len(sizes) != len(strides):
            raise ValueError(f"AnchorGenerator: {len(sizes)} sizes for {len(strides)} strides; give one per level")
        self.preset = preset
        self.sizes = sizes
        self.scales = tuple(scales)
        self.aspect_ratios = tuple(aspect_ratios)
        self.strides = strides
        self.scaled_sizes = [scaled_sizes(size, self.scales, preset) for size in sizes]
        self.cell_anchors = [cell_anchors(size, self.scales, self.aspect_ratios, preset) for size in sizes]
        self.num_anchors_per_location = len(self.scales) * len(self.aspect_ratios)

    def __repr__(self):
        return (f"AnchorGenerator(preset={self.preset!r}, sizes={self.sizes}, scales={self.scales}, "
                f"aspect_ratios={self.aspect_ratios}, strides={self.strides})")

    def num_anchors_per_level(self, feature_sizes):
        """[H_l * W_l * A for each level]: how many rows of the output belong to each level."""
        self._check_levels(feature_sizes)
        return [int(h) * int(w) * self.num_anchors_per_location for h, w in feature_sizes]

    def level_strides(self, image_size, feature_sizes):
        """The (stride_y, stride_x) of each level in pixels, as the preset defines it.

        ``"torchvision"``: ``(H // H_l, W // W_l)``, integer division as in torchvision, so an image that is not
        a multiple of 128 gets odd strides on the coarse levels (64 x 96 gives P6 the strides (64, 48)).
        ``"paper"``: the given stride of the level on both axes, after checking that the feature map covers the
        image at that stride: H_l must be H / stride rounded down or up (stride-2 convolutions with padding
        give ceil(H / stride), pooling without padding gives the floor), and likewise for W_l.
        Raises ValueError otherwise: the feature sizes belong to another image, or the levels are in another order.
        """
        self._check_levels(feature_sizes)
        height, width = (int(v) for v in image_size)
        strides = []
        for level, ((h, w), stride) in enumerate(zip(feature_sizes, self.strides)):
            h, w = int(h), int(w)
            if self.preset == "torchvision":
                strides.append((height // h, width // w))
                continue
            for axis, n, length in (("height", h, height), ("width", w, width)):
                if n not in (length // stride, -(-length // stride)):
                    raise ValueError(
                        f"AnchorGenerator: level {level} has stride {stride} but its feature map is {h} x {w} for "
                        f"a {height} x {width} image: its {axis} should be {length} / {stride} rounded down or up "
                        f"({length // stride} or {-(-length // stride)}), not {n}")
            strides.append((stride, stride))
        return strides

    def grid_anchors(self, feature_sizes, strides, like=None):
        """Tile each level's cell anchors over its feature map: a list of L float32 arrays (H_l * W_l * A, 4).

        ``strides`` is a list of (stride_y, stride_x) per level (see ``level_strides``); rows are ordered
        (y, x, a) with a fastest. ``like``: see ``__call__``.
        """
        xp = _array_module(like)
        offset = 0.5 if self.preset == "paper" else 0.0          # cell centre, or the cell's top-left corner
        anchors = []
        for (h, w), (stride_y, stride_x), cell in zip(feature_sizes, strides, self.cell_anchors):
            ys = (xp.arange(int(h), dtype=xp.float32) + offset) * stride_y          # (H,) centre rows
            xs = (xp.arange(int(w), dtype=xp.float32) + offset) * stride_x          # (W,) centre columns
            cy, cx = xp.meshgrid(ys, xs, indexing="ij")                             # (H, W) each
            centres = xp.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)         # (H*W, 1, 4)
            cell = xp.asarray(cell).reshape(1, -1, 4)                               # (1, A, 4)
            anchors.append((centres + cell).reshape(-1, 4).astype(xp.float32))      # (H*W*A, 4)
        return anchors

    def __call__(self, image_size, feature_sizes, like=None):
        """All anchors of one image.

        Args:
            image_size: (H, W) of the padded batch (``images.shape[-2:]``).
            feature_sizes: [(H_l, W_l) for P3, ..., P7] (each ``feature.shape[-2:]``).
            like: an array (NumPy or CuPy) on the device where the anchors should live, e.g. a feature map's
                ``.data``; None gives NumPy. Only its device matters: the anchors are float32 whatever its dtype.

        Returns:
            float32 array (sum_l H_l * W_l * A, 4) of (x1, y1, x2, y2), levels concatenated P3 first, each level
            ordered (y, x, a). Split it per level with ``num_anchors_per_level(feature_sizes)``.
        """
        strides = self.level_strides(image_size, feature_sizes)
        xp = _array_module(like)
        return xp.concatenate(self.grid_anchors(feature_sizes, strides, like=like), axis=0)

    def _check_levels(self, feature_sizes):
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"AnchorGenerator: {len(feature_sizes)} feature maps for {len(self.strides)} levels "
                             f"(strides {self.strides}); give one (H, W) per level")


def _array_module(like):
    """NumPy or CuPy, from the array ``like`` (None: NumPy). Anything else is refused, not guessed."""
    if like is None:
        return np
    if not (isinstance(like, np.ndarray) or backend.is_cupy_array(like)):
        raise TypeError(f"anchors: like= must be a NumPy or CuPy array, got {type(like).__name__}; "
                        "for a minidet Tensor pass tensor.data")
    return backend.get_array_module(like)
