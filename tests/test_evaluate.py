"""Evaluation: prediction in the original pixels (resize, normalise, pad, map back) and COCO mAP with pycocotools,
checked against APs worked out by hand."""

import json
import sys

import numpy as np
import pytest

from minidet import nn
from minidet.backend import to_numpy
from minidet.data import Shapes, collate, normalize, resize_image
from minidet.evaluate import EvalResult, coco_evaluate, evaluate, predict_dataset, predict_images, relabel_to_dataset
from minidet.models.retinanet import RetinaNet
from minidet.nn.init import manual_seed

# pycocotools is one of minidet's dependencies: a missing one fails these tests rather than skipping them. (The
# GPU suite runs only the gpu-marked tests, none of which are here, so its machine needs no pycocotools.)

EXACT = {"rel": 0, "abs": 1e-12}      # pycocotools averages in float64: the hand values must agree to rounding


class Boxes(list):
    """A dataset from a list of (image, target) pairs, with class names."""

    def __init__(self, items, classes):
        super().__init__(items)
        self.classes = classes


def item(boxes, labels, size=(100, 100)):
    """An (image, target) pair: a blank image of ``size`` (h, w) with the given boxes."""
    return (np.zeros((3, *size), dtype=np.float32),
            {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "labels": np.array(labels, dtype=np.int64)})


def detection(boxes, scores, labels):
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "scores": np.array(scores, dtype=np.float32),
            "labels": np.array(labels, dtype=np.int64)}


NO_DETECTIONS = detection([], [], [])


# --- coco_evaluate against hand-computed APs ------------------------------------------------------------------------
def test_ap_by_hand():
    # One image, two ground-truth boxes of class 0, A and B, each 40 x 40 (area 1600: "medium"). Three detections:
    #   0.9  exactly A                                 IoU 1 with A           TP at every threshold
    #   0.8  a 40 x 40 box that overlaps nothing       IoU 0                  FP
    #   0.7  the top 25 rows of B                      IoU 1000 / 1600 = 0.625 with B: TP at IoU 0.50, 0.55, 0.60,
    #                                                                          FP at 0.65 ... 0.95
    # At IoU <= 0.60, going down the scores: (precision, recall) = (1, 1/2), (1/2, 1/2), (2/3, 1). Interpolated
    # precision (the best at any recall >= r) is 1 for r <= 0.5 (the 51 points 0, 0.01, ..., 0.50) and 2/3 for the
    # 50 points above, so AP = (51 + 50 * 2/3) / 101.
    # At IoU >= 0.65 recall stops at 1/2: precision 1 at the 51 points up to 0.5, 0 above, so AP = 51 / 101.
    # AP = the mean over the 10 thresholds = (3 * (51 + 100/3) + 7 * 51) / 1010 = 610 / 1010.
    # AR100 = the mean over the thresholds of the final recall = (3 * 1 + 7 * 0.5) / 10 = 0.65.
    dataset = Boxes([item([[0, 0, 40, 40], [50, 50, 90, 90]], [0, 0])], classes=("thing",))
    detections = [detection([[0, 0, 40, 40], [0, 55, 40, 95], [50, 50, 90, 75]], [0.9, 0.8, 0.7], [0, 0, 0])]
    result = coco_evaluate(dataset, detections)

    assert result.ap50 == pytest.approx((51 + 50 * 2 / 3) / 101, **EXACT)
    assert result.ap75 == pytest.approx(51 / 101, **EXACT)
    assert result.ap == pytest.approx(610 / 1010, **EXACT)
    assert result.ar100 == pytest.approx(0.65, **EXACT)
    assert result.ap_medium == pytest.approx(result.ap, **EXACT)        # every box is medium
    assert result.ap_small == -1 and result.ap_large == -1              # no ground truth of those sizes
    assert result.per_class_ap == {"thing": pytest.approx(result.ap, **EXACT)}
    assert result.per_class_ap50 == {"thing": pytest.approx(result.ap50, **EXACT)}

    assert result.precision.shape == (10, 101, 1)
    np.testing.assert_array_equal(result.recall_points, np.linspace(0, 1, 101))
    np.testing.assert_allclose(result.iou_thresholds, np.arange(10) * 0.05 + 0.5, rtol=0, atol=1e-12)
    expected_at_50 = np.r_[np.ones(51), np.full(50, 2 / 3)]
    expected_at_75 = np.r_[np.ones(51), np.zeros(50)]
    np.testing.assert_allclose(result.precision[0, :, 0], expected_at_50, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.precision[5, :, 0], expected_at_75, rtol=0, atol=1e-12)


