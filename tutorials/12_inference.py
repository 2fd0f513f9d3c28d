# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 12: inference, non-maximum suppression and mAP
#
# The subnets give, for every anchor, K class probabilities and 4 box offsets: tens of thousands of guesses per
# image. Turning them into a short list of detections takes four steps (the paper's Section 4, and
# `RetinaNet.postprocess_detections`):
#
# 1. per pyramid level: the probability of every (anchor, class) pair, p = sigmoid(logit); keep pairs with
#    **p > 0.05**; of those, the **1000 best** (so at most a few thousand boxes are ever decoded);
# 2. decode the kept anchors' offsets into boxes (step 8) and clip them to the image;
# 3. all levels together: **non-maximum suppression** (NMS) at IoU 0.5, class by class;
# 4. keep the **100 best**.
#
# Then, to measure a detector: **average precision** (AP) per class, and its mean over classes (mAP), as COCO
# defines it. We build each piece by hand and check it against minidet's code and pycocotools.

# %%

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from tutorial_setup import OUT, SMALL, course_training, save, trained_detector  # tutorials/tutorial_setup.py

import minidet as md
from minidet.boxes import batched_nms, clip_boxes, decode_boxes, nms
from minidet.data import Shapes
from minidet.evaluate import coco_evaluate, predict_dataset
from minidet.plots import draw_detections, plot_precision_recall
from minidet.train import training_batch

try:
    import pycocotools  # noqa: F401  (coco_evaluate uses it: COCO's own implementation of the metric)
    HAVE_PYCOCOTOOLS = True
except ImportError:
    HAVE_PYCOCOTOOLS = False
    print("pycocotools is not installed: the comparisons with coco_evaluate are skipped (pip install pycocotools)")

# %% [markdown]
# ## The detector of step 11, on images it never saw
#
# Step 11 trained a detector on Shapes images; `trained_detector` (in `tutorial_setup.py`) loads it from step 11's
# run folder, or runs that training first if step 11 has not run yet. Everything below is measured on **held-out**
# images, drawn with another seed than the training images: a detector is only as good as it is on images it has
# not seen. (In the small run the detector has trained for 8 steps only and finds next to nothing; the code runs
# the same.)

# %%
model = trained_detector().eval()
SIZE = course_training().image_size
NUM_HELD_OUT = 8 if SMALL else 100
shapes = Shapes(NUM_HELD_OUT, image_size=SIZE, seed=1)          # the training images have seed 0
images, targets = training_batch([shapes[i] for i in range(4)], np.random.default_rng(0), 0.0, "cpu")
print(f"{NUM_HELD_OUT} held-out images of {SIZE} x {SIZE}; objects in the first four: "
      f"{[len(t['boxes']) for t in targets]}")

# %% [markdown]
# ## Greedy NMS by hand
#
# Around an object, many anchors fire: neighbouring positions, scales and aspect ratios all overlap it. NMS keeps
# one box per object: go through the boxes from the highest score down, and keep a box unless it overlaps a box
# already kept by more than the threshold (IoU > 0.5). It is greedy: the best box of a cluster wins, whatever the
# others say. **Class-wise** NMS does this for each class separately, so a cat and a dog that overlap are both kept.

# %%
def iou(a, b):                                         # step 7's, in the order of operations of box_iou
    width = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    height = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = width * height
    union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0


def nms_by_hand(boxes, scores, threshold):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])    # best first; ties keep their order
    keep = []
    for i in order:
        if all(iou(boxes[i], boxes[j]) <= threshold for j in keep):
            keep.append(i)
    return keep


def batched_nms_by_hand(boxes, scores, labels, threshold):
    keep = []
    for label in np.unique(labels):                                # each class on its own
        of_class = np.flatnonzero(labels == label)
        keep += [of_class[i] for i in nms_by_hand(boxes[of_class], scores[of_class], threshold)]
    return sorted(keep, key=lambda i: (-scores[i], i))              # all classes, best first


# %% [markdown]
# A worked example: three boxes on one square, two on a circle next to it, and one more box of the circle class
# on the square.

# %%
example_boxes = np.array([[10, 10, 50, 50], [12, 8, 52, 48], [14, 14, 50, 54],     # 0-2: on the square
                          [55, 20, 85, 50], [57, 22, 89, 52],                      # 3-4: on the circle
                          [11, 11, 49, 51]], dtype=np.float32)                     # 5: on the square
