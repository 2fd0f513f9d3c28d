"""Transforms that move an image and its boxes together, and batching.

An image here is one ``(3, H, W)`` float32 NumPy array; its boxes are ``(G, 4)`` as (x1, y1, x2, y2) in pixels,
with a pixel ``(row, col)`` covering ``[col, col + 1) x [row, row + 1)`` (so an image is W pixels wide and a box
over the whole image is ``(0, 0, W, H)``). The model wants a batch ``(N, 3, H, W)`` whose H and W are multiples of
32, the stride of the coarsest feature map it pools down to; ``collate`` pads to that.

The order in training (``minidet.train.training_batch``): ``resize`` -> ``horizontal_flip`` (half the time) ->
``normalize`` -> ``collate``.
At test time keep the ``scale`` that ``resize`` returns, and map the detections back to the original pixels with
``scale_boxes_back``.
"""

import math

import numpy as np


def _source_coordinates(in_size, out_size):
    """Where each output pixel samples its input, for bilinear resizing with align_corners=False.

    Pixel i of the output has its centre at ``i + 0.5``; in input units that is ``(i + 0.5) * in / out``, so the
    input coordinate (in pixel-index units, centres at integers) is ``(i + 0.5) * in / out - 0.5``. Coordinates
    below 0 are clamped to 0 (PyTorch does the same), and the right neighbour is clamped to the last pixel.

    Returns:
        (i0, i1, weight): (out,) int64 left and right neighbours, (out,) float32 weight of the right one.
    """
    ratio = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * ratio - 0.5     # (out,)
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)          # (out,)
    i1 = np.minimum(i0 + 1, in_size - 1)                                   # (out,)
    weight = (src - i0).astype(np.float32)                                 # (out,)
    return i0, i1, weight


def resize_image(image, size):
    """Bilinear resize of a (C, H, W) image to ``size = (h, w)``, as ``torch.nn.functional.interpolate`` with
    ``mode="bilinear", align_corners=False`` (and no antialiasing).

    Each output pixel is a weighted mean of the four input pixels around the point it samples (see
    ``_source_coordinates``): first along the rows, then along the columns.

    Args:
        image: (C, H, W) float array.
        size: (h, w), the output height and width, each >= 1.

    Returns:
        (C, h, w) float32.
    """
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize_image: output size must be at least 1 x 1, got {out_h} x {out_w}")
    image = np.asarray(image, dtype=np.float32)
    y0, y1, wy = _source_coordinates(image.shape[1], out_h)
    x0, x1, wx = _source_coordinates(image.shape[2], out_w)
    rows = image[:, y0, :] * (1 - wy)[:, None] + image[:, y1, :] * wy[:, None]    # (C, h, W)
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx                         # (C, h, w)


def resize_factor(height, width, min_size=None, max_size=None):
    """The factor ``resize`` scales an H x W image by: the shorter side becomes ``min_size``, unless that makes the
    longer side exceed ``max_size``, in which case the longer side becomes ``max_size`` (the paper's rule, 800 and
    1333, and torchvision's ``GeneralizedRCNNTransform``).

    Either may be None: without ``min_size`` an image is only ever made smaller, when its longer side exceeds
    ``max_size``; without ``max_size`` there is no cap; without both the factor is 1.
    """
    factors = [1.0] if min_size is None else [min_size / min(height, width)]
    if max_size is not None:
        factors.append(max_size / max(height, width))
    return min(factors)


def resized_size(height, width, min_size=None, max_size=None):
    """(h, w): the size ``resize`` gives an H x W image, each side scaled by ``resize_factor`` and rounded."""
    factor = resize_factor(height, width, min_size, max_size)
    return max(1, round(height * factor)), max(1, round(width * factor))


def resize(image, boxes, min_size=800, max_size=1333):
    """Resize by ``resize_factor`` (keeping the aspect ratio) and scale the boxes with the image.

    Args:
        image: (3, H, W) float32.
        boxes: (G, 4) as (x1, y1, x2, y2) in pixels of ``image``.
        min_size, max_size: target shorter side and cap on the longer side, in pixels; either may be None (see
            ``resize_factor``).

    Returns:
        (image (3, h, w) float32, boxes (G, 4) float32 in pixels of the new image, scale), where
        ``scale = (w / W, h / H)`` is the (x, y) factor each coordinate was multiplied by. The two differ slightly
        because h and w are rounded to whole pixels; pass ``scale`` to ``scale_boxes_back`` to undo the resize.
        When h and w come out as H and W, the image itself is returned and ``scale`` is (1.0, 1.0).
    """
    height, width = image.shape[-2:]
    new_h, new_w = resized_size(height, width, min_size, max_size)
    if (new_h, new_w) == (height, width):
        return image, scale_boxes(boxes, 1.0), (1.0, 1.0)
    scale = (new_w / width, new_h / height)
    return resize_image(image, (new_h, new_w)), scale_boxes(boxes, scale), scale


