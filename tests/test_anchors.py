"""Anchors: counts, shapes, the two presets' exact values, the (y, x, anchor) order, and the facts the docs quote."""

import math

import numpy as np
import pytest

import minidet as md
from minidet import backend
from minidet.anchors import DEFAULT_ASPECT_RATIOS, DEFAULT_SCALES, AnchorGenerator, cell_anchors, scaled_sizes

STRIDES = (8, 16, 32, 64, 128)


def ceil_feature_sizes(image_size, strides=STRIDES):
    """P3-P7 sizes of a network whose stride-2 convolutions are padded: ceil(H / stride), ceil(W / stride)."""
    return [(-(-image_size[0] // s), -(-image_size[1] // s)) for s in strides]


def iou(box, boxes):
    """IoU of one box (4,) with each row of boxes (M, 4), all (x1, y1, x2, y2), in float64."""
    box, boxes = np.asarray(box, dtype=np.float64), np.asarray(boxes, dtype=np.float64)
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)   # (M,)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)   # (M,)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def square(cx, cy, side):
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def centres(anchors):
    """(M, 2) centres (cx, cy) of (M, 4) boxes."""
    anchors = backend.to_numpy(anchors).astype(np.float64)
    return np.stack([(anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2], axis=1)


# torchvision's level-P3 cell anchors (sizes 32, 40, 50), worked by hand. Ratio 0.5 of size 32:
# w = 32 * sqrt(2) = 45.25 -> half 22.63 -> 23, h = 32 / sqrt(2) = 22.63 -> half 11.31 -> 11.
# Sizes 40 and 50 give the halves 28.28, 14.14 and 35.36, 17.68.
TV_P3 = [[-23, -11, 23, 11], [-28, -14, 28, 14], [-35, -18, 35, 18],    # ratio 0.5
         [-16, -16, 16, 16], [-20, -20, 20, 20], [-25, -25, 25, 25],    # ratio 1: half the size
         [-11, -23, 11, 23], [-14, -28, 14, 28], [-18, -35, 18, 35]]    # ratio 2: ratio 0.5 with w and h swapped
# Level P7 (sizes 512, 645, 812). 645 / 2 = 322.5 rounds half to even: 322, as torch.round does.
TV_P7 = [[-362, -181, 362, 181], [-456, -228, 456, 228], [-574, -287, 574, 287],   # 362.04, 181.02; 456.08, ...
         [-256, -256, 256, 256], [-322, -322, 322, 322], [-406, -406, 406, 406],
         [-181, -362, 181, 362], [-228, -456, 228, 456], [-287, -574, 287, 574]]


# --- counts and shapes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["paper", "torchvision"])
def test_counts_per_level_and_in_total(xp, preset):
    gen = AnchorGenerator(preset)
    feature_sizes = ceil_feature_sizes((64, 96))                  # (8, 12), (4, 6), (2, 3), (1, 2), (1, 1)
    assert gen.num_anchors_per_location == 9
    assert gen.num_anchors_per_level(feature_sizes) == [9 * 96, 9 * 24, 9 * 6, 9 * 2, 9 * 1]
    anchors = gen((64, 96), feature_sizes, like=xp.zeros(1))
    assert anchors.shape == (9 * 129, 4)
    assert anchors.dtype == np.float32
    assert backend.get_array_module(anchors) is xp


def test_default_sizes_are_four_times_the_strides():
    for preset in ("paper", "torchvision"):
        gen = AnchorGenerator(preset)
        assert gen.strides == STRIDES
        assert gen.sizes == (32, 64, 128, 256, 512)


def test_scaled_sizes_of_both_presets():
    assert scaled_sizes(32) == pytest.approx((32.0, 40.3175, 50.7968), abs=1e-4)
    assert AnchorGenerator().scaled_sizes[-1][-1] == pytest.approx(812.7, abs=0.05)    # the paper's "813"
    # torchvision truncates: sizes ((x, int(x * 2 ** (1/3)), int(x * 2 ** (2/3))) for x in 32 ... 512)
    assert AnchorGenerator("torchvision").scaled_sizes == [
        (32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812)]


# --- the cell anchors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64, 128, 256, 512])
def test_paper_cell_anchors_have_the_expected_areas_and_aspect_ratios(size):
    cell = cell_anchors(size).astype(np.float64)
    assert cell.shape == (9, 4) and cell_anchors(size).dtype == np.float32
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    # ratio-major, scale-minor: anchor a has ratio index a // 3 and scale index a % 3
    expected_area = [(size * DEFAULT_SCALES[a % 3]) ** 2 for a in range(9)]
    expected_ratio = [DEFAULT_ASPECT_RATIOS[a // 3] for a in range(9)]
    np.testing.assert_allclose(w * h, expected_area, rtol=1e-6)
    np.testing.assert_allclose(h / w, expected_ratio, rtol=1e-6)
    np.testing.assert_array_equal(cell[:, :2], -cell[:, 2:])          # centred at (0, 0)


def test_torchvision_base_anchors_for_size_32():
    expected = [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]
    np.testing.assert_array_equal(cell_anchors(32, scales=(1.0,), preset="torchvision"), expected)


def test_torchvision_cell_anchors_of_p3_and_p7():
    gen = AnchorGenerator("torchvision")
    np.testing.assert_array_equal(gen.cell_anchors[0], TV_P3)
    np.testing.assert_array_equal(gen.cell_anchors[4], TV_P7)
    assert gen.cell_anchors[0].dtype == np.float32


def test_torchvision_rounds_half_to_even():
    gen = AnchorGenerator("torchvision")
    assert gen.cell_anchors[1][5].tolist() == [-50, -50, 50, 50]       # 101 / 2 = 50.5 -> 50
    assert gen.cell_anchors[2][4].tolist() == [-80, -80, 80, 80]       # 161 / 2 = 80.5 -> 80
    assert gen.cell_anchors[2][5].tolist() == [-102, -102, 102, 102]   # 203 / 2 = 101.5 -> 102


# --- tiling over the image ----------------------------------------------------------------------------------------

def test_torchvision_anchors_of_a_tiny_image():
    gen = AnchorGenerator("torchvision")
    feature_sizes = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]       # a 32 x 32 image
    assert gen.level_strides((32, 32), feature_sizes) == [(8, 8), (16, 16), (32, 32), (32, 32), (32, 32)]
    anchors = gen((32, 32), feature_sizes)
    assert anchors.shape == (9 * (16 + 4 + 1 + 1 + 1), 4) == (207, 4)
    p3 = np.array(TV_P3, dtype=np.float32)
    np.testing.assert_array_equal(anchors[:9], p3)                         # cell (y=0, x=0): no half-stride
    np.testing.assert_array_equal(anchors[9:18], p3 + [8, 0, 8, 0])        # cell (0, 1)
    np.testing.assert_array_equal(anchors[36:45], p3 + [0, 8, 0, 8])       # cell (1, 0): after one row of 4 cells
    np.testing.assert_array_equal(anchors[143], [6, -11, 42, 59])          # cell (3, 3), anchor 8: 24 + (-18, -35, ..)
    np.testing.assert_array_equal(anchors[-9:], TV_P7)                     # P7's single cell at (0, 0)
    np.testing.assert_array_equal(anchors[-14], [-161, -161, 161, 161])    # P6 (rows -18..-10), anchor 4: 322 / 2


def test_paper_centres_are_at_the_cell_centres(xp):
    gen = AnchorGenerator()
    feature_sizes = ceil_feature_sizes((64, 96))
    anchors = backend.to_numpy(gen((64, 96), feature_sizes, like=xp.zeros(1)))
    for level, ((h, w), stride) in enumerate(zip(feature_sizes, STRIDES)):
        start = sum(gen.num_anchors_per_level(feature_sizes)[:level])
        c = centres(anchors[start:start + h * w * 9]).reshape(h, w, 9, 2)
        expected_x = (np.arange(w) + 0.5) * stride                          # (W,)
        expected_y = (np.arange(h) + 0.5) * stride                          # (H,)
        np.testing.assert_allclose(c[..., 0], np.broadcast_to(expected_x[None, :, None], (h, w, 9)), atol=1e-4)
        np.testing.assert_allclose(c[..., 1], np.broadcast_to(expected_y[:, None, None], (h, w, 9)), atol=1e-4)


def test_torchvision_centres_are_cell_corners_at_image_over_grid_strides():
    gen = AnchorGenerator("torchvision")
    feature_sizes = ceil_feature_sizes((64, 96))
    strides = gen.level_strides((64, 96), feature_sizes)
    assert strides == [(8, 8), (16, 16), (32, 32), (64, 48), (64, 96)]   # 96 // 2 = 48: torchvision's own stride
    # Integer division, not the network's stride: a 100 x 100 image (P3 13 x 13) gets stride 100 // 13 = 7 on P3.
    assert gen.level_strides((100, 100), ceil_feature_sizes((100, 100))) == [(7, 7), (14, 14), (25, 25), (50, 50),
                                                                             (100, 100)]
    anchors = gen((64, 96), feature_sizes)
    counts = gen.num_anchors_per_level(feature_sizes)
    for level, ((h, w), (sy, sx)) in enumerate(zip(feature_sizes, strides)):
        start = sum(counts[:level])
        c = centres(anchors[start:start + counts[level]]).reshape(h, w, 9, 2)
        np.testing.assert_array_equal(c[..., 0], np.broadcast_to((np.arange(w) * sx)[None, :, None], (h, w, 9)))
        np.testing.assert_array_equal(c[..., 1], np.broadcast_to((np.arange(h) * sy)[:, None, None], (h, w, 9)))


@pytest.mark.parametrize("preset, image_size, stride_yx, offset", [
    ("paper", (16, 24), (8, 8), 0.5),
    ("torchvision", (16, 48), (8, 16), 0.0),      # a wider image: different strides along y and x
])
def test_order_is_y_x_anchor_with_the_anchor_fastest(xp, preset, image_size, stride_yx, offset):
    gen = AnchorGenerator(preset, sizes=(32,), strides=(8,))
    anchors = backend.to_numpy(gen(image_size, [(2, 3)], like=xp.zeros(1)))
    expected = []
    for y in range(2):
        for x in range(3):
            for a in range(9):
                cx, cy = (x + offset) * stride_yx[1], (y + offset) * stride_yx[0]
                expected.append(gen.cell_anchors[0][a] + np.array([cx, cy, cx, cy], dtype=np.float32))
    np.testing.assert_array_equal(anchors, np.array(expected))


def test_head_channels_line_up_with_anchor_rows():
    """Row r of the flattened head output (channel a * K + k of cell (y, x)) is anchor row r."""
    gen = AnchorGenerator(sizes=(32,), strides=(8,))
    A, K, H, W = 9, 2, 2, 3
    a, k, y, x = np.meshgrid(np.arange(A), np.arange(K), np.arange(H), np.arange(W), indexing="ij")
    head = (a * 1000 + k * 100 + y * 10 + x).reshape(1, A * K, H, W)      # (N, A*K, H, W); channel = a * K + k
    flat = head.reshape(1, A, K, H, W).transpose(0, 3, 4, 1, 2).reshape(1, H * W * A, K)   # as the model does
    anchors = gen((16, 24), [(H, W)])
    assert len(anchors) == flat.shape[1]
    for r in range(flat.shape[1]):
        code = flat[0, r, 0]
        a_r, y_r, x_r = code // 1000, code // 10 % 10, code % 10
        cx, cy = (x_r + 0.5) * 8, (y_r + 0.5) * 8
        np.testing.assert_array_equal(anchors[r], gen.cell_anchors[0][a_r] + np.float32([cx, cy, cx, cy]))


# --- devices and errors -------------------------------------------------------------------------------------------

def test_like_puts_the_anchors_on_its_device_as_float32(xp):
    gen = AnchorGenerator()
    feature_sizes = ceil_feature_sizes((64, 64))
    on_device = gen((64, 64), feature_sizes, like=xp.zeros((1, 2), dtype=xp.float64))
    assert backend.get_array_module(on_device) is xp and on_device.dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy(on_device), gen((64, 64), feature_sizes))
    assert isinstance(gen((64, 64), feature_sizes), np.ndarray)            # NumPy by default


def test_like_refuses_a_tensor():
    with pytest.raises(TypeError, match="tensor.data"):
        AnchorGenerator()((64, 64), ceil_feature_sizes((64, 64)), like=md.tensor(np.zeros(1)))


def test_paper_preset_checks_feature_sizes_against_the_image():
    gen = AnchorGenerator()
    gen((100, 100), ceil_feature_sizes((100, 100)))                        # ceil(100 / 8) = 13: fine
    gen((100, 100), [(h - 1, w - 1) if s == 8 else (h, w) for (h, w), s in
                     zip(ceil_feature_sizes((100, 100)), STRIDES)])        # floor(100 / 8) = 12: fine too
    with pytest.raises(ValueError, match="level 0 has stride 8"):
        gen((64, 64), ceil_feature_sizes((64, 64))[::-1])                  # levels in the wrong order
    with pytest.raises(ValueError, match="width should be 96 / 8"):
        gen((64, 96), ceil_feature_sizes((64, 64)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown anchor preset"):
        AnchorGenerator("detectron")
    with pytest.raises(ValueError, match="5 levels"):
        AnchorGenerator()((64, 64), ceil_feature_sizes((64, 64))[:4])
    with pytest.raises(ValueError, match="one per level"):
        AnchorGenerator(sizes=(32, 64))


# --- the facts the docstrings teach --------------------------------------------------------------------------------

def test_smallest_square_that_can_match_a_32_pixel_anchor_is_about_23_pixels():
    gen = AnchorGenerator()
    anchors = gen((128, 128), ceil_feature_sizes((128, 128)))
    anchor = anchors[3]                                    # P3, cell (0, 0), ratio 1, scale 1: the 32 x 32 square
    np.testing.assert_array_equal(anchor, [-12, -12, 20, 20])
    # A centred square of side s inside it: IoU = s^2 / 32^2 >= 0.5  ->  s >= sqrt(512) = 22.63
    sides = np.arange(1, 3200) / 100                       # 0.01 ... 31.99 pixels
    ious = np.array([iou(square(4, 4, s), anchor[None])[0] for s in sides])
    smallest = sides[np.argmax(ious >= 0.5)]
    assert smallest == pytest.approx(math.sqrt(512), abs=0.01) and round(smallest) == 23
    # Nothing does better: a 22-pixel square wherever it lies stays under IoU 0.5 with every anchor ...
    rng = np.random.default_rng(0)
    for cx, cy in rng.uniform(11, 117, size=(50, 2)):
        assert iou(square(cx, cy, 22), anchors).max() < 0.5
    # ... while a 23-pixel square on an anchor centre makes it.
    assert iou(square(44, 60, 23), anchors).max() >= 0.5


def test_four_times_stride_lets_every_anchor_sized_object_match():
    gen = AnchorGenerator()
    # the 32 x 32 squares of P3 (anchor 3 of each cell) against 32 x 32 objects
    squares = gen((128, 128), ceil_feature_sizes((128, 128)))[3:16 * 16 * 9:9]
    assert len(squares) == 256 and np.all(squares[:, 2] - squares[:, 0] == 32)
    worst = (7 / 8) ** 2 / (2 - (7 / 8) ** 2)              # offset of half a stride = size / 8 in x and y: 0.62
    assert iou(square(64, 64, 32), squares).max() == pytest.approx(worst, abs=1e-6)   # midway between four centres
    rng = np.random.default_rng(1)
    best = [iou(square(cx, cy, 32), squares).max() for cx, cy in rng.uniform(16, 112, size=(100, 2))]
    assert min(best) >= worst - 1e-6 > 0.5


# --- against torchvision's formulas, in torch ---------------------------------------------------------------------

@pytest.mark.reference
def test_torchvision_preset_equals_torchvisions_formulas_in_torch():
    torch = pytest.importorskip("torch")

    def torchvision_anchors(image_size, grid_sizes):
        """torchvision's AnchorGenerator for retinanet_resnet50_fpn, rewritten from its formulas."""
        sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
        out = []
        for scales, (gh, gw) in zip(sizes, grid_sizes):
            scales = torch.as_tensor(scales, dtype=torch.float32)
            ratios = torch.as_tensor((0.5, 1.0, 2.0), dtype=torch.float32)
            h_ratios = torch.sqrt(ratios)
            w_ratios = 1 / h_ratios
            ws = (w_ratios[:, None] * scales[None, :]).view(-1)
            hs = (h_ratios[:, None] * scales[None, :]).view(-1)
            base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
            stride_h = torch.tensor(image_size[0] // gh, dtype=torch.int64)
            stride_w = torch.tensor(image_size[1] // gw, dtype=torch.int64)
            shift_y, shift_x = torch.meshgrid(torch.arange(0, gh, dtype=torch.int32) * stride_h,
                                              torch.arange(0, gw, dtype=torch.int32) * stride_w, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(out)

    for image_size in [(64, 96), (800, 1216)]:
        grid_sizes = ceil_feature_sizes(image_size)
        expected = torchvision_anchors(image_size, grid_sizes)
        assert expected.dtype == torch.float32
        anchors = AnchorGenerator("torchvision")(image_size, grid_sizes)
        np.testing.assert_array_equal(anchors, expected.numpy())
