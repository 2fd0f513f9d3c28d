"""Converters to COCO format: from Pascal VOC XML files and from a simple CSV.

Both return a COCO annotations dict (see ``minidet.data.coco``); ``write_json(coco, path)`` saves it, and
``CocoDataset((images_dir, path))`` reads it. Category ids are 1..K for the class names in sorted order (or in
the order of ``classes`` when given). Bad entries are reported with the file and the object index or line number,
with the same policy as ``CocoDataset``: ``on_error="fail"`` (default) raises a ``ValueError`` listing all of
them; ``on_error="skip"`` leaves them out and warns with the full list.

**Pascal VOC pixel convention.** VOC numbers pixels from 1 and its ``xmax`` is the last pixel *inside* the box,
so a box covering pixels 1..10 (ten pixels) is ``xmin=1, xmax=10``. minidet numbers pixels from 0 and its x2 is the
edge *after* the last pixel, so the same ten pixels are x1 = 0, x2 = 10. Hence
``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (width ``xmax - xmin + 1``, as in the VOC devkit).

**CSV.** One row per box: ``path,x1,y1,x2,y2,class`` with minidet's convention (0-based, x2 and y2 exclusive), an
optional header row ``path,x1,y1,x2,y2,class``, and a row with the four box fields and the class empty for an image
without objects. Paths are relative to ``image_root`` (default: the CSV's folder); image sizes are read from the
image files' headers.
"""

import csv
import math
import os
import xml.etree.ElementTree as ET

from PIL import Image

from minidet.data.coco import OUT_OF_IMAGE_TOLERANCE, _check_on_error, report_problems

CSV_HEADER = ["path", "x1", "y1", "x2", "y2", "class"]


def _image_size(path):
    """(width, height) of an image file, from its header (the pixels are not decoded)."""
    with Image.open(path) as image:
        return image.size


def _box_problem(x1, y1, x2, y2, width, height):
    """Why (x1, y1, x2, y2) is not a usable box in a width x height image, or None."""
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return f"box ({x1}, {y1}, {x2}, {y2}) has a value that is not finite"
    if x2 <= x1 or y2 <= y1:
        return f"box (x1, y1, x2, y2) ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has zero or negative width or height"
    tol = OUT_OF_IMAGE_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return (f"box (x1, y1, x2, y2) ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is outside the {width} x {height} image "
                f"(W x H) by more than {tol:g} pixel")
    return None


def _coco_dict(images, boxes, classes):
    """COCO dict from images [(file_name, width, height)] and boxes [(image index, x1, y1, x2, y2, name)]."""
    category_id = {name: k + 1 for k, name in enumerate(classes)}
    annotations = []
    for image_index, x1, y1, x2, y2, name in boxes:
        x1, y1 = max(x1, 0.0), max(y1, 0.0)                       # within the tolerance: clip to the image
        x2, y2 = min(x2, images[image_index][1]), min(y2, images[image_index][2])
        annotations.append({"id": len(annotations) + 1, "image_id": image_index + 1,
                            "category_id": category_id[name], "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"images": [{"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images)],
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)]}


def _class_table(names, classes, problems, boxes):
    """The class list (given, or the sorted names found), dropping boxes with unknown names into ``problems``."""
    if classes is None:
        return sorted(set(names)), boxes
    classes = list(classes)
    known = set(classes)
    kept = []
    for box, where in boxes:
        if box[5] in known:
            kept.append((box, where))
        else:
            problems.append(f"{where}: class {box[5]!r} is not among the classes {classes}")
    return classes, kept