def test_perfect_detections_give_ap_1():
    dataset = Shapes(6, image_size=64, seed=0)
    targets = [target for _, target in dataset]
    assert sum(len(t["labels"]) for t in targets) > 0
    detections = [detection(t["boxes"], np.ones(len(t["labels"])), t["labels"]) for t in targets]
    result = coco_evaluate(dataset, detections)
    # Not exactly 1: pycocotools computes precision as tp / (tp + fp + eps).
    for name in ("ap", "ap50", "ap75", "ar100"):
        assert getattr(result, name) == pytest.approx(1, **EXACT), name
    present = {Shapes.classes[label] for t in targets for label in t["labels"]}
    for name in Shapes.classes:
        assert result.per_class_ap[name] == pytest.approx(1 if name in present else -1, **EXACT), name


def test_empty_detections_give_ap_0_without_crashing():
    # pycocotools' loadRes fails on an empty list of results; coco_evaluate must not.
    dataset = Boxes([item([[0, 0, 40, 40]], [0]), item([], [])], classes=("a", "b"))
    result = coco_evaluate(dataset, [NO_DETECTIONS, NO_DETECTIONS])
    assert result.ap == 0 and result.ap50 == 0 and result.ar100 == 0
    assert result.per_class_ap == {"a": 0, "b": -1}
    assert (result.precision[:, :, 0] == 0).all() and (result.precision[:, :, 1] == -1).all()


def test_no_ground_truth_and_no_detections_is_all_undefined():
    dataset = Boxes([item([], [])], classes=("a",))
    result = coco_evaluate(dataset, [NO_DETECTIONS])
    assert result.ap == -1 and result.ap50 == -1 and result.per_class_ap == {"a": -1}


def test_per_class_ap_with_two_classes():
    # Class 0: one box A, found exactly (0.9): AP 1 at every threshold.
    # Class 1: one box B. Detections of class 1, by score: 0.95 on A (the right box of the wrong class: a false
    # positive for class 1, and no help to class 0), 0.9 on empty space (FP), 0.8 exactly B (TP). Precision at
    # recall 1 is 1/3, the best at any recall, so the interpolated precision is 1/3 at all 101 points: AP 1/3.
    # The mean over the classes: (1 + 1/3) / 2 = 2/3.
    a, b, nothing = [0, 0, 40, 40], [50, 50, 90, 90], [0, 55, 40, 95]
    dataset = Boxes([item([a, b], [0, 1])], classes=("cat", "dog"))
    detections = [detection([a, a, nothing, b], [0.9, 0.95, 0.9, 0.8], [0, 1, 1, 1])]
    result = coco_evaluate(dataset, detections)
    assert result.per_class_ap == {"cat": pytest.approx(1, **EXACT), "dog": pytest.approx(1 / 3, **EXACT)}
    assert result.per_class_ap50 == {"cat": pytest.approx(1, **EXACT), "dog": pytest.approx(1 / 3, **EXACT)}
    assert result.ap == pytest.approx(2 / 3, **EXACT)
    np.testing.assert_allclose(result.precision[:, :, 1], 1 / 3, rtol=0, atol=1e-12)