example_scores = np.array([0.9, 0.8, 0.6, 0.7, 0.65, 0.3], dtype=np.float32)
example_labels = np.array([1, 1, 1, 0, 0, 0])                                      # 1: square, 0: circle
for name, by_hand, minidet_keep in (
        ("nms", nms_by_hand(example_boxes, example_scores, 0.5), nms(example_boxes, example_scores, 0.5)),
        ("batched_nms", batched_nms_by_hand(example_boxes, example_scores, example_labels, 0.5),
         batched_nms(example_boxes, example_scores, example_labels, 0.5))):
    assert list(minidet_keep) == by_hand
    print(f"{name:12s} keeps boxes {[int(i) for i in by_hand]} (by hand and minidet.boxes.{name})")
print(f"box 1 against box 0: IoU {iou(example_boxes[0], example_boxes[1]):.3f} > 0.5, suppressed; box 5 is a circle "
      "on the square: class-blind NMS drops it, class-wise NMS keeps it")

# %% [markdown]
# ## From the subnets' outputs to detections, by hand
#
# `head_outputs` runs the network and returns the logits (M, K), the offsets (M, 4), the M anchors and how many
# of them each level has. The four steps by hand, for the first image:

# %%
SCORE_THRESH, TOPK, NMS_THRESH, DETECTIONS_PER_IMAGE = 0.05, 1000, 0.5, 100


def detect_by_hand(logits, deltas, anchors, per_level, image_size):
    num_classes = logits.shape[1]
    e = np.exp(-np.abs(logits))                                     # sigmoid without overflow (step 9)
    probabilities = np.where(logits >= 0, 1, e) / (1 + e)           # (M, K)
    boxes, scores, labels, counts = [], [], [], []
    start = 0
    for count in per_level:
        level = probabilities[start:start + count].reshape(-1)      # (M_l * K,) pair = anchor * K + class
        candidates = np.flatnonzero(level > SCORE_THRESH)           # 1. the threshold
        best = candidates[np.argsort(-level[candidates], kind="stable")[:TOPK]]   # ... and the top 1000
        anchor_index = start + best // num_classes
        decoded = decode_boxes(deltas[anchor_index], anchors[anchor_index])       # 2. decode (step 8)
        boxes.append(clip_boxes(decoded, image_size))                             #    and clip
        scores.append(level[best])
        labels.append(best % num_classes)
        counts.append((count * num_classes, len(candidates), len(best)))
        start += count
    boxes, scores, labels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
    keep = batched_nms_by_hand(boxes, scores, labels, NMS_THRESH)[:DETECTIONS_PER_IMAGE]   # 3. NMS, 4. top 100
    return (boxes[keep], scores[keep], labels[keep]), (boxes, scores, labels), counts


with md.no_grad():
    cls_logits, box_deltas, anchors, per_level = model.head_outputs(md.tensor(images[:1]))
(det_boxes, det_scores, det_labels), before_nms, counts = detect_by_hand(
    cls_logits.data[0], box_deltas.data[0], anchors, per_level, (SIZE, SIZE))
for level, (pairs, above, kept) in zip(range(3, 8), counts):
    print(f"P{level}: {pairs:6d} (anchor, class) pairs, {above:4d} above {SCORE_THRESH}, {kept:4d} kept")
print(f"before NMS {len(before_nms[1])} boxes, after NMS and the top {DETECTIONS_PER_IMAGE}: {len(det_scores)}")

minidet_detections = model.predict(images[:1])[0]
for key, by_hand in (("boxes", det_boxes), ("scores", det_scores), ("labels", det_labels)):
    np.testing.assert_array_equal(minidet_detections[key], by_hand)
print("detections by hand equal RetinaNet.predict's (boxes, scores and labels)")
for box, score, label in zip(det_boxes[:5], det_scores[:5], det_labels[:5]):
    print(f"  {Shapes.classes[label]:8s} {score:.3f}  box {[round(float(v), 1) for v in box]}")
print("ground truth:", [(Shapes.classes[label], [round(float(v), 1) for v in box])
                        for box, label in zip(targets[0]["boxes"], targets[0]["labels"])])

# %% [markdown]
# ### The picture: before and after NMS
#
# Left, every box that passed the threshold, drawn more opaque the higher its score: clusters of near-copies around
# each object. Right, what NMS leaves (boxes scoring 0.3 or more, drawn by `minidet.plots.draw_detections`), with
# the ground truth dashed.

