"""COCO-format folders: ``export_coco`` writes one, ``CocoDataset`` reads one.

A COCO-format folder is ``images/`` plus ``annotations.json``::

    {"images":      [{"id": 1, "file_name": "000000.png", "width": 128, "height": 128}, ...],
     "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [x, y, w, h], "area": w * h,
                      "iscrowd": 0}, ...],
     "categories":  [{"id": 1, "name": "circle"}, ...]}

COCO boxes are ``[x, y, w, h]`` in pixels (top-left corner, width, height); minidet's are ``(x1, y1, x2, y2)`` with
``x2 = x + w`` and ``y2 = y + h``. COCO category ids are any integers; minidet's labels are 0..K-1, given to the
categories in order of increasing id, with the names in ``classes``.

Bad annotations are never dropped silently: each one is reported with the file and the annotation's index and
id. By default (``on_error="fail"``) the reader stops with a ``ValueError`` that lists them; with
``on_error="skip"`` it leaves them out, keeps the list in ``dataset.problems`` and says so with a warning.
Crowd annotations (``iscrowd: 1``, a region of many objects) are skipped as COCO's own tools do, and listed in
``dataset.notes``.
"""

import json
import math
import os
import warnings

import matplotlib.image
import numpy as np
import PIL.Image

from minidet.checkpoint import write_atomically
from minidet.data.shapes import to_float_image

# How far (in pixels) a box may stick out of its image before it counts as bad. Within it, the box is clipped:
# annotation tools often round a box edge half a pixel past the border.
OUT_OF_IMAGE_TOLERANCE = 1.0

ON_ERROR = ("fail", "skip")


def write_json(data, path):
    """Write ``data`` as JSON to ``path`` atomically."""
    write_atomically(path, lambda f: f.write(json.dumps(data).encode()))


def to_uint8(image):
    """(3, H, W) float image in [0, 1] -> (H, W, 3) uint8, rounding to the nearest of the 256 levels."""
    image = np.asarray(image, dtype=np.float32)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def export_coco(dataset, folder):
    """Write ``dataset`` as a COCO-format folder: ``folder/images/NNNNNN.png`` and ``folder/annotations.json``.

    Images are saved as 8-bit RGB PNGs with Pillow (a dependency of matplotlib). That is lossless for images
    that are already multiples of 1/255, as ``Shapes`` images are: reading them back gives the same float32
    bits; other images are rounded to the nearest 1/255. Image ids are 1..N in dataset order; category
    ids are 1..K for labels 0..K-1; boxes are written as [x, y, w, h] floats. Every file is written to a
    temporary name and renamed when complete; the annotations go last, so a folder with an ``annotations.json``
    has all its images.

    Args:
        dataset: a sequence of (image (3, H, W) float32 in [0, 1], {"boxes": (G, 4), "labels": (G,)}) with a
            ``classes`` attribute (the names of labels 0..K-1).
        folder: the output folder (created if missing).

    Returns:
        the path of the annotations file.
    """
    images_dir = os.path.join(folder, "images")
    os.makedirs(images_dir, exist_ok=True)
    images, annotations = [], []
    digits = max(6, len(str(len(dataset) - 1)))
    for index in range(len(dataset)):
        image, target = dataset[index]
        file_name = f"{index:0{digits}d}.png"
        pixels = to_uint8(image)                                                   # (H, W, 3)
        write_atomically(os.path.join(images_dir, file_name),
                         lambda f, pixels=pixels: PIL.Image.fromarray(pixels).save(f, format="PNG"))
        height, width = pixels.shape[:2]
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
        for box, label in zip(boxes, np.asarray(target["labels"]).reshape(-1)):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": int(label) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(dataset.classes)]
    path = os.path.join(folder, "annotations.json")
    write_json({"images": images, "annotations": annotations, "categories": categories}, path)
    return path


def read_image(path):
    """Read an image file as (3, H, W) float32 in [0, 1]: alpha dropped, grey copied to three channels.

    8-bit PNGs come back as ``uint8 / 255`` in float32 (matplotlib's ``imread``), other 8-bit formats are divided
    the same way, so the values do not depend on the format.
    """
    try:
        pixels = matplotlib.image.imread(path)
    except (OSError, SyntaxError, ValueError) as error:   # PIL's errors for broken files are of these kinds
        raise ValueError(f"{path}: cannot be decoded as an image ({type(error).__name__}: {error}); replace the "
                         "file, or leave it out of the annotations") from error
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = pixels[:, :, :3]                                             # drop alpha
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)                             # grey -> RGB
    if pixels.dtype == np.uint8:
        return to_float_image(pixels)
    return np.ascontiguousarray(pixels.astype(np.float32).transpose(2, 0, 1))


def _check_on_error(on_error, who):
    if on_error not in ON_ERROR:
        raise ValueError(f"{who}: on_error must be 'fail' or 'skip', got {on_error!r}")


