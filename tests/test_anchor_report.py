"""The anchor report: best IoUs and levels of hand-placed boxes, the unmatchable share, empty data, the pictures."""

import math

import numpy as np
import pytest
from matplotlib.image import imread

import minidet as md
from minidet.anchor_report import AnchorStats, anchor_statistics, fit_anchors, plot_anchor_report, plot_matched_anchors
from minidet.boxes import box_iou
from minidet.data import Shapes
from minidet.models import RetinaNet


class BoxesOnBlank:
    """A hand-made dataset: item i is a grey (3, H_i, W_i) image with the boxes given for it, all of class 0."""

    classes = ("thing",)

    def __init__(self, items):
        self.items = [(size, np.asarray(boxes, dtype=np.float32).reshape(-1, 4)) for size, boxes in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        (height, width), boxes = self.items[index]
        image = np.full((3, height, width), 0.5, dtype=np.float32)
        return image, {"boxes": boxes, "labels": np.zeros(len(boxes), dtype=np.int64)}


def square(cx, cy, side):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


# Paper anchors are centred on the cells: (i + 0.5) * stride. A square box the size of a level's first anchor
# (4 x stride), centred on one of its cells, is that anchor exactly.
P3_EXACT = square(20, 20, 32)      # stride 8: centres 4, 12, 20, ...
TINY = square(40, 40, 8)           # IoU <= 8^2 / 32^2 = 0.0625 with any anchor
P4_EXACT = square(40, 40, 64)      # stride 16: centres 8, 24, 40, ...
P5_EXACT = square(80, 80, 128)     # stride 32: centres 16, 48, 80, ...


@pytest.fixture
def dataset():
    return BoxesOnBlank([((64, 64), [P3_EXACT, TINY]),
                         ((192, 192), [P4_EXACT, P5_EXACT]),
                         ((50, 70), [])])                    # no boxes, and a size that needs padding


def test_boxes_equal_to_anchors_have_iou_1_on_their_level_and_a_tiny_box_is_unmatchable(dataset):
    stats = anchor_statistics(dataset)
    assert isinstance(stats, AnchorStats) and stats.preset == "paper" and stats.low_quality_matches is False
    assert stats.num_images == 3 and stats.num_boxes == 4
    np.testing.assert_allclose(stats.box_sizes, [32, 8, 64, 128])
    np.testing.assert_allclose(stats.best_iou, [1, 8 ** 2 / 32 ** 2, 1, 1], rtol=1e-6)
    # The tiny box fits inside every P3 anchor around it, all with IoU 64 / 1024: the tie goes to P3.
    assert stats.best_level.tolist() == [0, 0, 1, 2]
    assert stats.image_index.tolist() == [0, 0, 1, 1]
    assert stats.level_names == ("P3", "P4", "P5", "P6", "P7")
    assert stats.level_counts.tolist() == [2, 1, 1, 0, 0]
    assert stats.unmatchable.tolist() == [False, True, False, False]
    assert stats.share_unmatchable == 0.25
    assert stats.iou_threshold == 0.5


def test_anchor_sizes_and_the_range_of_matchable_sizes():
    stats = anchor_statistics(BoxesOnBlank([]))
    assert len(stats.anchor_sizes) == 5 and all(len(sizes) == 3 for sizes in stats.anchor_sizes)
    np.testing.assert_allclose([sizes[0] for sizes in stats.anchor_sizes], [32, 64, 128, 256, 512])
    np.testing.assert_allclose(stats.anchor_sizes[-1][-1], 512 * 2 ** (2 / 3))
    # Half the area of a 32 x 32 anchor, twice the area of the largest one.
    np.testing.assert_allclose(stats.matchable_size_range, (math.sqrt(512), math.sqrt(2) * 512 * 2 ** (2 / 3)),
                               rtol=1e-5)
    # The torchvision preset rounds its 0.5-ratio P3 anchor to 46 x 22 = 1012 pixels: the bound moves to 22.5.
    torchvision = anchor_statistics(BoxesOnBlank([]), preset="torchvision")
    np.testing.assert_allclose(torchvision.matchable_size_range[0], math.sqrt(1012 / 2), rtol=1e-6)


def test_the_best_iou_is_over_the_anchors_the_model_itself_builds(dataset):
    """Compare with the anchors of a real RetinaNet on the padded image: the feature sizes come from its layers."""
    rng = np.random.default_rng(0)
    height, width = 83, 150                                  # padded to 96 x 160: P6, P7 are rounded up
    xy = rng.uniform(0, [width, height], size=(6, 2))
    wh = rng.uniform(10, 90, size=(6, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    for preset in ("paper", "torchvision"):
        stats = anchor_statistics(BoxesOnBlank([((height, width), boxes)]), preset=preset)
        model = RetinaNet(num_classes=1, backbone="resnet_small", fpn_channels=8, preset=preset)
        _, _, anchors, per_level = model.head_outputs(md.tensor(np.zeros((1, 3, 96, 160), dtype=np.float32)))
        iou = box_iou(anchors, boxes)                        # (M, G)
        level_of_anchor = np.repeat(np.arange(5), per_level)  # (M,)
        np.testing.assert_array_equal(stats.best_iou, iou.max(axis=0), err_msg=preset)
        np.testing.assert_array_equal(stats.best_level, level_of_anchor[iou.argmax(axis=0)], err_msg=preset)


def test_max_images_looks_at_the_first_images_only(dataset):
    stats = anchor_statistics(dataset, max_images=1)
    assert stats.num_images == 1 and stats.num_boxes == 2 and stats.share_unmatchable == 0.5
    with pytest.raises(ValueError, match="max_images"):
        anchor_statistics(dataset, max_images=-1)


def test_summary_says_what_unmatchable_boxes_mean_and_what_to_do(dataset):
    text = anchor_statistics(dataset).summary()
    assert "4 in 2 images; images without boxes: 1" in text
    assert "1 of 4 boxes (25.0%)" in text
    assert "no positive anchor" in text
    assert "1 are smaller than 22.6 px" in text
    assert "torchvision preset" in text                      # the low-quality matches, offered as a way out
    stats = anchor_statistics(dataset, preset="torchvision")
    text = stats.summary()
    assert stats.low_quality_matches and "low-quality matches" in text and "no positive anchor" not in text


def test_summary_of_matchable_data_has_no_suggestions():
    text = anchor_statistics(BoxesOnBlank([((64, 64), [P3_EXACT])])).summary()
    assert "0 of 1 boxes (0.0%)" in text and "suggestions" not in text


@pytest.mark.parametrize("items", [[], [((64, 64), []), ((40, 96), [])]], ids=["no images", "no boxes"])
def test_a_dataset_without_boxes_gives_a_clear_message_and_a_picture(items, tmp_path):
    with np.errstate(all="raise"):                           # no 0 / 0 anywhere
        stats = anchor_statistics(BoxesOnBlank(items))
        assert stats.num_boxes == 0 and stats.share_unmatchable == 0.0
        assert stats.level_counts.tolist() == [0] * 5
        assert stats.box_sizes.shape == stats.best_iou.shape == stats.best_level.shape == (0,)
        assert "no ground-truth boxes" in stats.summary()
    assert imread(plot_anchor_report(stats, tmp_path / "report.png")).ndim == 3


def test_the_pictures_are_written_where_asked_and_readable(dataset, tmp_path):
    stats = anchor_statistics(dataset)
    report = plot_anchor_report(stats, tmp_path / "new" / "folder" / "report.png")
    assert report == tmp_path / "new" / "folder" / "report.png"
    pixels = imread(report)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels[..., :3].std() > 0
    matched = plot_matched_anchors(dataset, [0, 1, 2], tmp_path / "matched.png", columns=2)
    assert matched == tmp_path / "matched.png" and imread(matched).shape[0] > 100
    assert imread(plot_matched_anchors(dataset, [1], str(tmp_path / "one.png"), preset="torchvision")).ndim == 3
    with pytest.raises(ValueError, match="at least one image"):
        plot_matched_anchors(dataset, [], tmp_path / "none.png")


# --- chosen anchors, resizing and fitting ---------------------------------------------------------------------------
def test_statistics_see_the_images_as_training_resizes_them():
    data = BoxesOnBlank([((1024, 512), [square(288, 544, 256)])])      # a P6 anchor, and halved a P5 one
    as_is = anchor_statistics(data)
    halved = anchor_statistics(data, max_size=512)                    # 1024 x 512 -> 512 x 256, the box 128 px
    assert as_is.box_sizes.tolist() == [256] and halved.box_sizes.tolist() == [128]
    assert as_is.best_iou[0] == pytest.approx(1.0) and halved.best_iou[0] == pytest.approx(1.0)
    assert as_is.best_level.tolist() == [3] and halved.best_level.tolist() == [2]


def test_statistics_with_other_anchors_are_those_of_a_model_built_with_them():
    data = BoxesOnBlank([((64, 64), [square(20, 20, 16), square(40, 40, 12)])])
    small = anchor_statistics(data, anchor_sizes=[16, 32, 64, 128, 256], aspect_ratios=[1.0])
    assert small.anchor_sizes[0] == pytest.approx((16, 16 * 2 ** (1 / 3), 16 * 2 ** (2 / 3)))
    assert small.best_iou[0] == pytest.approx(1.0) and not small.unmatchable[0]   # a 16 px anchor sits on it
    model = RetinaNet(1, backbone="resnet_small", fpn_channels=16, anchor_sizes=[16, 32, 64, 128, 256],
                      aspect_ratios=[1.0])
    _, _, anchors, _ = model.head_outputs(md.tensor(np.zeros((1, 3, 64, 64), np.float32)))
    expected = box_iou(anchors, data[0][1]["boxes"]).max(axis=0)
    np.testing.assert_allclose(small.best_iou, expected, rtol=1e-6)


def test_fitted_anchors_match_small_objects_and_leave_fitting_data_alone():
    small = Shapes(60, image_size=128, seed=0, min_size=10, max_size=40)
    fit = fit_anchors(small)
    assert fit.before.share_unmatchable > 0.4 and fit.after.share_unmatchable < 0.2
    assert fit.anchor_sizes[0] < 32 and fit.anchor_sizes == sorted(fit.anchor_sizes)
    assert anchor_statistics(small, anchor_sizes=fit.anchor_sizes, aspect_ratios=fit.aspect_ratios
                             ).share_unmatchable == fit.after.share_unmatchable
    assert f"{fit.before.share_unmatchable:.1%} -> {fit.after.share_unmatchable:.1%}" in fit.summary()
    assert "--anchor-sizes " + ",".join(f"{s:g}" for s in fit.anchor_sizes) in fit.summary()
    demo = fit_anchors(Shapes(30, image_size=128, seed=0))
    assert demo.anchor_sizes == [32, 64, 128, 256, 512] and demo.aspect_ratios == [0.5, 1.0, 2.0]


def test_summary_counts_the_boxes_that_overlap_no_anchor():
    data = BoxesOnBlank([((64, 64), [square(20, 20, 32), [900, 900, 910, 910]])])     # the second: far outside
    text = anchor_statistics(data).summary()
    assert "1 overlap no anchor at all (best IoU 0)" in text
    assert "promotes every anchor that misses it too" in anchor_statistics(data, preset="torchvision").summary()
    assert "overlap no anchor" not in anchor_statistics(BoxesOnBlank([((64, 64), [square(40, 40, 8)])])).summary()
