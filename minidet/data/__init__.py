"""Data for minidet: the built-in ``Shapes`` dataset, COCO-format folders, converters, transforms and batching.

Every dataset here is a sequence of ``(image, target)`` pairs: image (3, H, W) float32 in [0, 1], target
{"boxes": (G, 4) float32 (x1, y1, x2, y2) in pixels, "labels": (G,) int64 in 0..K-1}, with the class names in
``dataset.classes``.
"""

from minidet.data.coco import CocoDataset, export_coco, read_image, write_json
from minidet.data.converters import csv_to_coco, voc_to_coco
from minidet.data.shapes import Shapes
from minidet.data.transforms import (
    batches,
    collate,
    horizontal_flip,
    normalize,
    resize,
    resize_factor,
    resize_image,
    scale_boxes_back,
)

__all__ = ["Shapes", "CocoDataset", "export_coco", "read_image", "write_json", "csv_to_coco", "voc_to_coco",
           "batches", "collate", "horizontal_flip", "normalize", "resize", "resize_factor",
           "resize_image", "scale_boxes_back"]
