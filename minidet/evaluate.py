"""Evaluation: run a trained RetinaNet over images or a dataset, and score its detections with COCO's mAP.

Two steps, kept apart so each can be used alone:

    predict_dataset(model, dataset)     images -> detections in each image's own pixels
    coco_evaluate(dataset, detections)  detections + the dataset's boxes -> EvalResult (AP, AP50, AP75, ...)

``evaluate`` does both. Images are prepared exactly as ``train.training_batch`` prepares them (``normalize``, then
``collate`` pads to multiples of 32), without the random flip; with ``min_size`` or ``max_size`` they are first
resized as in training (``minidet.data.transforms.resize_factor``) and the detections are mapped back to the
original pixels, so the boxes are always in the frame of the image the dataset gave.

The metric is COCO's, computed by pycocotools itself (not re-implemented): for each class, detections of all images
are sorted by score and matched greedily to unmatched ground-truth boxes at an IoU threshold; precision is made
monotone (the best precision at any higher recall) and read at 101 recall points 0, 0.01, ..., 1; AP is their mean,
and "AP" without a number is the mean over the IoU thresholds 0.50, 0.55, ..., 0.95 and over the classes.
"""

import contextlib
import dataclasses
import io
import math

import numpy as np

from minidet import backend
from minidet.boxes import clip_boxes
from minidet.data.transforms import batches, collate, normalize, resize, scale_boxes_back
from minidet.progress import progress_bar

RECALL_POINTS = np.linspace(0, 1, 101)


def average_precision(scores, is_true_positive, num_ground_truth):
    """COCO's AP of one class at one IoU threshold, from its detections already matched to the boxes.

    The arithmetic pycocotools does after its matching (``coco_evaluate`` leaves all of it to pycocotools; this is
    the same computation written out, for teaching and the course's exercises): sort the detections by score,
    highest first (ties keep their order); after each one, precision = true positives so far / detections so far
    and recall = true positives so far / ``num_ground_truth``; make precision monotone (at each point, the best
    precision at this recall or any higher one); read it at the 101 recall levels 0, 0.01, ..., 1, taking the first
    point that reaches each level (0 for a level no point reaches); AP is the mean of the 101 values.

    Args:
        scores: (D,) the detections' scores. is_true_positive: (D,) bool, whether each matched a box.
        num_ground_truth: the number of ground-truth boxes of the class, at least 1.
    """
    if num_ground_truth < 1:
        raise ValueError("average_precision: no ground-truth boxes, so recall and AP are undefined "
                         "(pycocotools leaves such a class out of the mean)")
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.cumsum(np.asarray(is_true_positive, dtype=bool)[order])                    # (D,)
    precision = hits / np.arange(1, len(order) + 1)
    recall = hits / num_ground_truth
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    first = np.searchsorted(recall, RECALL_POINTS, side="left")                           # (101,)
    reached = first < len(recall)
    return float(np.where(reached, envelope[np.minimum(first, len(recall) - 1)], 0).mean())


# --- prediction -----------------------------------------------------------------------------------------------------
def _check_image(image, index):
    """Raise, naming image ``index`` and the fix, unless ``image`` is a (3, H, W) float array in [0, 1]."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"predict_images: image {index} has shape {tuple(image.shape)}; expected (3, H, W), channels "
                         "first (for an (H, W, 3) array use image.transpose(2, 0, 1))")
    if image.dtype.kind != "f":
        raise TypeError(f"predict_images: image {index} is {image.dtype}; expected float32 in [0, 1] (for 8-bit "
                        "pixels use minidet.data.shapes.to_float_image, or divide by 255)")
    low, high = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"predict_images: image {index} has NaN or infinite pixels; expected values in [0, 1]")
    if low < 0 or high > 1:
        raise ValueError(f"predict_images: image {index} has values in [{low:g}, {high:g}]; expected [0, 1]. Give the "
                         "raw image: predict_images normalises it itself (and 0..255 pixels need dividing by 255)")


def _model_device(model):
    """``"cpu"`` or ``"cuda"``: where the model's weights are, so the batch can be put beside them."""
    return model.parameters()[0].device