def test_detections_are_matched_within_their_own_image():
    # Box A is in image 0 only. A detection at A in image 1 (0.9) is a false positive, then A in image 0 (0.8) is
    # the true positive: precision 1/2 at recall 1, AP 1/2. Mixing up the image ids would give AP 1.
    a = [0, 0, 40, 40]
    dataset = Boxes([item([a], [0]), item([], [])], classes=("a",))
    result = coco_evaluate(dataset, [detection([a], [0.8], [0]), detection([a], [0.9], [0])])
    assert result.ap == pytest.approx(0.5, **EXACT)


def test_class_without_ground_truth_is_reported_and_left_out_of_the_mean():
    a = [0, 0, 40, 40]
    dataset = Boxes([item([a], [0])], classes=("a", "b", "c"))
    # "c" has detections but no ground truth; "b" has neither.
    result = coco_evaluate(dataset, [detection([a, [50, 50, 90, 90]], [0.9, 0.8], [0, 2])])
    assert result.per_class_ap == {"a": pytest.approx(1, **EXACT), "b": -1, "c": -1}
    assert result.per_class_ap50 == {"a": pytest.approx(1, **EXACT), "b": -1, "c": -1}
    assert result.ap == pytest.approx(1, **EXACT)             # the mean over the classes that have ground truth
    assert (result.precision[:, :, 1:] == -1).all()

    summary = result.summary()
    lines = summary.splitlines()
    assert "AP 1.000" in lines[0] and "AP50 1.000" in lines[0]
    assert [line.split()[0] for line in lines[-3:]] == ["a", "b", "c"]
    assert "no ground truth" not in lines[-3] and all("no ground truth" in line for line in lines[-2:])

    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["per_class_ap"] == {"a": pytest.approx(1, **EXACT), "b": -1, "c": -1}
    assert set(as_json) == {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100", "per_class_ap",
                            "per_class_ap50"}


def test_coco_evaluate_rejects_bad_input():
    dataset = Boxes([item([[0, 0, 40, 40]], [0])], classes=("a",))
    with pytest.raises(ValueError, match="2 detection dicts for 1 images"):
        coco_evaluate(dataset, [NO_DETECTIONS, NO_DETECTIONS])
    with pytest.raises(ValueError, match="labels \\[3\\].*1 classes"):
        coco_evaluate(dataset, [detection([[0, 0, 4, 4]], [0.5], [3])])
    with pytest.raises(ValueError, match="no 'classes'"):
        coco_evaluate(list(dataset), [NO_DETECTIONS])


def test_missing_pycocotools_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)      # None in sys.modules makes the import fail
    dataset = Boxes([item([[0, 0, 40, 40]], [0])], classes=("a",))
    with pytest.raises(ImportError, match="pip install pycocotools"):
        coco_evaluate(dataset, [NO_DETECTIONS])


# --- prediction -----------------------------------------------------------------------------------------------------
class FractionModel(nn.Module):
    """A stand-in for RetinaNet whose one detection per image covers fixed fractions (x1, y1, x2, y2) of the image
    it was given (its size before padding), so where that box lands in the original pixels is known exactly. It
    records the batches and sizes it was called with."""

    def __init__(self, fractions=(0.25, 0.5, 0.75, 1.0)):
        super().__init__()
        self.weight = nn.Parameter(np.zeros(1, dtype=np.float32))      # predict_images puts the batch beside it
        self.fractions = fractions
        self.calls = []

    def predict(self, images, image_sizes):
        self.calls.append((to_numpy(images), list(image_sizes)))
        return [detection(expected_fraction_box(h, w, self.fractions), [0.5], [1]) for h, w in image_sizes]


def expected_fraction_box(height, width, fractions=(0.25, 0.5, 0.75, 1.0)):
    return np.array([fractions], dtype=np.float32) * np.array([width, height, width, height], dtype=np.float32)