# %%
fig, (before_ax, after_ax) = plt.subplots(1, 2, figsize=(11, 5.5))
image = shapes[0][0]
before_ax.imshow(image.transpose(1, 2, 0), extent=(0, SIZE, SIZE, 0), interpolation="nearest")
colours = plt.get_cmap("tab10")
boxes_b, scores_b, labels_b = before_nms
for i in np.argsort(scores_b):                                  # best drawn last, on top
    x1, y1, x2, y2 = boxes_b[i]
    before_ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colours(labels_b[i]), lw=0.8,
                                  alpha=float(scores_b[i])))                   # opacity = score
before_ax.set_xlim(0, SIZE)
before_ax.set_ylim(SIZE, 0)
before_ax.set_axis_off()
before_ax.set_title(f"before NMS: {len(scores_b)} boxes with p > {SCORE_THRESH}")
drawn = draw_detections(after_ax, image, minidet_detections, Shapes.classes, score_thresh=0.3, targets=targets[0])
after_ax.set_title(f"after class-wise NMS: {len(det_scores)} boxes, {drawn} scoring >= 0.3")
fig.legend(handles=[Rectangle((0, 0), 1, 1, fill=False, ec=colours(k), label=name)
                    for k, name in enumerate(Shapes.classes)], loc="lower center", ncol=4)
fig.tight_layout(rect=(0, 0.06, 1, 1))
save(fig, "12_nms.png")

# %% [markdown]
# ## Average precision by hand
#
# A detection is **right** (a true positive) if it overlaps a ground-truth box of its class, in its image, with
# IoU >= a threshold t, and that box has not been claimed by a better-scoring detection; otherwise it is a false
# positive (a miss, or a duplicate). For one class, over all images:
#
# 1. sort all the class's detections by score, best first;
# 2. go down the list: each detection takes the unclaimed ground-truth box it overlaps most, if IoU >= t;
# 3. after each detection, **precision** = right so far / detections so far, **recall** = right so far / boxes;
# 4. make precision monotone: at each point, the best precision at this recall or any higher one;
# 5. read it at the 101 recall levels 0, 0.01, ..., 1 (0 beyond the highest recall reached); AP is the mean.
#
# COCO's "AP" averages this over 10 thresholds t = 0.50, 0.55, ..., 0.95 and over the classes; "AP50" is t = 0.5
# alone (PASCAL VOC's metric). A worked example first: circles in three images, six detections.

# %%
class Examples(list):
    """A tiny dataset: a list of (image, target) pairs with the class names, as coco_evaluate expects."""
    classes = Shapes.classes


CIRCLE = 0
blank = np.zeros((3, 100, 100), dtype=np.float32)
example = Examples([
    (blank, {"boxes": np.array([[10, 10, 40, 40], [60, 10, 90, 40]], np.float32), "labels": np.array([0, 0])}),
    (blank, {"boxes": np.array([[20, 50, 60, 90]], np.float32), "labels": np.array([0])}),
    (blank, {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}),
])
example_detections = [   # per image: boxes, scores, labels, as RetinaNet.predict gives them
    {"boxes": np.array([[12, 11, 41, 41], [16, 14, 46, 44], [64, 16, 94, 46]], np.float32),
     "scores": np.array([0.95, 0.8, 0.6], np.float32), "labels": np.array([0, 0, 0])},
    {"boxes": np.array([[22, 52, 60, 92], [70, 5, 100, 35]], np.float32),
     "scores": np.array([0.9, 0.4], np.float32), "labels": np.array([0, 0])},
    {"boxes": np.array([[30, 30, 70, 70]], np.float32), "scores": np.array([0.7], np.float32),
     "labels": np.array([0])},
]
RECALL_POINTS = np.linspace(0, 1, 101)