def predict_images(model, images, batch_size=8, min_size=None, max_size=None):
    """Detect objects in images of any sizes, with boxes in each image's own pixels.

    Each image is (optionally) resized, normalised as in training, and batched with ``collate`` (zero padding at the
    bottom and right to multiples of 32); ``model.predict`` clips each image's boxes to its size before padding,
    and the boxes are then mapped back to the original image with ``scale_boxes_back``.

    Args:
        model: a ``RetinaNet`` (or anything with ``predict(images, image_sizes)`` and ``parameters()``), on the CPU
            or a GPU; its mode is left as it was.
        images: a list of N (3, H_i, W_i) float32 arrays in [0, 1], not normalised.
        batch_size: how many images go through the network at once.
        min_size, max_size: each image is first resized so its shorter side is ``min_size`` pixels, unless its
            longer side would then exceed ``max_size``; without ``min_size``, only images longer than ``max_size``
            are made smaller (see ``resize_factor``). Give the values the model was trained with (a checkpoint's
            ``config.min_size`` and ``config.max_size``); None and None (default): the images as they are.

    Returns:
        a list of N dicts {"boxes": (D_i, 4) float32 (x1, y1, x2, y2) in pixels of image i, inside it;
        "scores": (D_i,) float32, highest first; "labels": (D_i,) int64 in 0..K-1}, NumPy arrays.
    """
    if batch_size < 1:
        raise ValueError(f"predict_images: batch_size must be at least 1, got {batch_size}")
    device = _model_device(model)
    no_boxes = np.zeros((0, 4), dtype=np.float32)
    no_labels = np.zeros(0, dtype=np.int64)
    detections = []
    for start in range(0, len(images), batch_size):
        prepared, scales, original_sizes = [], [], []
        for index, image in enumerate(images[start:start + batch_size], start):
            image = np.asarray(image)
            _check_image(image, index)
            original_sizes.append(image.shape[1:])
            image, _, scale = resize(image, no_boxes, min_size, max_size)
            scales.append(scale)
            prepared.append((normalize(image), {"boxes": no_boxes, "labels": no_labels}))
        batch, _, image_sizes = collate(prepared)                       # (n, 3, H, W), H and W multiples of 32
        outputs = model.predict(backend.to_device(batch, device), image_sizes)
        for output, scale, size in zip(outputs, scales, original_sizes):
            boxes = scale_boxes_back(backend.to_numpy(output["boxes"]), scale)      # (D, 4) original pixels
            # The model clipped the boxes to the resized image, but the two scale factors are rounded ratios of
            # whole pixel counts, so an edge can land a float32 rounding error past the original border.
            detections.append({"boxes": clip_boxes(boxes, size),
                               "scores": backend.to_numpy(output["scores"]).astype(np.float32),
                               "labels": backend.to_numpy(output["labels"]).astype(np.int64)})
    return detections


def predict_dataset(model, dataset, batch_size=8, min_size=None, max_size=None, progress=True):
    """``predict_images`` over a dataset of ``(image, target)`` pairs (the targets are not used).

    Args:
        model, batch_size, min_size, max_size: as for ``predict_images``.
        dataset: a sequence of (image (3, H, W) float32 in [0, 1], target).
        progress: show a progress bar (on a terminal or in a Jupyter notebook; never into a log file).

    Returns:
        a list of ``len(dataset)`` detection dicts, in dataset order, as ``predict_images`` returns them.
    """
    if batch_size < 1:
        raise ValueError(f"predict_dataset: batch_size must be at least 1, got {batch_size}")
    detections = []
    bar = progress_bar(progress, total=len(dataset), unit="image", desc="predict", dynamic_ncols=True)
    try:
        for items in batches(dataset, batch_size):
            detections.extend(predict_images(model, [image for image, _ in items], batch_size=len(items),
                                             min_size=min_size, max_size=max_size))
            bar.update(len(items))
    finally:
        bar.close()
    return detections


def relabel_to_dataset(detections, model_classes, dataset_classes):
    """Detections whose labels are the model's, with labels that are the dataset's, matched by class name.

    A model's label k means its k-th class; a dataset may list the same classes in another order (a COCO file's
    categories sorted by other ids), and then label k must be renamed before scoring, or a correct "cat" detection
    counts as a wrong "dog". Classes that are not the same set cannot be scored at all.

    Args:
        detections: dicts with "labels" (D,) in 0..K-1 of ``model_classes``.
        model_classes, dataset_classes: the K class names of each, or None where only a count is known
            (``model_classes`` may then be an int K).

    Returns:
        the detections with "labels" in the dataset's numbering (the same list when the orders agree).

    Raises:
        ValueError: the two are not the same classes (named in the message).
    """
    if model_classes is None or isinstance(model_classes, int) or dataset_classes is None:
        count = model_classes if isinstance(model_classes, int) else None
        if count is not None and dataset_classes is not None and count != len(dataset_classes):
            raise ValueError(f"the model has {count} classes and the dataset {len(dataset_classes)}; evaluate on "
                             "data with the classes the model was trained on")
        return detections
    model_classes, dataset_classes = list(model_classes), list(dataset_classes)
    if model_classes == dataset_classes:
        return detections
    if sorted(model_classes) != sorted(dataset_classes) or len(set(model_classes)) != len(model_classes):
        only_model = sorted(set(model_classes) - set(dataset_classes))
        only_data = sorted(set(dataset_classes) - set(model_classes))
        raise ValueError(f"the model was trained on the classes {model_classes} and the dataset has "
                         f"{dataset_classes} (only the model's: {only_model}; only the dataset's: {only_data}); "
                         "evaluate on data with the classes the model was trained on")
    to_dataset = np.array([dataset_classes.index(name) for name in model_classes], dtype=np.int64)   # (K,)
    return [{**found, "labels": to_dataset[found["labels"]]} for found in detections]