def test_predict_images_prepares_like_training_and_maps_boxes_back():
    model = FractionModel()
    images = [np.random.default_rng(i).random((3, *size), dtype=np.float32) for i, size in
              enumerate([(30, 50), (45, 20)])]
    detections = predict_images(model, images, min_size=60, max_size=100)
    # Image 0: shorter side 30 -> 60, scale 2 (the longer side, 100, is just under the cap). Image 1: 20 -> 60 would
    # make the longer side 135 > 100, so the longer side is capped at 100: 100 x 44.
    (batch, sizes), = model.calls
    assert sizes == [(60, 100), (100, 44)]
    assert batch.shape == (2, 3, 128, 128) and batch.dtype == np.float32           # padded to multiples of 32
    for n, (image, (h, w)) in enumerate(zip(images, sizes)):
        np.testing.assert_array_equal(batch[n, :, :h, :w], normalize(resize_image(image, (h, w))))
        assert not batch[n, :, h:].any() and not batch[n, :, :, w:].any()           # zero padding
    for det, image in zip(detections, images):
        np.testing.assert_allclose(det["boxes"], expected_fraction_box(*image.shape[1:]), rtol=1e-6, atol=1e-5)
        assert det["boxes"].dtype == np.float32 and det["scores"].dtype == np.float32
        assert det["labels"].dtype == np.int64 and det["labels"].tolist() == [1]


def test_whole_image_box_maps_back_to_exactly_the_whole_image():
    # 10 x 14 with min_size 64 is resized to 64 x 90, scale (90 / 14, 6.4). Mapping x = 90 back in float32 gives
    # 14.000001: a box edge just past the border, unless it is clipped.
    image = np.zeros((3, 10, 14), dtype=np.float32)
    detection_, = predict_images(FractionModel(fractions=(0, 0, 1, 1)), [image], min_size=64)
    np.testing.assert_array_equal(detection_["boxes"], [[0, 0, 14, 10]])


def test_predict_images_without_resize_and_in_batches():
    model = FractionModel()
    sizes = [(40, 70), (64, 33), (17, 90)]
    images = [np.zeros((3, *size), dtype=np.float32) for size in sizes]
    detections = predict_images(model, images, batch_size=2)
    assert [call[1] for call in model.calls] == [sizes[:2], sizes[2:]]
    assert [call[0].shape for call in model.calls] == [(2, 3, 64, 96), (1, 3, 32, 96)]
    for det, size in zip(detections, sizes):
        np.testing.assert_array_equal(det["boxes"], expected_fraction_box(*size))


def test_predict_dataset_keeps_dataset_order():
    sizes = [(40, 70), (64, 33), (17, 90), (32, 32), (50, 10)]
    dataset = Boxes([item([], [], size) for size in sizes], classes=("a", "b"))
    detections = predict_dataset(FractionModel(), dataset, batch_size=2, progress=False)
    assert len(detections) == len(sizes)
    for det, size in zip(detections, sizes):
        np.testing.assert_array_equal(det["boxes"], expected_fraction_box(*size))


def test_predict_images_rejects_bad_images():
    model = FractionModel()
    with pytest.raises(ValueError, match="transpose"):
        predict_images(model, [np.zeros((32, 32, 3), dtype=np.float32)])
    with pytest.raises(TypeError, match="divide by 255"):
        predict_images(model, [np.zeros((3, 32, 32), dtype=np.uint8)])
    with pytest.raises(ValueError, match="values in \\[0, 255\\]; expected \\[0, 1\\]"):
        predict_images(model, [np.linspace(0, 255, 3 * 32 * 32, dtype=np.float32).reshape(3, 32, 32)])
    assert model.calls == []