def precision_recall(dataset, detections, label, threshold, verbose=False):
    """Steps 1-4 for one class: (precision, recall) after each detection, and the number of ground-truth boxes."""
    records = []                                                   # (score, image, box)
    for i, d in enumerate(detections):
        mine = np.flatnonzero(d["labels"] == label)
        mine = mine[np.argsort(-d["scores"][mine], kind="stable")][:100]   # COCO counts 100 per image
        records += [(float(d["scores"][j]), i, d["boxes"][j]) for j in mine]
    records.sort(key=lambda r: -r[0])                               # 1. best first (a stable sort)
    truth = [t["boxes"][t["labels"] == label].astype(np.float64) for _, t in dataset]
    num_boxes = sum(len(b) for b in truth)
    claimed, right = set(), []
    for score, i, box in records:                                  # 2. claim the best unclaimed box
        best, best_iou = None, threshold
        for g, true_box in enumerate(truth[i]):
            overlap = iou(box.astype(np.float64), true_box)
            if (i, g) not in claimed and overlap >= best_iou:
                best, best_iou = g, overlap
        right.append(best is not None)
        if best is not None:
            claimed.add((i, best))
        if verbose:
            why = (f"right: box {best} of image {i}, IoU {best_iou:.3f}" if best is not None else
                   "wrong: no unclaimed box of its class with IoU >= "
                   f"{threshold} (best IoU with any: "
                   f"{max([iou(box.astype(np.float64), b) for b in truth[i]], default=0):.3f})")
            print(f"  score {score:.2f}, image {i}: {why}")
    right = np.array(right, dtype=bool)
    true_positives = np.cumsum(right)
    precision = true_positives / np.arange(1, len(right) + 1)       # 3.
    recall = true_positives / max(num_boxes, 1)
    return precision, recall, num_boxes


def average_precision(precision, recall):
    envelope = np.maximum.accumulate(precision[::-1])[::-1]          # 4. best precision at this recall or higher
    where = np.searchsorted(recall, RECALL_POINTS, side="left")      # 5. first point reaching each recall level
    interpolated = np.where(where < len(envelope), envelope[np.minimum(where, len(envelope) - 1)], 0)
    return interpolated.mean(), interpolated, envelope


print("circles, IoU threshold 0.5, best score first:")
precision_example, recall_example, _ = precision_recall(example, example_detections, CIRCLE, 0.5, verbose=True)
print("  precision", precision_example.round(3).tolist())
print("  recall   ", recall_example.round(3).tolist())
ap50_example, interpolated50, envelope50 = average_precision(precision_example, recall_example)
ap75_example = average_precision(*precision_recall(example, example_detections, CIRCLE, 0.75)[:2])[0]
print(f"AP50 {ap50_example:.4f} = (67 recall levels up to 0.66 at precision 1 + 34 levels at 0.6) / 101 "
      f"= {(67 + 34 * 0.6) / 101:.4f}; AP75 {ap75_example:.4f}: at IoU 0.75 the 0.60 detection no longer counts")

# %% [markdown]
# The same numbers from `minidet.evaluate.coco_evaluate`, which runs pycocotools, COCO's own implementation.
# The other three classes have no ground truth in this example: pycocotools marks them -1 and leaves them out of
# the means.

# %%
if HAVE_PYCOCOTOOLS:
    coco = coco_evaluate(example, example_detections)
    print(f"coco_evaluate: circle AP50 {coco.per_class_ap50['circle']:.4f}, AP {coco.per_class_ap['circle']:.4f}; "
          f"precision array {coco.precision.shape}; other classes {[coco.per_class_ap[c] for c in Shapes.classes[1:]]}")
    np.testing.assert_allclose(coco.precision[0, :, CIRCLE], interpolated50, atol=1e-12)
    assert abs(coco.per_class_ap50["circle"] - ap50_example) < 1e-12
    assert abs(coco.precision[5, :, CIRCLE].mean() - ap75_example) < 1e-12      # IoU 0.75: threshold 5 of 10
    print("the 101 precisions by hand equal pycocotools' at IoU 0.5, and AP50 and AP75 agree")


# %% [markdown]
# ## mAP of the model, by hand and by pycocotools
#
# The same functions over every class and the 10 thresholds, on the detector's detections of the held-out
# images. At full size, with step 11's 960 steps of training, they gave AP 0.741 and AP50 0.965 on these 100
# images: the detector finds the shapes in images it never saw. `predict_dataset` prepares each image as training
# does (normalised, padded to a multiple of 32) and returns one dict per image; `coco_evaluate` scores them
# (`evaluate` does both).

# %%
THRESHOLDS = np.linspace(0.5, 0.95, 10)


def class_ap(dataset, detections, label, threshold):
    """AP of one class at one IoU threshold; None (left out of the means) if the class has no ground truth."""
    precision, recall, num_boxes = precision_recall(dataset, detections, label, threshold)
    if num_boxes == 0:
        return None
    return average_precision(precision, recall)[0] if len(precision) else 0.0     # no detections: AP 0


