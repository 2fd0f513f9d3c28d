"""COCO-format folders (export and read back), and the VOC and CSV converters, on small hand-written files."""

import json
import os
import warnings

import matplotlib.image
import numpy as np
import PIL.Image
import pytest

from minidet.checkpoint import write_atomically
from minidet.data import CocoDataset, Shapes, csv_to_coco, export_coco, read_image, voc_to_coco, write_json


def write_png(path, height=20, width=30, channels=3, value=100):
    """A PNG of one grey level: greyscale (1 channel), RGB (3) or RGBA (4)."""
    pixels = np.full((height, width, channels), value, dtype=np.uint8)
    if channels == 1:
        PIL.Image.fromarray(pixels[:, :, 0]).save(path)      # mode "L"; matplotlib would apply a colour map
    else:
        matplotlib.image.imsave(path, pixels, format="png")


def make_folder(tmp_path, annotations, images=(("a.png", 20, 30), ("b.png", 20, 30)), categories=None):
    """A COCO folder with the given annotations on images a.png and b.png (20 x 30, H x W)."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for name, height, width in images:
        write_png(tmp_path / "images" / name, height, width)
    coco = {"images": [{"id": i + 10, "file_name": n, "width": w, "height": h} for i, (n, h, w) in enumerate(images)],
            "annotations": annotations,
            "categories": categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    return tmp_path


def ann(id, image_id, category_id, bbox, **extra):
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


def test_round_trip_is_bit_exact(tmp_path):
    dataset = Shapes(12, image_size=64, seed=5, min_size=16)
    path = export_coco(dataset, tmp_path)
    coco = json.loads(open(path).read())
    assert [c["name"] for c in coco["categories"]] == list(dataset.classes)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]          # no temporary files left
    loaded = CocoDataset(tmp_path)
    assert loaded.classes == dataset.classes and len(loaded) == len(dataset) and loaded.problems == []
    for (image, target), (image2, target2) in zip(dataset, loaded):
        assert image2.dtype == np.float32 and np.array_equal(image, image2)
        assert np.array_equal(target["boxes"], target2["boxes"])
        assert np.array_equal(target["labels"], target2["labels"])
    # The same with the pair form of the source.
    assert len(CocoDataset((tmp_path / "images", path))) == len(dataset)


def test_labels_are_contiguous_in_category_id_order(tmp_path):
    folder = make_folder(tmp_path, [ann(1, 10, 7, [1, 2, 3, 4]), ann(2, 11, 3, [0, 0, 30, 20])])
    dataset = CocoDataset(folder)
    assert dataset.classes == ("dog", "cat") and dataset.category_ids == (3, 7)
    image, target = dataset[0]
    assert image.shape == (3, 20, 30) and image.dtype == np.float32
    np.testing.assert_array_equal(target["boxes"], [[1, 2, 4, 6]])                 # xywh -> xyxy
    np.testing.assert_array_equal(target["labels"], [1])
    np.testing.assert_array_equal(dataset[1][1]["labels"], [0])


def test_grey_and_alpha_images_become_three_channels(tmp_path):
    write_png(tmp_path / "grey.png", channels=1, value=51)
    write_png(tmp_path / "rgba.png", channels=4, value=51)
    for name in ("grey.png", "rgba.png"):
        image = read_image(tmp_path / name)
        assert image.shape == (3, 20, 30) and image.dtype == np.float32
        np.testing.assert_allclose(image, 0.2, atol=1 / 255)


BAD = [
    (ann(1, 10, 7, [1, 2, 0, 4]), "annotation 0 (id 1, image_id 10): bbox [1, 2, 0, 4] has width 0"),
    (ann(2, 10, 7, [20, 2, 15, 4]), "annotation 1 (id 2, image_id 10): bbox [20, 2, 15, 4] = (x1, y1, x2, y2)"),
    (ann(3, 10, 99, [1, 2, 3, 4]), "annotation 2 (id 3, image_id 10): category_id 99 is not among"),
    (ann(4, 55, 7, [1, 2, 3, 4]), "annotation 3 (id 4, image_id 55): no image has id 55"),
    (ann(5, 10, 7, [1, 2, "x", 4]), "annotation 4 (id 5, image_id 10): bbox [1, 2, 'x', 4] is not 4 finite"),
]


def test_each_bad_annotation_is_named_and_fail_is_the_default(tmp_path):
    folder = make_folder(tmp_path, [a for a, _ in BAD] + [ann(6, 11, 3, [0, 0, 5, 5])])
    with pytest.raises(ValueError) as error:
        CocoDataset(folder)
    message = str(error.value)
    assert "annotations.json" in message and "5 bad annotations" in message and "on_error='skip'" in message
    for _, expected in BAD:
        assert expected in message


def test_skip_leaves_out_and_reports_every_bad_annotation(tmp_path):
    folder = make_folder(tmp_path, [a for a, _ in BAD] + [ann(6, 11, 3, [0, 0, 5, 5]),
                                                          ann(7, 11, 3, [-0.5, 0, 30.5, 20])])   # within tolerance
    with pytest.warns(UserWarning, match="skipped 5 bad annotations"):
        dataset = CocoDataset(folder, on_error="skip")
    assert len(dataset.problems) == 5
    for problem, (_, expected) in zip(dataset.problems, BAD):
        assert problem.startswith(expected)
    assert len(dataset[0][1]["boxes"]) == 0                      # image a.png kept, with no objects left
    np.testing.assert_array_equal(dataset[1][1]["boxes"], [[0, 0, 5, 5], [0, 0, 30, 20]])   # clipped


def test_missing_image_and_crowd(tmp_path):
    folder = make_folder(tmp_path, [ann(1, 10, 7, [1, 1, 2, 2], iscrowd=1), ann(2, 11, 7, [1, 1, 2, 2])])
    os.remove(folder / "images" / "b.png")
    with pytest.raises(ValueError, match=r"image 1 \(id 11, 'b.png'\): file .*b.png is missing"):
        CocoDataset(folder)
    with pytest.warns(UserWarning) as record:
        dataset = CocoDataset(folder, on_error="skip")
    assert len(dataset) == 1 and len(dataset.problems) == 1
    assert len(dataset.notes) == 1 and "iscrowd=1" in dataset.notes[0]
    assert any("crowd" in str(w.message) for w in record)
    with pytest.raises(ValueError, match="on_error"):
        CocoDataset(folder, on_error="ignore")


def test_image_size_mismatch_is_an_error(tmp_path):
    folder = make_folder(tmp_path, [], images=(("a.png", 20, 30),))
    coco = json.loads((folder / "annotations.json").read_text())
    coco["images"][0]["width"] = 31
    write_json(coco, folder / "annotations.json")
    with pytest.raises(ValueError, match=r"a.png is 30 x 20 pixels \(W x H\) but the annotations say 31 x 20"):
        CocoDataset(folder)                                   # found when the dataset is opened: the header says so
    skipped = CocoDataset(folder, on_error="skip")
    assert len(skipped) == 0 and "annotations say 31 x 20" in skipped.problems[0]


VOC = """<annotation><filename>{name}</filename><size><width>30</width><height>20</height><depth>3</depth></size>
{objects}</annotation>"""
VOC_OBJECT = "<object><name>{0}</name><bndbox><xmin>{1}</xmin><ymin>{2}</ymin><xmax>{3}</xmax><ymax>{4}</ymax>" \
             "</bndbox></object>"


def test_voc_conversion_and_pixel_convention(tmp_path):
    (tmp_path / "a.xml").write_text(VOC.format(name="a.png", objects=VOC_OBJECT.format("dog", 1, 1, 10, 20)
                                               + VOC_OBJECT.format("cat", 5, 6, 30, 7)))
    (tmp_path / "b.xml").write_text(VOC.format(name="b.png", objects=""))
    coco = voc_to_coco(tmp_path)
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert [i["file_name"] for i in coco["images"]] == ["a.png", "b.png"]
    # Pixels 1..10 (VOC, inclusive) are x 0..10 in minidet: bbox x = 0, w = 10.
    assert coco["annotations"][0]["bbox"] == [0, 0, 10, 20] and coco["annotations"][0]["category_id"] == 2
    assert coco["annotations"][1]["bbox"] == [4, 5, 26, 2]
    # And the COCO reader takes the result.
    for name in ("a.png", "b.png"):
        write_png(tmp_path / name)
    write_json(coco, tmp_path / "coco.json")
    dataset = CocoDataset((tmp_path, tmp_path / "coco.json"))
    np.testing.assert_array_equal(dataset[0][1]["boxes"], [[0, 0, 10, 20], [4, 5, 30, 7]])


def test_voc_bad_entries(tmp_path):
    objects = (VOC_OBJECT.format("dog", 5, 5, 4, 8) + VOC_OBJECT.format("dog", 1, 1, 40, 8)
               + VOC_OBJECT.format("dog", 1, 1, 3, 3) + VOC_OBJECT.format("cow", 1, 1, 3, 3)
               + "<object><name>dog</name></object>")
    (tmp_path / "a.xml").write_text(VOC.format(name="a.png", objects=objects))
    (tmp_path / "broken.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError) as error:
        voc_to_coco(tmp_path, classes=["dog"])
    message = str(error.value)
    for expected in ("a.xml: object 0 (dog, VOC xmin 5 ymin 5 xmax 4 ymax 8): box", "a.xml: object 1 (dog",
                     "a.xml: object 3: class 'cow' is not among", "a.xml: object 4: <bndbox> needs numbers",
                     "broken.xml: not valid XML"):
        assert expected in message
    assert "5 bad VOC entries" in message
    with pytest.warns(UserWarning, match="skipped 5 bad VOC entries"):
        coco = voc_to_coco(tmp_path, classes=["dog"], on_error="skip")
    assert [a["bbox"] for a in coco["annotations"]] == [[0, 0, 3, 3]]


def test_csv_conversion_and_bad_rows(tmp_path):
    for name in ("a.png", "b.png"):
        write_png(tmp_path / name)
    rows = ["path,x1,y1,x2,y2,class",
            "a.png,1,2,11,12,dog",
            "b.png,,,,,",                 # an image with no objects
            "a.png,5,5,5,9,dog",          # line 4: zero width
            "a.png,0,0,31.5,20,cat",      # line 5: outside the 30-pixel-wide image
            "c.png,0,0,5,5,dog",          # line 6: missing image
            "a.png,0,0,x,5,dog",          # line 7: not a number
            "a.png,0,0,5",                # line 8: too few fields
            "a.png,0,0,30,20,cat"]
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError) as error:
        csv_to_coco(csv_path)
    message = str(error.value)
    assert "5 bad CSV rows" in message
    for line in (4, 5, 6, 7, 8):
        assert f"boxes.csv: line {line}:" in message
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        coco = csv_to_coco(csv_path, on_error="skip")
    assert len(record) == 1 and "skipped 5 bad CSV rows" in str(record[0].message)
    assert [i["file_name"] for i in coco["images"]] == ["a.png", "b.png"]
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert [(a["image_id"], a["bbox"], a["category_id"]) for a in coco["annotations"]] == [
        (1, [1.0, 2.0, 10.0, 10.0], 2), (1, [0.0, 0.0, 30.0, 20.0], 1)]


def test_bad_category_table_is_an_error(tmp_path):
    folder = make_folder(tmp_path, [], categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(ValueError, match="distinct integer 'id'"):
        CocoDataset(folder)


class RandomImages:
    """Two images with float values that are not multiples of 1/255, one box each."""
    classes = ("thing",)

    def __len__(self):
        return 2

    def __getitem__(self, index):
        image = np.random.default_rng(index).random((3, 20, 30), dtype=np.float32)
        return image, {"boxes": np.array([[1.5, 2.25, 10, 12]], np.float32), "labels": np.array([0])}


def test_round_trip_of_other_images_is_within_half_a_level(tmp_path):
    export_coco(RandomImages(), tmp_path)
    dataset = CocoDataset(tmp_path)
    for index in range(2):
        image, target = RandomImages()[index]
        image2, target2 = dataset[index]
        assert np.abs(image2 - image).max() <= 0.5 / 255 + 1e-7
        np.testing.assert_array_equal(target2["boxes"], target["boxes"])


def test_interrupted_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "annotations.json"
    write_json({"old": 1}, path)

    def write_half_then_fail(f):
        f.write(b'{"new":')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, write_half_then_fail)
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["annotations.json"]


def test_broken_image_files_are_found_when_the_dataset_is_opened(tmp_path):
    folder = make_folder(tmp_path, [], images=(("a.png", 20, 30), ("b.png", 20, 30), ("c.png", 20, 30)))
    (folder / "images" / "b.png").write_bytes(b"not a png at all")
    noise = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)   # does not compress away
    PIL.Image.fromarray(noise).save(folder / "images" / "c.png")
    data = (folder / "images" / "c.png").read_bytes()
    with pytest.raises(ValueError, match=r"1 bad annotations:\n  image 1 \(id 11, 'b.png'\): file \S+b.png cannot be "
                                         r"read as an image \(UnidentifiedImageError"):
        CocoDataset(folder)
    dataset = CocoDataset(folder, on_error="skip")
    assert len(dataset) == 2 and "b.png cannot be read" in dataset.problems[0]
    (folder / "images" / "c.png").write_bytes(data[:-200])                     # the header is there, pixels cut off
    dataset = CocoDataset(folder, on_error="skip")
    with pytest.raises(ValueError, match=r"c.png: cannot be decoded as an image .*; replace the file"):
        dataset[1]


@pytest.mark.parametrize("text, message", [
    (b"[1, 2]", "holds a JSON list, not the object a COCO annotations file is"),
    (b'{"images": [1], "annotations": [], "categories": []}', r"images \[0\] is not JSON objects"),
    (b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]}',
     r"the category names \['a'\] are given to more than one id"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\u00e9"}]}'.encode("latin-1"),
     "not UTF-8 text"),
])
def test_malformed_annotation_files_get_one_clear_message(tmp_path, text, message):
    folder = make_folder(tmp_path, [])
    (folder / "annotations.json").write_bytes(text)
    with pytest.raises(ValueError, match=message):
        CocoDataset(folder)


def test_duplicate_ids_are_reported_not_resolved(tmp_path):
    folder = make_folder(tmp_path, [ann(1, 10, 7, [1, 1, 5, 5]), ann(2, 11, 7, [2, 2, 6, 6])])
    coco = json.loads((folder / "annotations.json").read_text())
    coco["images"][1]["id"] = coco["images"][0]["id"]
    coco["annotations"][1]["id"] = coco["annotations"][0]["id"]
    write_json(coco, folder / "annotations.json")
    dataset = CocoDataset(folder, on_error="skip")
    assert len(dataset) == 0                                   # which image is id 1 cannot be known: neither is used
    assert any("another image has the id" in p for p in dataset.problems)
    assert any("another annotation has the id" in p for p in dataset.problems)