# --- the COCO metric ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalResult:
    """COCO bbox metrics, as pycocotools computes them.

    Every value is a float in [0, 1], or -1 where pycocotools has nothing to measure: no ground-truth box in that
    size range (``ap_small`` with no box under 32 x 32 pixels), or, per class, no ground-truth box of that class.
    Classes without ground truth are left out of the means, as pycocotools does.

    Attributes:
        ap: AP averaged over IoU 0.50:0.95 and the classes (COCO's headline number), 100 detections per image.
        ap50, ap75: AP at IoU 0.50 (the PASCAL VOC metric) and at IoU 0.75.
        ap_small, ap_medium, ap_large: AP for ground-truth areas < 32^2, 32^2 to 96^2, > 96^2 pixels.
        ar100: recall averaged over IoU 0.50:0.95 and the classes, with 100 detections per image.
        per_class_ap, per_class_ap50: class name -> its AP at IoU 0.50:0.95, and at IoU 0.50.
        precision: (10, 101, K) interpolated precision at each IoU threshold, recall point and class, for all areas
            and 100 detections per image (pycocotools' ``eval["precision"][:, :, :, 0, -1]``); -1 where the class
            has no ground truth. AP at threshold t of class k is ``precision[t, :, k].mean()``.
        recall_points: (101,) the recall levels 0, 0.01, ..., 1 of ``precision``'s second axis.
        iou_thresholds: (10,) the IoU thresholds 0.50, 0.55, ..., 0.95 of its first axis.
    """

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar100: float
    per_class_ap: dict
    per_class_ap50: dict
    precision: np.ndarray
    recall_points: np.ndarray
    iou_thresholds: np.ndarray

    def summary(self):
        """A few lines of text: the headline numbers, then a table of AP and AP50 per class."""
        def number(value):
            return "  n/a" if value < 0 else f"{value:.3f}"

        width = max([len("class")] + [len(name) for name in self.per_class_ap])
        lines = [f"AP {number(self.ap)}   AP50 {number(self.ap50)}   AP75 {number(self.ap75)}   "
                 f"(COCO bbox, IoU 0.50:0.95, 100 detections per image)",
                 f"AP small {number(self.ap_small)}   medium {number(self.ap_medium)}   "
                 f"large {number(self.ap_large)}   AR100 {number(self.ar100)}",
                 f"{'class':<{width}}  AP     AP50"]
        for name, ap in self.per_class_ap.items():
            note = "  (no ground truth)" if ap < 0 else ""
            lines.append(f"{name:<{width}}  {number(ap)}  {number(self.per_class_ap50[name])}{note}")
        return "\n".join(lines)

    def to_dict(self):
        """The numbers as plain Python floats and dicts, ready for ``json.dumps`` (the arrays are left out)."""
        names = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100")
        result = {name: float(getattr(self, name)) for name in names}
        result["per_class_ap"] = {name: float(v) for name, v in self.per_class_ap.items()}
        result["per_class_ap50"] = {name: float(v) for name, v in self.per_class_ap50.items()}
        return result