def report_problems(problems, source, on_error, what="annotations"):
    """Fail with every problem listed, or warn that they were skipped (``on_error`` "fail" or "skip")."""
    if not problems:
        return
    listing = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    if on_error == "fail":
        raise ValueError(f"{source}: {len(problems)} bad {what}:\n  {listing}\nFix them, or pass on_error='skip' "
                         f"to leave them out (each one skipped is still reported)")
    warnings.warn(f"{source}: skipped {len(problems)} bad {what}:\n  {listing}", stacklevel=3)


class CocoDataset:
    """A COCO-format dataset: ``dataset[i]`` is ``(image, target)`` for the i-th image of the annotations file.

    Args:
        source: a folder holding ``images/`` and ``annotations.json``, or a pair ``(images_dir, annotations_json)``.
        on_error: "fail" (default): stop with a ``ValueError`` listing every bad annotation; "skip": leave them out,
            list them in ``problems`` and warn. Bad means: a bbox that is not 4 finite numbers, width or height
            <= 0, a box more than ``OUT_OF_IMAGE_TOLERANCE`` pixels outside its image, an unknown category or image
            id, or an image whose file is missing (skipping drops the image).

    Attributes:
        classes: tuple of K names; label k is the k-th category in order of increasing COCO id.
        category_ids: tuple of K COCO category ids, ``category_ids[label]``.
        image_ids, file_names: per item, the COCO image id and the image's path.
        problems: the bad annotations and images that were skipped (empty after "fail" succeeds).
        notes: crowd annotations that were skipped, as COCO's tools do.

    Items:
        image: (3, H, W) float32 in [0, 1]; target: {"boxes": (G, 4) float32 (x1, y1, x2, y2), "labels": (G,) int64}.
    """

    def __init__(self, source, on_error="fail"):
        _check_on_error(on_error, "CocoDataset")
        images_dir, annotations_path = _dataset_paths(source)
        self.images_dir, self.annotations_path, self.on_error = images_dir, annotations_path, on_error
        coco = _read_annotations(annotations_path)
        self.problems, self.notes = [], []
        label_of = self._read_categories(coco["categories"])
        images, duplicates = self._read_images(coco["images"])
        boxes, labels = self._read_boxes(coco, images, duplicates, label_of)
        report_problems(self.problems, annotations_path, on_error)
        if self.notes:
            warnings.warn(f"{annotations_path}: skipped {len(self.notes)} crowd annotations (iscrowd=1); "
                          "see dataset.notes", stacklevel=2)

        self.image_ids = tuple(images)
        self.file_names = tuple(os.path.join(images_dir, images[i]["file_name"]) for i in self.image_ids)
        self.sizes = tuple((images[i]["height"], images[i]["width"]) for i in self.image_ids)
        self.targets = tuple({"boxes": np.array(boxes[i], dtype=np.float32).reshape(-1, 4),
                              "labels": np.array(labels[i], dtype=np.int64)} for i in self.image_ids)

    def _read_categories(self, categories):
        """Set ``category_ids`` and ``classes`` (by increasing id); returns {COCO category id: label}."""
        ids = [c.get("id") for c in categories]
        if not all(isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{self.annotations_path}: every category needs a distinct integer 'id' (and a "
                             f"'name'); got ids {ids}")
        names = [str(c.get("name", c["id"])) for c in categories]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"{self.annotations_path}: the category names {twice} are given to more than one id; "
                             "each class needs its own name")
        categories = sorted(categories, key=lambda c: c["id"])
        self.category_ids = tuple(int(c["id"]) for c in categories)
        self.classes = tuple(str(c.get("name", c["id"])) for c in categories)
        return {cid: k for k, cid in enumerate(self.category_ids)}

    def _read_images(self, entries):
        """The usable images, {id: entry} in file order, and the ids given to more than one entry; the others
        join ``problems`` (a missing or unreadable file, a wrong size, a shared id)."""
        images, duplicates = {}, set()
        for index, entry in enumerate(entries):
            where = f"image {index} (id {entry.get('id')}, {entry.get('file_name')!r})"
            path = os.path.join(self.images_dir, str(entry.get("file_name")))
            if entry.get("id") in images or entry.get("id") in duplicates:
                duplicates.add(entry.get("id"))
                self.problems.append(f"{where}: another image has the id {entry.get('id')} too")
            elif not os.path.isfile(path):
                self.problems.append(f"{where}: file {path} is missing")
            elif not all(isinstance(entry.get(k), int) and entry[k] > 0 for k in ("width", "height")):
                self.problems.append(f"{where}: width and height must be positive integers")
            else:
                problem = _check_image_file(path, entry)
                if problem:
                    self.problems.append(f"{where}: {problem}")
                else:
                    images[entry["id"]] = entry
        for image_id in duplicates:             # which of the entries is right cannot be known: none is used
            images.pop(image_id, None)
        return images, duplicates

    def _read_boxes(self, coco, images, duplicates, label_of):
        """Each usable image's boxes and labels, {image id: list}; bad annotations join ``problems``, crowd
        annotations ``notes``."""
        known_image_ids = {entry.get("id") for entry in coco["images"]}
        boxes = {image_id: [] for image_id in images}
        labels = {image_id: [] for image_id in images}
        annotation_ids = set()
        for index, ann in enumerate(coco["annotations"]):
            where = f"annotation {index} (id {ann.get('id')}, image_id {ann.get('image_id')})"
            image_id = ann.get("image_id")
            if ann.get("id") is not None and ann.get("id") in annotation_ids:
                self.problems.append(f"{where}: another annotation has the id {ann.get('id')} too")
                continue
            annotation_ids.add(ann.get("id"))
            if image_id in duplicates:
                continue                              # its image's id is ambiguous: already reported above
            if ann.get("iscrowd", 0):
                self.notes.append(f"{where}: iscrowd=1, skipped (crowd regions are not single objects)")
                continue
            if image_id not in known_image_ids:
                self.problems.append(f"{where}: no image has id {image_id}")
                continue
            if image_id not in images:
                continue                              # its image is missing or bad: already reported above
            problem, box = _check_bbox(ann.get("bbox"), images[image_id])
            if problem is None and ann.get("category_id") not in label_of:
                problem = f"category_id {ann.get('category_id')} is not among the categories {self.category_ids}"
            if problem is not None:
                self.problems.append(f"{where}: {problem}")
                continue
            boxes[image_id].append(box)
            labels[image_id].append(label_of[ann["category_id"]])
        return boxes, labels

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index):
        image = read_image(self.file_names[index])
        if tuple(image.shape[1:]) != self.sizes[index]:
            raise ValueError(f"{self.annotations_path}: image id {self.image_ids[index]} ({self.file_names[index]}) "
                             f"is {image.shape[1]} x {image.shape[2]} pixels (H x W) but the annotations say "
                             f"{self.sizes[index][0]} x {self.sizes[index][1]}")
        target = self.targets[index]
        return image, {"boxes": target["boxes"].copy(), "labels": target["labels"].copy()}

    def __repr__(self):
        return f"CocoDataset({self.annotations_path!r}, {len(self)} images, classes={self.classes})"


