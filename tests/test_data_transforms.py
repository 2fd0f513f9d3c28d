"""Transforms and batching: bilinear resize (against PyTorch), flips, normalisation, collate, mapping boxes back."""

import numpy as np
import pytest

from minidet.data import Shapes, batches, collate, horizontal_flip, normalize, resize, resize_image, scale_boxes_back
from minidet.data.transforms import resize_factor


@pytest.mark.reference
@pytest.mark.parametrize("size", [(7, 9), (23, 5), (40, 61), (13, 13), (1, 4)])
def test_resize_image_matches_torch_bilinear(size):
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(0).random((3, 13, 17), dtype=np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=size, mode="bilinear",
                                               align_corners=False)[0].numpy()
    np.testing.assert_allclose(resize_image(image, size), expected, rtol=0, atol=2e-6)


def test_resize_image_by_hand():
    image = np.array([[[0.0, 1.0], [2.0, 3.0]]], dtype=np.float32)        # (1, 2, 2)
    # Doubling: output pixel 1 samples input x = (1 + 0.5) / 2 - 0.5 = 0.25, so 0.75 * a + 0.25 * b.
    out = resize_image(image, (4, 4))
    np.testing.assert_allclose(out[0, 0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.5, 1.5, 2.0])
    assert np.array_equal(resize_image(image, (2, 2)), image)             # same size: unchanged


def test_resize_rule_and_boxes():
    image = np.zeros((3, 100, 200), dtype=np.float32)
    boxes = np.array([[10, 20, 50, 60]], dtype=np.float32)
    out, out_boxes, scale = resize(image, boxes, min_size=50, max_size=1000)    # shorter side 100 -> 50
    assert out.shape == (3, 50, 100) and scale == (0.5, 0.5)
    np.testing.assert_array_equal(out_boxes, [[5, 10, 25, 30]])
    out, _, scale = resize(image, boxes, min_size=800, max_size=1333)           # longer side capped at 1333
    assert out.shape == (3, 666, 1333)
    assert scale == (1333 / 200, 666 / 100)
    np.testing.assert_allclose(scale_boxes_back(resize(image, boxes, 800, 1333)[1], scale), boxes, rtol=1e-6)


def test_resize_factor_with_either_size_left_out():
    assert resize_factor(100, 200, 50, 1000) == 0.5                 # the shorter side to min_size
    assert resize_factor(100, 200, 800, 1333) == 1333 / 200         # unless the longer side would pass max_size
    assert resize_factor(100, 200, None, 150) == 0.75               # no min_size: only ever smaller ...
    assert resize_factor(100, 200, None, 400) == 1.0                # ... and only when longer than max_size
    assert resize_factor(100, 200, 300, None) == 3.0                # no max_size: no cap
    assert resize_factor(100, 200, None, None) == 1.0


def test_resize_to_the_same_size_returns_the_image_itself():
    image = np.zeros((3, 100, 200), dtype=np.float32)
    out, boxes, scale = resize(image, [[1, 2, 3, 4]], None, 512)
    assert out is image and scale == (1.0, 1.0) and boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[1, 2, 3, 4]])


def test_resize_round_trips_boxes_whatever_the_sizes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width = rng.integers(8, 500, size=2)
        x1, x2 = np.sort(rng.uniform(0, width, 2))
        y1, y2 = np.sort(rng.uniform(0, height, 2))
        boxes = np.array([[x1, y1, x2, y2]], dtype=np.float32)
        min_size, max_size = int(rng.integers(8, 300)), int(rng.integers(300, 600))
        out, scaled, scale = resize(np.zeros((3, height, width), np.float32), boxes, min_size, max_size)
        assert out.shape[1:] == (round(height * scale[1]), round(width * scale[0]))
        np.testing.assert_allclose(scale_boxes_back(scaled, scale), boxes, rtol=1e-6, atol=1e-4)


def test_flip_twice_is_identity_and_moves_boxes():
    image, target = Shapes(1, image_size=64, seed=3, min_size=16, empty_fraction=0)[0]
    flipped, boxes = horizontal_flip(image, target["boxes"])
    np.testing.assert_array_equal(flipped[:, :, 0], image[:, :, -1])
    np.testing.assert_array_equal(boxes[:, [0, 2]], 64 - target["boxes"][:, [2, 0]])
    np.testing.assert_array_equal(boxes[:, [1, 3]], target["boxes"][:, [1, 3]])
    again, boxes_again = horizontal_flip(flipped, boxes)
    assert np.array_equal(again, image) and np.array_equal(boxes_again, target["boxes"])
    # The flipped box still holds the flipped object: same pixels inside it.
    x1, y1, x2, y2 = target["boxes"][0].astype(int)
    fx1, _, fx2, _ = boxes[0].astype(int)
    np.testing.assert_array_equal(flipped[:, y1:y2, fx1:fx2], image[:, y1:y2, x1:x2][:, :, ::-1])


def test_normalize():
    image = np.full((3, 2, 2), 0.5, dtype=np.float32)
    out = normalize(image, mean=(0.5, 0.25, 0.0), std=(1.0, 0.5, 2.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [0.0, 0.5, 0.25])


def test_collate_pads_to_a_multiple_of_32():
    items = [(np.ones((3, 40, 70), np.float32), {"boxes": np.array([[1, 2, 3, 4]]), "labels": np.array([1])}),
             (np.ones((3, 64, 20), np.float32), {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)})]
    images, targets, sizes = collate(items)
    assert images.shape == (2, 3, 64, 96) and images.dtype == np.float32
    assert sizes == [(40, 70), (64, 20)]
    assert images[0, :, :40, :70].min() == 1 and images[0, :, 40:].max() == 0 and images[0, :, :, 70:].max() == 0
    assert images[1, :, :, 20:].max() == 0
    assert targets[0]["boxes"].dtype == np.float32 and targets[0]["labels"].dtype == np.int64
    assert targets[1]["boxes"].shape == (0, 4)
    assert collate(items, size_divisor=1)[0].shape == (2, 3, 64, 70)


def test_batches():
    dataset = list(range(10))
    assert [len(b) for b in batches(dataset, 4)] == [4, 4, 2]
    assert [len(b) for b in batches(dataset, 4, drop_last=True)] == [4, 4]
    shuffled = [x for b in batches(dataset, 3, shuffle=True, seed=1) for x in b]
    assert sorted(shuffled) == dataset and shuffled != dataset
    assert shuffled == [x for b in batches(dataset, 3, shuffle=True, seed=1) for x in b]