def test_max_size_alone_only_shrinks_the_images_longer_than_it():
    model = FractionModel()
    sizes = [(40, 70), (300, 200)]
    detections = predict_images(model, [np.zeros((3, *size), dtype=np.float32) for size in sizes], max_size=100)
    assert model.calls[0][1] == [(40, 70), (100, 67)]                  # 300 x 200 -> longer side 100
    for det, size in zip(detections, sizes):
        np.testing.assert_allclose(det["boxes"], expected_fraction_box(*size), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    """A real, untrained RetinaNet; score_thresh 0 so its random weights still give detections to check."""
    manual_seed(0)
    return RetinaNet(2, backbone="resnet_small", fpn_channels=16, score_thresh=0.0)


def test_real_model_boxes_are_in_the_original_pixels(tiny_model):
    image = np.random.default_rng(0).random((3, 40, 60), dtype=np.float32)
    detection_, = predict_images(tiny_model, [image], min_size=80)
    # The oracle: resize by hand to 80 x 120 (scale exactly 2), predict, halve the boxes.
    batch, _, sizes = collate([(normalize(resize_image(image, (80, 120))), {"boxes": np.zeros((0, 4)),
                                                                              "labels": np.zeros(0)})])
    by_hand = tiny_model.predict(batch, sizes)[0]
    assert len(detection_["boxes"]) > 0
    np.testing.assert_array_equal(detection_["boxes"], to_numpy(by_hand["boxes"]) / 2)
    np.testing.assert_array_equal(detection_["scores"], to_numpy(by_hand["scores"]))
    np.testing.assert_array_equal(detection_["labels"], to_numpy(by_hand["labels"]))
    boxes = detection_["boxes"]
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 60).all() and (boxes[:, [1, 3]] <= 40).all()
    # Some boxes reach beyond the original image if the scale is not undone.
    assert (to_numpy(by_hand["boxes"])[:, [0, 2]] > 60).any()


def test_real_model_resize_to_own_size_changes_nothing(tiny_model):
    image = np.random.default_rng(1).random((3, 64, 96), dtype=np.float32)
    plain, = predict_images(tiny_model, [image])
    resized, = predict_images(tiny_model, [image], min_size=64)        # shorter side already 64: scale 1
    capped, = predict_images(tiny_model, [image], max_size=96)         # longer side already 96: scale 1
    for key in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(resized[key], plain[key])
        np.testing.assert_array_equal(capped[key], plain[key])


def test_real_model_images_of_different_sizes_in_one_batch(tiny_model):
    sizes = [(40, 70), (64, 33)]
    images = [np.random.default_rng(i).random((3, *size), dtype=np.float32) for i, size in enumerate(sizes)]
    detections = predict_images(tiny_model, images, batch_size=2, min_size=50)
    assert len(detections) == 2
    for det, (h, w) in zip(detections, sizes):
        boxes = det["boxes"]
        assert len(boxes) > 0 and boxes.dtype == np.float32
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        assert det["scores"].shape == det["labels"].shape == (len(boxes),)
        assert (np.diff(det["scores"]) <= 0).all()                     # highest first


def test_evaluate_is_predict_then_score(tiny_model):
    dataset = Shapes(2, image_size=64, seed=1)
    result, detections = evaluate(tiny_model, dataset, batch_size=2, progress=False)
    assert isinstance(result, EvalResult) and len(detections) == 2
    predicted = predict_dataset(tiny_model, dataset, batch_size=2, progress=False)
    for det, again in zip(detections, predicted):
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(det[key], again[key])
    assert result.to_dict() == coco_evaluate(dataset, predicted).to_dict()
    assert 0 <= result.ap <= 1 and 0 <= result.ap50 <= 1


def test_relabel_to_dataset_maps_by_name_and_refuses_other_classes():
    found = [{"boxes": np.zeros((3, 4), np.float32), "labels": np.array([0, 2, 1])}]
    assert relabel_to_dataset(found, ["a", "b", "c"], ("a", "b", "c")) is found
    relabelled, = relabel_to_dataset(found, ["a", "b", "c"], ("c", "a", "b"))
    assert relabelled["labels"].tolist() == [1, 0, 2] and found[0]["labels"].tolist() == [0, 2, 1]
    assert relabel_to_dataset(found, 3, ("x", "y", "z")) is found           # only a count is known: it agrees
    with pytest.raises(ValueError, match="the model has 2 classes and the dataset 3"):
        relabel_to_dataset(found, 2, ("x", "y", "z"))
    with pytest.raises(ValueError, match=r"only the model's: \['b'\]; only the dataset's: \['d'\]"):
        relabel_to_dataset(found, ["a", "b", "c"], ("a", "d", "c"))