def coco_map_by_hand(dataset, detections):
    """(K, 10) AP per class and IoU threshold (nan: no ground truth), and COCO's AP and AP50 from it."""
    table = np.array([[class_ap(dataset, detections, k, t) for t in THRESHOLDS]
                      for k in range(len(dataset.classes))], dtype=float)             # None -> nan
    return table, float(np.nanmean(table)), float(np.nanmean(table[:, 0]))


detections = predict_dataset(model, shapes, progress=False)
table, ap, ap50 = coco_map_by_hand(shapes, detections)
print(f"by hand:       AP {ap:.4f}, AP50 {ap50:.4f}")
if HAVE_PYCOCOTOOLS:
    result = coco_evaluate(shapes, detections)
    print(f"coco_evaluate: AP {result.ap:.4f}, AP50 {result.ap50:.4f}")
    assert abs(result.ap - ap) < 1e-9 and abs(result.ap50 - ap50) < 1e-9
    for k, name in enumerate(Shapes.classes):
        expected = -1 if np.isnan(table[k, 0]) else table[k, 0]
        assert abs(result.per_class_ap50[name] - expected) < 1e-9
    print("AP, AP50 and every class's AP50 agree; pycocotools' summary:")
    print(result.summary())


# %% [markdown]
# ### The picture: precision and recall
#
# Left: the worked example at IoU 0.5: precision after each detection (numbered dots), its monotone envelope, and
# the 101 levels at which it is read; their mean, the shaded area, is the AP. Right: how AP falls as the IoU
# threshold rises, for the worked example and for the model: COCO's AP is the mean of this curve.

# %%
fig, (pr_ax, iou_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
pr_ax.fill_between(RECALL_POINTS, interpolated50, step="post", color="tab:blue", alpha=0.15,
                   label=f"101-point interpolation, AP50 = {ap50_example:.3f}")
pr_ax.step(recall_example, envelope50, where="post", color="tab:blue", lw=2, label="monotone envelope")
pr_ax.plot(recall_example, precision_example, "o", color="black", label="after each detection")
for n, (r, p) in enumerate(zip(recall_example, precision_example)):
    pr_ax.annotate(f"{n + 1}", (r, p), textcoords="offset points", xytext=(6, -12), fontsize=9)
pr_ax.set_xlabel("recall")
pr_ax.set_ylabel("precision")
pr_ax.set_xlim(0, 1.05)
pr_ax.set_ylim(0, 1.05)
pr_ax.set_title("worked example: circles, IoU 0.5")
pr_ax.legend(loc="lower left")
pr_ax.grid(alpha=0.3)

example_table = coco_map_by_hand(example, example_detections)[0]
for name, per_threshold in (("worked example (circles)", example_table),
                           (f"the detector, {NUM_HELD_OUT} held-out images", table)):
    curve = np.nanmean(per_threshold, axis=0)                                  # (10,) mean over the classes
    iou_ax.plot(THRESHOLDS, curve, "o-", lw=2, label=f"{name}: AP = mean {curve.mean():.3f}")
iou_ax.set_xlabel("IoU threshold t")
iou_ax.set_ylabel("AP at t (mean over classes)")
iou_ax.set_ylim(0, 1.05)
iou_ax.set_title("AP falls as the boxes must fit better")
iou_ax.legend(loc="lower left")
iou_ax.grid(alpha=0.3)
fig.tight_layout()
save(fig, "12_precision_recall.png")

if HAVE_PYCOCOTOOLS:   # minidet's own plot of pycocotools' curves, per class at IoU 0.5 and 0.75
    print("saved", plot_precision_recall(result.precision, result.recall_points, Shapes.classes,
                                         OUT / "12_pr_curves_per_class.png"))

# %% [markdown]
# ## Exercises
#
# 1. **Write greedy NMS** (`my_nms(boxes, scores, iou_threshold)`, the kept indices, highest score first) and pass
#    `from minidet.exercises import check; check("nms", my_nms)`. One case has a box at IoU exactly 0.5 with a
#    better one: it stays (the rule drops IoU > threshold).
# 2. **Write AP** (`my_ap(scores, is_true_positive, num_ground_truth)`, COCO's 101-point AP of one class) and pass
#    `check("average_precision", my_ap)`; `minidet.evaluate.average_precision` is minidet's, equal to
#    pycocotools'.
# 3. **The NMS threshold.** Rerun the NMS example with `iou_threshold=0.3`, then 0.7: which way does the number of
#    kept boxes go? Answer: at 0.3 never more than at 0.5 (more boxes count as duplicates), at 0.7 never fewer.
