"""minidet.plots: every picture is written as a PNG that matplotlib reads back, of the right size where the size is
defined, and the awkward inputs (one row, no rows, no detections, fewer images than columns, a class without
ground truth) either draw or raise an error that says what to do."""

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from minidet import plots

CLASSES = ("circle", "square", "triangle", "cross")


def read_png(path):
    """The (H, W, channels) pixels of a PNG, after checking the file exists and is not empty."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 0 and pixels.shape[1] > 0
    return pixels


def metrics_rows(count):
    """Rows shaped like metrics.jsonl's: falling losses, a warm-up then a x0.1 step of the learning rate."""
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, count + 1):
        classification = 1.0 / step + 0.1 + abs(rng.normal(0, 0.02))
        box_regression = 0.5 / step + 0.05
        rows.append({"step": step, "epoch": step // 10, "lr": 0.02 * min(1, step / 5) * (0.1 if step > 20 else 1),
                     "loss": classification + box_regression, "classification": classification,
                     "box_regression": box_regression, "num_positive": 10, "num_ignored": 3, "num_negative": 900,
                     "grad_norm": 1.0, "seconds": 0.3})
    return rows


def image_and_detections(height=48, width=64, count=3, seed=0):
    """An image (3, H, W) in [0, 1], its detections (scores from 0.1 to 0.9) and ground truth."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (3, height, width)).astype(np.float32)
    x1 = rng.uniform(0, width / 2, count)
    y1 = rng.uniform(0, height / 2, count)
    boxes = np.stack([x1, y1, x1 + width / 3, y1 + height / 3], axis=1).astype(np.float32)   # (count, 4)
    labels = np.arange(count, dtype=np.int64) % len(CLASSES)
    detections = {"boxes": boxes, "scores": np.linspace(0.1, 0.9, count, dtype=np.float32), "labels": labels}
    return image, detections, {"boxes": boxes + 1, "labels": labels}


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions would save, kept instead of written, to look inside them."""
    kept = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: kept.append(fig) or str(path))
    return kept


def no_detections():
    return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int64)}


# --- plot_losses ----------------------------------------------------------------------------------------------------
def test_plot_losses_writes_a_png_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "loss.png"
    assert plots.plot_losses(metrics_rows(30), path, smooth=5) == str(path)
    read_png(path)


def test_plot_losses_draws_raw_and_averaged_curves_on_log_axes(figures):
    plots.plot_losses(metrics_rows(30), "unused.png", smooth=5)
    loss_ax, lr_ax = figures[0].axes
    assert len(loss_ax.lines) == 6                        # three losses, each raw and averaged
    assert loss_ax.get_yscale() == "log" and lr_ax.get_yscale() == "log"


def test_plot_losses_draws_a_single_row(tmp_path):
    read_png(plots.plot_losses(metrics_rows(1), tmp_path / "loss.png"))


def test_plot_losses_with_a_zero_loss_falls_back_to_a_linear_axis(figures):
    rows = metrics_rows(5)
    rows[2]["box_regression"] = 0.0           # a batch with no positive anchors: nothing for the box loss to learn
    plots.plot_losses(rows, "unused.png")
    assert figures[0].axes[0].get_yscale() == "linear"