def scale_boxes(boxes, scale):
    """Multiply (G, 4) boxes by ``scale``: a number, or an (x, y) pair. Returns (G, 4) float32."""
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return boxes * np.array([sx, sy, sx, sy], dtype=np.float32)               # (G, 4)


def scale_boxes_back(boxes, scale):
    """Undo ``resize`` on boxes: map (D, 4) boxes in pixels of the resized image back to the original image.

    Args:
        boxes: (D, 4) as (x1, y1, x2, y2), e.g. ``model.predict(...)[i]["boxes"]`` (a NumPy array).
        scale: the ``scale`` that ``resize`` returned, (x, y) or one number.

    Returns:
        (D, 4) float32.
    """
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    return scale_boxes(boxes, (1.0 / sx, 1.0 / sy))


def horizontal_flip(image, boxes):
    """Mirror the image left-right, and the boxes with it.

    A column c goes to ``W - 1 - c``; as pixel edges, x goes to ``W - x``, so a box's left edge becomes
    ``W - x2`` and its right edge ``W - x1``.

    Args:
        image: (C, H, W).
        boxes: (G, 4) as (x1, y1, x2, y2).

    Returns:
        (image (C, H, W), boxes (G, 4) float32). Flipping twice gives back the input.
    """
    width = image.shape[-1]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return np.ascontiguousarray(image[..., ::-1]), flipped


# ImageNet statistics of [0, 1] RGB images: what torchvision's pretrained backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """``(image - mean) / std`` per channel. image: (C, H, W); mean, std: C numbers. Returns (C, H, W) float32."""
    mean = np.asarray(mean, dtype=np.float32)[:, None, None]     # (C, 1, 1)
    std = np.asarray(std, dtype=np.float32)[:, None, None]       # (C, 1, 1)
    return (np.asarray(image, dtype=np.float32) - mean) / std


def collate(items, size_divisor=32):
    """Stack ``(image, target)`` pairs into one batch the model accepts.

    Images of different sizes are padded with zeros at the bottom and right (so box coordinates stay valid) to
    the largest height and width in the batch, rounded up to a multiple of ``size_divisor``.

    Args:
        items: a list of N ``(image (3, h_i, w_i) float32, {"boxes": (G_i, 4), "labels": (G_i,)})``.
        size_divisor: H and W of the batch are multiples of this (32 for the model's strides).

    Returns:
        (images (N, 3, H, W) float32, targets: list of N dicts with "boxes" (G_i, 4) float32 and "labels"
        (G_i,) int64, image_sizes: list of N (h_i, w_i), the sizes before padding, for ``model.predict``).
    """
    if not items:
        raise ValueError("collate: got no items; a batch needs at least one (image, target) pair")
    sizes = [tuple(int(s) for s in image.shape[-2:]) for image, _ in items]
    height = math.ceil(max(h for h, _ in sizes) / size_divisor) * size_divisor
    width = math.ceil(max(w for _, w in sizes) / size_divisor) * size_divisor
    channels = items[0][0].shape[0]
    images = np.zeros((len(items), channels, height, width), dtype=np.float32)   # (N, 3, H, W)
    targets = []
    for n, ((image, target), (h, w)) in enumerate(zip(items, sizes)):
        images[n, :, :h, :w] = image
        targets.append({"boxes": np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4),
                        "labels": np.asarray(target["labels"], dtype=np.int64).reshape(-1)})
    return images, targets, sizes


def batches(dataset, batch_size, shuffle=False, seed=0, drop_last=False):
    """Yield lists of ``batch_size`` items of ``dataset`` (the last one shorter unless ``drop_last``).

    With ``shuffle``, the order is a permutation drawn from ``np.random.default_rng(seed)``: the same seed gives
    the same batches. Use a different seed per epoch (e.g. ``seed + epoch``) for a new order each epoch.
    """
    order = np.arange(len(dataset))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(dataset))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        yield [dataset[int(i)] for i in order[start:start + batch_size]]


__all__ = ["resize", "resize_factor", "resized_size", "resize_image", "scale_boxes", "scale_boxes_back",
           "horizontal_flip", "normalize", "collate", "batches", "IMAGENET_MEAN", "IMAGENET_STD"]