def _check_labels(labels, num_classes, what):
    """Raise unless every label is in 0..K-1: pycocotools would silently ignore any other."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"coco_evaluate: {what} has labels {sorted(set(labels.tolist()))}, but the dataset has "
                         f"{num_classes} classes (labels 0..{num_classes - 1}); does the model's num_classes match "
                         "the dataset's classes?")


def _coco_ground_truth(dataset):
    """The dataset's boxes as a COCO annotations dict, with the ids ``export_coco`` gives.

    Image ids are 1..N in dataset order; category ids are 1..K for labels 0..K-1; each box becomes
    ``bbox = [x1, y1, x2 - x1, y2 - y1]`` with ``area = w * h`` and ``iscrowd = 0``.

    Args:
        dataset: a sequence of (image (3, H, W), {"boxes": (G, 4), "labels": (G,)}) with a ``classes`` attribute.

    Returns:
        {"images": [...], "annotations": [...], "categories": [...]}, plain Python numbers.
    """
    num_classes = len(dataset.classes)
    images, annotations = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        images.append({"id": index + 1, "width": int(image.shape[-1]), "height": int(image.shape[-2])})
        boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)      # (G, 4)
        labels = np.asarray(target["labels"], dtype=np.int64).reshape(-1)         # (G,)
        _check_labels(labels, num_classes, f"the target of image {index}")
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(dataset.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco_results(detections, num_classes):
    """Detections as COCO's results list: one {"image_id", "category_id", "bbox": [x, y, w, h], "score"} per box.

    Args:
        detections: a list of N dicts {"boxes": (D_i, 4) (x1, y1, x2, y2), "scores": (D_i,), "labels": (D_i,)};
            image i gets id i + 1 and label k category id k + 1, as in ``_coco_ground_truth``.
        num_classes: K, to check the labels against.
    """
    results = []
    for index, detection in enumerate(detections):
        boxes = backend.to_numpy(detection["boxes"]).astype(np.float64).reshape(-1, 4)    # (D, 4)
        scores = backend.to_numpy(detection["scores"]).astype(np.float64).reshape(-1)     # (D,)
        labels = backend.to_numpy(detection["labels"]).astype(np.int64).reshape(-1)       # (D,)
        _check_labels(labels, num_classes, f"the detections of image {index}")
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": index + 1, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})
    return results


def coco_evaluate(dataset, detections):
    """COCO bbox mAP of ``detections`` on ``dataset``, computed in memory by pycocotools.

    Args:
        dataset: a sequence of (image, {"boxes": (G, 4), "labels": (G,)}) with the class names in ``classes``.
        detections: one dict per image of ``dataset``, in its order, as ``predict_dataset`` returns them: {"boxes":
            (D, 4) (x1, y1, x2, y2) in the image's pixels, "scores": (D,), "labels": (D,) in 0..K-1}. Empty
            detections are fine: every class with ground truth then has AP 0.

    Returns:
        an ``EvalResult``.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("coco_evaluate needs pycocotools, which computes COCO's mAP: pip install pycocotools") \
            from error
    if not hasattr(dataset, "classes"):
        raise ValueError("coco_evaluate: the dataset has no 'classes' (the names of labels 0..K-1); add a 'classes' "
                         "attribute, as Shapes and CocoDataset have")
    if len(dataset) == 0:
        raise ValueError("coco_evaluate: the dataset is empty; there is nothing to score")
    if len(detections) != len(dataset):
        raise ValueError(f"coco_evaluate: {len(detections)} detection dicts for {len(dataset)} images; give one per "
                         "image, in dataset order (as predict_dataset returns them)")
    classes = tuple(dataset.classes)
    ground_truth = _coco_ground_truth(dataset)
    results = _coco_results(detections, len(classes))

    # pycocotools prints every step (index creation, timings, the 12-line summary): keep it off the user's screen.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = ground_truth
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            # loadRes looks at results[0] to tell boxes from captions or masks, so it fails on an empty list. An
            # index with the same images and categories and no annotations is what it would have built.
            coco_dt = COCO()
            coco_dt.dataset = {"images": ground_truth["images"], "categories": ground_truth["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    # eval["precision"] is (IoU thresholds T, recall points R, classes K, area ranges A, max detections M); area
    # range 0 is "all" and the last max-detections setting is 100.
    precision = np.array(evaluator.eval["precision"][:, :, :, 0, -1])        # (10, 101, K)
    per_class_ap, per_class_ap50 = {}, {}
    for k, name in enumerate(classes):
        # A class with no ground truth is -1 at every threshold and recall point; with some, nowhere.
        has_ground_truth = bool((precision[:, :, k] > -1).all())
        per_class_ap[name] = float(precision[:, :, k].mean()) if has_ground_truth else -1.0
        per_class_ap50[name] = float(precision[0, :, k].mean()) if has_ground_truth else -1.0
    stats = [float(s) for s in evaluator.stats]
    return EvalResult(ap=stats[0], ap50=stats[1], ap75=stats[2], ap_small=stats[3], ap_medium=stats[4],
                      ap_large=stats[5], ar100=stats[8], per_class_ap=per_class_ap, per_class_ap50=per_class_ap50,
                      precision=precision, recall_points=np.array(evaluator.params.recThrs),
                      iou_thresholds=np.array(evaluator.params.iouThrs))


def evaluate(model, dataset, batch_size=8, min_size=None, max_size=None, progress=True):
    """Predict on every image of ``dataset`` and score the detections with COCO's mAP.

    Args: as for ``predict_dataset``.

    Returns:
        (``EvalResult``, detections): the metrics, and the list of detection dicts per image in dataset order.
    """
    detections = predict_dataset(model, dataset, batch_size=batch_size, min_size=min_size, max_size=max_size,
                                 progress=progress)
    return coco_evaluate(dataset, detections), detections


__all__ = ["EvalResult", "predict_images", "predict_dataset", "relabel_to_dataset", "coco_evaluate", "evaluate"]