def _dataset_paths(source):
    """(images folder, annotations file) of a dataset folder or of a pair; both must exist."""
    if isinstance(source, (tuple, list)):
        images_dir, annotations_path = (os.fspath(p) for p in source)
    else:
        images_dir = os.path.join(source, "images")
        annotations_path = os.path.join(source, "annotations.json")
    if not os.path.isfile(annotations_path):
        raise FileNotFoundError(f"CocoDataset: annotations file {annotations_path!r} does not exist; give a "
                                "folder holding images/ and annotations.json, or (images_dir, annotations_json)")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"CocoDataset: images folder {images_dir!r} does not exist")
    return images_dir, annotations_path


def _read_annotations(path):
    """The annotations file as a dict whose "images", "annotations" and "categories" are lists of objects."""
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); a COCO annotations file is JSON, which is UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(coco, dict):
        raise ValueError(f"{path}: holds a JSON {type(coco).__name__}, not the object a COCO annotations file is: "
                         '{"images": [...], "annotations": [...], "categories": [...]}')
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: no {key!r} list; a COCO annotations file has 'images', 'annotations' and "
                             "'categories'")
        wrong = [i for i, entry in enumerate(coco[key]) if not isinstance(entry, dict)]
        if wrong:
            raise ValueError(f"{path}: {key} {wrong[:5]} {'is' if len(wrong) == 1 else 'are'} not JSON objects "
                             f"({len(wrong)} of {len(coco[key])}); each entry of {key!r} is an object {{...}}")
    return coco


def _check_image_file(path, entry):
    """None, or what is wrong with the image file at ``path``: it cannot be opened as an image (its header is read,
    not its pixels), or its size is not the entry's width and height."""
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as error:
        return f"file {path} cannot be read as an image ({type(error).__name__}: {error})"
    if (width, height) != (entry["width"], entry["height"]):
        return (f"file {path} is {width} x {height} pixels (W x H) but the annotations say {entry['width']} x "
                f"{entry['height']}")
    return None


def _check_bbox(bbox, image):
    """(problem or None, (x1, y1, x2, y2)) for a COCO ``bbox`` [x, y, w, h] on ``image`` (a COCO image entry)."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return f"bbox {bbox!r} is not 4 finite numbers [x, y, w, h]", None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has width {w:g} or height {h:g} <= 0 (a degenerate box)", None
    width, height = image["width"], image["height"]
    tol = OUT_OF_IMAGE_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return (f"bbox {bbox} = (x1, y1, x2, y2) ({x:g}, {y:g}, {x + w:g}, {y + h:g}) is outside the "
                f"{width} x {height} image (W x H) by more than {tol:g} pixel"), None
    # Within the tolerance: clip to the image.
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        return f"bbox {bbox} has no area inside the image", None
    return None, (x1, y1, x2, y2)