def voc_to_coco(annotations_dir, classes=None, images_dir=None, on_error="fail"):
    """Convert a folder of Pascal VOC XML files (one per image) to a COCO annotations dict.

    Args:
        annotations_dir: the folder of ``*.xml`` files (VOC's ``Annotations/``), read in sorted order.
        classes: the class names, in label order; default: every name found, sorted. With a list given, an object
            of another class is a bad entry.
        images_dir: where the images are (VOC's ``JPEGImages/``); used only to read the size of an image whose
            XML has no ``<size>``.
        on_error: "fail" or "skip" (see the module docstring).

    Each ``<object>`` needs ``<name>`` and ``<bndbox>`` with ``xmin ymin xmax ymax`` (1-based, inclusive; converted
    as the module docstring says). Objects marked ``<difficult>1</difficult>`` are kept: COCO has no such flag.

    Returns:
        a COCO dict; ``file_name`` is the XML's ``<filename>``, relative to the images folder.
    """
    _check_on_error(on_error, "voc_to_coco")
    if not os.path.isdir(annotations_dir):
        raise FileNotFoundError(f"voc_to_coco: annotations folder {annotations_dir!r} does not exist")
    problems, images, boxes = [], [], []
    for xml_name in sorted(f for f in os.listdir(annotations_dir) if f.endswith(".xml")):
        path = os.path.join(annotations_dir, xml_name)
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as error:
            problems.append(f"{path}: not valid XML ({error}); the whole file is skipped")
            continue
        file_name = (root.findtext("filename") or "").strip() or os.path.splitext(xml_name)[0] + ".jpg"
        try:
            width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        except (TypeError, ValueError):
            image_path = os.path.join(images_dir or "", file_name)
            if images_dir is None or not os.path.isfile(image_path):
                problems.append(f"{path}: no <size><width>/<height>, and image {image_path} is not there to measure;"
                                " the whole file is skipped")
                continue
            width, height = _image_size(image_path)
        image_index = len(images)
        images.append((file_name, width, height))
        for index, obj in enumerate(root.findall("object")):
            where = f"{path}: object {index}"
            name = (obj.findtext("name") or "").strip()
            try:
                xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                problems.append(f"{where}: <bndbox> needs numbers xmin, ymin, xmax, ymax")
                continue
            if not name:
                problems.append(f"{where}: no <name>")
                continue
            x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax                 # 1-based inclusive -> 0-based exclusive
            problem = _box_problem(x1, y1, x2, y2, width, height)
            if problem is not None:
                problems.append(f"{where} ({name}, VOC xmin {xmin:g} ymin {ymin:g} xmax {xmax:g} ymax {ymax:g}): "
                                f"{problem}")
                continue
            boxes.append(((image_index, x1, y1, x2, y2, name), where))
    classes, boxes = _class_table([b[5] for b, _ in boxes], classes, problems, boxes)
    report_problems(problems, annotations_dir, on_error, what="VOC entries")
    return _coco_dict(images, [b for b, _ in boxes], classes)


def csv_to_coco(csv_path, classes=None, image_root=None, on_error="fail"):
    """Convert a CSV of ``path,x1,y1,x2,y2,class`` rows to a COCO annotations dict.

    Args:
        csv_path: the CSV file (see the module docstring for its format).
        classes: the class names, in label order; default: every name found, sorted.
        image_root: the folder the paths are relative to; default: the CSV's folder. Each image must exist there
            (its size is read from it).
        on_error: "fail" or "skip" (see the module docstring).

    Returns:
        a COCO dict, one image per distinct path in order of first appearance; ``file_name`` is the path as written.
    """
    _check_on_error(on_error, "csv_to_coco")
    image_root = os.path.dirname(os.path.abspath(csv_path)) if image_root is None else image_root
    problems, images, boxes = [], [], []
    index_of = {}                                              # path -> index in images, or None if unreadable
    with open(csv_path, newline="") as f:
        for line_number, row in enumerate(csv.reader(f), start=1):
            where = f"{csv_path}: line {line_number}"
            row = [field.strip() for field in row]
            if not row or row == [""]:
                continue
            if line_number == 1 and [c.lower() for c in row] == CSV_HEADER:
                continue
            if len(row) != 6:
                problems.append(f"{where}: {len(row)} fields, expected 6 (path,x1,y1,x2,y2,class)")
                continue
            path, fields, name = row[0], row[1:5], row[5]
            if path not in index_of:
                full = os.path.join(image_root, path)
                if not os.path.isfile(full):
                    problems.append(f"{where}: image {full} is missing")
                    index_of[path] = None
                    continue
                width, height = _image_size(full)
                index_of[path] = len(images)
                images.append((path, width, height))
            image_index = index_of[path]
            if image_index is None:
                problems.append(f"{where}: image {os.path.join(image_root, path)} is missing")
                continue
            if all(v == "" for v in fields) and name == "":
                continue                                       # an image with no objects
            try:
                x1, y1, x2, y2 = (float(v) for v in fields)
            except ValueError:
                problems.append(f"{where}: x1, y1, x2, y2 must be numbers (or all empty, with the class, for an "
                                f"image without objects), got {fields}")
                continue
            if not name:
                problems.append(f"{where}: the class is empty")
                continue
            problem = _box_problem(x1, y1, x2, y2, *images[image_index][1:])
            if problem is not None:
                problems.append(f"{where}: {problem}")
                continue
            boxes.append(((image_index, x1, y1, x2, y2, name), where))
    classes, boxes = _class_table([b[5] for b, _ in boxes], classes, problems, boxes)
    report_problems(problems, csv_path, on_error, what="CSV rows")
    return _coco_dict(images, [b for b, _ in boxes], classes)