def test_plot_losses_rejects_empty_rows(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        plots.plot_losses([], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_plot_losses_names_a_missing_key(tmp_path):
    rows = metrics_rows(3)
    del rows[1]["lr"]
    with pytest.raises(ValueError, match=r"row 1 has no \['lr'\]"):
        plots.plot_losses(rows, tmp_path / "loss.png")


@pytest.mark.parametrize("smooth", [0, 2.5])
def test_plot_losses_rejects_a_bad_window(tmp_path, smooth):
    with pytest.raises(ValueError, match="smooth"):
        plots.plot_losses(metrics_rows(3), tmp_path / "loss.png", smooth=smooth)


def test_moving_average_is_the_trailing_mean():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = [1.0, 1.5, 2.0, 3.0, 4.0]      # the first two average what there is so far, then windows of 3
    np.testing.assert_allclose(plots._moving_average(values, 3), expected)


# --- detections -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width", [(48, 64), (37, 101)])
def test_save_detections_is_the_size_of_the_image(tmp_path, height, width):
    image, detections, _ = image_and_detections(height, width)
    pixels = read_png(plots.save_detections(image, detections, CLASSES, tmp_path / "out" / "detected.png"))
    assert pixels.shape[:2] == (height, width)


def test_save_detections_shrinks_a_large_image_and_its_boxes(tmp_path):
    image = np.zeros((3, 60, 100), dtype=np.float32)
    detections = {"boxes": np.array([[50, 0, 100, 60]], np.float32), "scores": np.array([0.9], np.float32),
                  "labels": np.array([0])}
    pixels = read_png(plots.save_detections(image, detections, CLASSES, tmp_path / "big.png", max_side=50))
    assert pixels.shape[:2] == (30, 50)
    # The box covers the right half of the image: drawn there in the small picture, nothing in the left half.
    assert pixels[:, 30:, :3].max() > 0.2 and pixels[5:25, 2:20, :3].max() == 0

def test_save_detections_without_detections_shows_the_image(tmp_path):
    image, _, _ = image_and_detections()
    pixels = read_png(plots.save_detections(image, no_detections(), CLASSES, tmp_path / "empty.png"))
    # Nothing is drawn over the image, and the PNG holds its 8-bit pixels.
    expected = np.round(image.transpose(1, 2, 0) * 255) / 255
    np.testing.assert_allclose(pixels[..., :3], expected, atol=1.5 / 255)


def test_draw_detections_draws_only_scores_above_the_threshold():
    image, detections, targets = image_and_detections(count=5)     # scores 0.1 to 0.9, labels 0, 1, 2, 3, 0
    ax = Figure().add_subplot()
    assert plots.draw_detections(ax, image, detections, CLASSES, score_thresh=0.4, targets=targets) == 3
    labels = sorted(text.get_text() for text in ax.texts)
    assert labels == ["circle 0.90", "cross 0.70", "triangle 0.50"]     # labels 2, 3, 0 of the last three
    assert len(ax.patches) == 3 + 2 * 5          # a box per detection shown, two lines per ground-truth box
    assert ax.get_xlim() == (0, 64) and ax.get_ylim() == (48, 0)


def test_draw_detections_colours_each_class_the_same():
    image, detections, _ = image_and_detections(count=8)             # labels 0, 1, 2, 3, 0, 1, 2, 3
    ax = Figure().add_subplot()
    plots.draw_detections(ax, image, detections, CLASSES, score_thresh=0)
    # The scores rise with the index, so the boxes are drawn in index order.
    edges = [tuple(patch.get_edgecolor()) for patch in ax.patches]
    assert edges == [tuple(plots.class_colour(label, len(CLASSES))) for label in detections["labels"]]
    assert edges[:4] == edges[4:] and len(set(edges)) == 4


def test_draw_detections_names_a_label_without_a_class_name():
    image, detections, _ = image_and_detections(count=4)
    with pytest.raises(ValueError, match="label 3 but there are 3 class names"):
        plots.draw_detections(Figure().add_subplot(), image, detections, CLASSES[:3])


def test_draw_detections_rejects_a_channels_last_image():
    image, detections, _ = image_and_detections()
    with pytest.raises(ValueError, match=r"transpose\(2, 0, 1\)"):
        plots.draw_detections(Figure().add_subplot(), image.transpose(1, 2, 0), detections, CLASSES)


@pytest.mark.parametrize("count,columns", [(3, 4), (5, 2), (1, 4)])
def test_plot_detection_grid_with_any_number_of_images(tmp_path, count, columns):
    items = [image_and_detections(seed=i) for i in range(count)]
    images = [image for image, _, _ in items]
    detections = [found for _, found, _ in items]
    detections[0] = no_detections()
    targets = [target for _, _, target in items]
    read_png(plots.plot_detection_grid(images, detections, CLASSES, tmp_path / "grid.png", targets=targets,
                                       columns=columns))


def test_plot_detection_grid_takes_a_batch_array_without_targets(tmp_path):
    image, detections, _ = image_and_detections()
    read_png(plots.plot_detection_grid(np.stack([image, image]), [detections, no_detections()], CLASSES,
                                       tmp_path / "grid.png"))


def test_plot_detection_grid_rejects_mismatched_lengths(tmp_path):
    image, detections, _ = image_and_detections()
    with pytest.raises(ValueError, match="2 images, 1 detections"):
        plots.plot_detection_grid([image, image], [detections], CLASSES, tmp_path / "grid.png")
    with pytest.raises(ValueError, match="no images"):
        plots.plot_detection_grid([], [], CLASSES, tmp_path / "grid.png")


# --- precision-recall -----------------------------------------------------------------------------------------------
def coco_precision(num_classes=4):
    """A (10, 101, K) array like pycocotools' precision: non-increasing in recall, lower at stricter IoU."""
    recall = np.linspace(0, 1, 101)
    iou = np.linspace(0.5, 0.95, 10)[:, None, None]                                   # (10, 1, 1)
    quality = np.linspace(0.9, 0.5, num_classes)[None, None, :]                       # (1, 1, K)
    precision = np.clip(1 - recall[None, :, None] ** (4 * quality * (1 - iou) + 0.2), 0, 1)   # (10, 101, K)
    return precision, recall


def test_plot_precision_recall_skips_a_class_without_ground_truth(tmp_path):
    precision, recall = coco_precision()
    precision[:, :, 3] = -1                               # "cross" has no ground truth
    read_png(plots.plot_precision_recall(precision, recall, CLASSES, tmp_path / "pr" / "pr.png"))


def test_plot_precision_recall_legend_gives_each_class_its_ap(figures):
    precision, recall = coco_precision()
    precision[:, :, 3] = -1
    plots.plot_precision_recall(precision, recall, CLASSES, "unused.png")
    left, right = figures[0].axes
    for ax, t in ((left, 0), (right, 5)):                 # IoU 0.50 and IoU 0.75
        texts = [text.get_text() for text in ax.get_legend().get_texts()]
        for k in range(3):
            assert f"{CLASSES[k]}: AP {precision[t, :, k].mean():.3f}" in texts
        assert "cross: no ground truth, skipped" in texts
        assert f"mAP {precision[t, :, :3].mean():.3f} over 3 of 4 classes" in ax.get_title()


def test_plot_precision_recall_with_no_ground_truth_at_all(figures):
    precision, recall = coco_precision(2)
    plots.plot_precision_recall(-np.ones_like(precision), recall, CLASSES[:2], "unused.png")
    assert all("no class has ground truth" in ax.get_title() for ax in figures[0].axes)


def test_plot_precision_recall_explains_the_five_dimensional_array(tmp_path):
    precision, recall = coco_precision()
    whole = np.broadcast_to(precision[..., None, None], precision.shape + (4, 3))    # (T, R, K, areas, max dets)
    with pytest.raises(ValueError, match=r"precision\[:, :, :, 0, -1\]"):
        plots.plot_precision_recall(whole, recall, CLASSES, tmp_path / "pr.png")
    with pytest.raises(ValueError, match="one column per class"):
        plots.plot_precision_recall(precision, recall, CLASSES[:3], tmp_path / "pr.png")


def test_plot_precision_recall_rejects_a_partly_undefined_class(tmp_path):
    precision, recall = coco_precision()
    precision[0, 50:, 1] = -1                  # pycocotools never does this: a wrongly sliced array
    with pytest.raises(ValueError, match="'square' at IoU 0.50 has -1 at some recall points"):
        plots.plot_precision_recall(precision, recall, CLASSES, tmp_path / "pr.png")
