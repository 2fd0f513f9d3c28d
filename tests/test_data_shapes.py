"""The built-in Shapes dataset: determinism, tight boxes, the size range, class balance, the share of empty images."""

import time

import numpy as np
import pytest

import minidet as md
from minidet.anchors import AnchorGenerator
from minidet.boxes import box_iou, check_boxes
from minidet.data import Shapes, collate
from minidet.models import RetinaNet


def test_item_types_and_shapes():
    dataset = Shapes(5, image_size=96, seed=0)
    assert len(dataset) == 5
    for image, target in dataset:
        assert image.shape == (3, 96, 96) and image.dtype == np.float32
        assert 0 <= image.min() and image.max() <= 1
        assert target["boxes"].dtype == np.float32 and target["boxes"].shape[1] == 4
        assert target["labels"].dtype == np.int64 and target["labels"].shape == (len(target["boxes"]),)
        assert ((0 <= target["labels"]) & (target["labels"] < len(dataset.classes))).all()
        check_boxes(target["boxes"])
        assert (target["boxes"] >= 0).all() and (target["boxes"] <= 96).all()


def test_same_seed_same_images_in_any_order():
    a, b = Shapes(20, seed=7), Shapes(20, seed=7)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for (ia, ta), (ib, tb) in zip(forward, backward):
        assert np.array_equal(ia, ib)
        assert np.array_equal(ta["boxes"], tb["boxes"]) and np.array_equal(ta["labels"], tb["labels"])
    assert np.array_equal(a[-1][0], a[19][0])
    # Image i does not depend on the length of the dataset either, and another seed gives other images.
    assert np.array_equal(Shapes(50, seed=7)[3][0], a[3][0])
    assert not np.array_equal(Shapes(20, seed=8)[3][0], a[3][0])
    with pytest.raises(IndexError):
        a[20]


def test_images_are_multiples_of_1_over_255():
    image, _ = Shapes(3, seed=1)[0]
    levels = image * np.float32(255)
    assert np.array_equal(np.round(levels).astype(np.uint8).astype(np.float32) / np.float32(255), image)


def test_boxes_are_tight_around_the_visible_pixels():
    dataset = Shapes(40, seed=2)
    for index in range(len(dataset)):
        image, target, masks = dataset.draw(index)
        assert len(masks) == len(target["boxes"])
        for mask, (x1, y1, x2, y2) in zip(masks, target["boxes"].astype(int)):
            assert mask.any()
            rows, cols = np.nonzero(mask)
            # Every pixel of the object is inside its box, and each box edge touches one of them.
            assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            # The mask is what the image shows: the object's pixels all have its one colour, and that colour is on
            # the box's first and last row and column of the image.
            colours = image[:, mask]                                                  # (3, P)
            assert np.array_equal(colours.min(axis=1), colours.max(axis=1))
            colour = colours[:, :1, None]                                             # (3, 1, 1)
            window = (image[:, y1:y2, x1:x2] == colour).all(axis=0)                   # (h, w)
            assert window[0].any() and window[-1].any() and window[:, 0].any() and window[:, -1].any()


def test_sizes_overlap_classes_and_empty_share():
    dataset = Shapes(400, image_size=128, seed=0)
    longer, shorter, labels, empty = [], [], [], 0
    for _, target in dataset:
        boxes = target["boxes"]
        empty += len(boxes) == 0
        labels.extend(target["labels"].tolist())
        longer.extend(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).tolist())
        shorter.extend(np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).tolist())
        if len(boxes) > 1:
            iou = box_iou(boxes, boxes) - np.eye(len(boxes))
            # Placement keeps drawn extents at IoU <= 0.3; visible boxes are inside them and may differ a little.
            assert iou.max() <= 0.5
    longer, shorter = np.array(longer), np.array(shorter)
    assert 0.05 <= empty / len(dataset) <= 0.15                        # empty_fraction 0.1
    # 24 .. 102 pixels, give or take the pixel that rasterising can gain or lose, occlusion included.
    assert shorter.min() >= 23 and longer.max() <= 0.8 * 128 + 1
    # Log-uniform: about as many objects below the geometric middle of the range as above (uniform sizes: 1/3).
    assert 0.42 <= (longer < np.sqrt(24 * 0.8 * 128)).mean() <= 0.62
    counts = np.bincount(labels, minlength=len(dataset.classes))
    assert counts.min() >= 0.7 * counts.mean()                    # classes roughly balanced


def test_options_are_checked():
    with pytest.raises(ValueError, match="min_size"):
        Shapes(10, image_size=64, min_size=80)
    assert len(Shapes(4, empty_fraction=1.0)[0][1]["boxes"]) == 0


def test_generation_is_fast():
    dataset = Shapes(200, seed=0)
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    assert time.perf_counter() - start < 5.0      # about 2 ms an image; 1000 take about 2 s


def test_every_object_can_be_matched_by_an_anchor():
    """The size range is chosen so that every box has IoU >= 0.5 with some anchor of the paper preset."""
    anchors = AnchorGenerator()((128, 128), [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])     # P3-P7 of 128 x 128
    best = [box_iou(target["boxes"], anchors).max(axis=1) for _, target in Shapes(200, seed=4) if len(target["boxes"])]
    assert np.concatenate(best).min() >= 0.5


def test_a_collated_batch_goes_through_the_model():
    md.manual_seed(0)
    model = RetinaNet(num_classes=len(Shapes.classes), backbone="resnet_small", fpn_channels=32)
    images, targets, sizes = collate([Shapes(2, image_size=64, seed=0, min_size=16, empty_fraction=0)[i]
                                      for i in range(2)])
    losses = model(images, targets)
    assert losses["num_positive"] > 0
    assert np.isfinite(losses["classification"].item()) and np.isfinite(losses["box_regression"].item())
    assert len(model.predict(images, sizes)) == 2


def test_each_image_is_drawn_once_and_read_back_unchanged(monkeypatch):
    dataset = Shapes(5, image_size=64, seed=3)
    drawn = []
    real = dataset._draw_pixels
    monkeypatch.setattr(dataset, "_draw_pixels", lambda index: drawn.append(index) or real(index))
    first = [dataset[i] for i in range(5)]
    first[2][1]["boxes"] += 50                             # a caller changing a target in place
    first[2][0][:] = 0
    again = [dataset[i] for i in range(5)] + [dataset[-1]]
    assert drawn == [0, 1, 2, 3, 4]
    for i, (image, target) in zip([0, 1, 2, 3, 4, 4], again):
        fresh_image, fresh_target, _ = Shapes(5, image_size=64, seed=3).draw(i)
        np.testing.assert_array_equal(image, fresh_image)
        np.testing.assert_array_equal(target["boxes"], fresh_target["boxes"])
        np.testing.assert_array_equal(target["labels"], fresh_target["labels"])
