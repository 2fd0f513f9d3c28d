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
# # Step 7: IoU and matching anchors to objects
#
# To train, every anchor needs a target: which object, if any, it is responsible for. RetinaNet decides with one
# number, the **intersection over union** (IoU) of the anchor with each ground-truth box: the area they share
# divided by the area they cover together, from 0 (disjoint) to 1 (identical). Then, from each anchor's best IoU:
#
# - IoU >= 0.5: **positive**, assigned to that box: it learns the box's class and regresses towards the box;
# - IoU < 0.4: **background**: it learns "no object" for every class;
# - in between: **ignored**: too close to call, it adds nothing to the loss.
#
# The gap between 0.4 and 0.5 keeps the ambiguous anchors from pulling the classifier both ways. An option from
# Faster R-CNN, on in torchvision's preset, adds **low-quality matches**: each box also gets its best anchor(s),
# whatever their IoU, so no object goes without a positive anchor.

# %%

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from tutorial_setup import save  # shared by the steps: tutorials/tutorial_setup.py

from minidet.boxes import box_iou
from minidet.matching import BACKGROUND, IGNORED, match_anchors

# %% [markdown]
# ## IoU by hand
#
# The intersection of two boxes is the box from the larger top-left corner to the smaller bottom-right corner;
# if the boxes do not overlap, its width or height comes out negative and is clamped to 0.

# %%
def iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# %% [markdown]
# ## A worked example: six anchors, two objects
#
# A dog (40 x 50 pixels) and a thin cat (20 x 40), and six anchors placed to show every case. `box_iou` computes
# the whole (anchors, boxes) matrix at once by broadcasting; we check it against the loop.

# %%
boxes = np.array([[10, 10, 50, 60],                     # box 0: the dog
                  [70, 60, 90, 100]], dtype=np.float32)  # box 1: the cat, thin
names = ["dog", "cat"]
anchors = np.array([[12, 14, 52, 62],                   # a0: almost the dog
                    [22, 22, 62, 62],                   # a1: half on the dog
                    [30, 35, 70, 75],                   # a2: a corner of the dog
                    [0, 75, 30, 105],                   # a3: on nothing
                    [57.5, 57.5, 102.5, 102.5],         # a4: the cat's best anchor, but too large for it
                    [80, 70, 120, 110]], dtype=np.float32)  # a5: a corner of the cat

ious = box_iou(anchors, boxes)                          # (A, G) = (6, 2)
ious_hand = np.array([[iou(a, b) for b in boxes] for a in anchors])
np.testing.assert_allclose(ious, ious_hand, rtol=1e-6)
print("IoU matrix (rows: anchors, columns: dog, cat), box_iou equals the loop:")
print(ious.round(3))

# %% [markdown]
# ## The rules by hand, then `match_anchors`
#
# For each anchor: take its best box and that IoU, compare with the two thresholds. For the low-quality matches,
# take each box's best IoU over all anchors and promote every anchor that reaches it (ties included).

# %%
HIGH, LOW = 0.5, 0.4


def match_by_hand(ious, low_quality):
    best_box, best_iou = ious.argmax(axis=1), ious.max(axis=1)
    labels = np.where(best_iou >= HIGH, best_box, np.where(best_iou < LOW, BACKGROUND, IGNORED))
    if low_quality:
        is_best_of_a_box = (ious == ious.max(axis=0)).any(axis=1)       # (A, G) -> (A,)
        labels[is_best_of_a_box] = best_box[is_best_of_a_box]
    return labels


for low_quality in (False, True):
    matches, best = match_anchors(anchors, boxes, HIGH, LOW, allow_low_quality_matches=low_quality)
    np.testing.assert_array_equal(matches, match_by_hand(ious, low_quality))
print("match_by_hand equals minidet.matching.match_anchors, with and without low-quality matches")

# %% [markdown]
# Every label, explained:

# %%
paper, _ = match_anchors(anchors, boxes, HIGH, LOW)
torchvision, _ = match_anchors(anchors, boxes, HIGH, LOW, allow_low_quality_matches=True)
best_of_box = ious.max(axis=0)


def describe(m, a):
    best_iou, box = ious[a].max(), ious[a].argmax()
    if m >= 0 and best_iou < HIGH:
        return (f"low-quality positive -> {names[m]}: only {best_iou:.3f}, but no anchor does better "
                f"with the {names[m]} (its best IoU is {best_of_box[m]:.3f})")
    if m >= 0:
        return f"positive -> {names[m]}: best IoU {best_iou:.3f} >= {HIGH}"
    if m == IGNORED:
        return f"ignored: best IoU {best_iou:.3f} (with the {names[box]}) is between {LOW} and {HIGH}"
    if best_iou == 0:
        return "background: it touches no object (IoU 0)"
    return f"background: best IoU {best_iou:.3f} (with the {names[box]}) < {LOW}"


for mode, matches in (("paper (no low-quality matches)", paper), ("torchvision (low-quality matches)", torchvision)):
    print(mode)
    for a, m in enumerate(matches):
        print(f"  a{a}: {describe(m, a)}")
print("the cat has no anchor with IoU >= 0.5: without low-quality matches nothing learns to find it")
assert list(paper) == [0, IGNORED, BACKGROUND, BACKGROUND, BACKGROUND, BACKGROUND]
assert list(torchvision) == [0, IGNORED, BACKGROUND, BACKGROUND, 1, BACKGROUND]

# %% [markdown]
# ### The picture
#
# The two objects in black, each anchor coloured by its label. The anchor a4 changes label between the two
# presets: it is the cat's best anchor, at IoU 0.395, just under the background threshold.

# %%
colours = {"positive": "tab:green", "low-quality positive": "tab:purple", "ignored": "tab:orange",
           "background": "tab:grey"}


def kind(m, a):
    if m >= 0:
        return "positive" if ious[a].max() >= HIGH else "low-quality positive"
    return "ignored" if m == IGNORED else "background"


fig, axes = plt.subplots(1, 2, figsize=(15, 5.6))
for ax, (title, matches) in zip(axes, (("paper preset: IoU >= 0.5 positive, < 0.4 background", paper),
                                       ("torchvision preset: + low-quality matches", torchvision))):
    for g, (x1, y1, x2, y2) in enumerate(boxes):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fc="0.9", ec="black", lw=2.5))
        ax.text(x1 + 1, y1 + 4, names[g], fontsize=11, weight="bold", va="top")
    for a, (m, (x1, y1, x2, y2)) in enumerate(zip(matches, anchors)):
        k = kind(m, a)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colours[k], lw=2,
                               ls="-" if m >= 0 else "--"))
        ax.text(x2 - 1, y1 + 1, f"a{a}", color=colours[k], fontsize=10, ha="right", va="top", weight="bold")
    table = "\n".join(f"a{a}  IoU {ious[a].max():.3f}  {kind(m, a)}" + (f" ({names[m]})" if m >= 0 else "")
                      for a, m in enumerate(matches))
    ax.text(66, 2, table, fontsize=9, va="top", family="monospace")
    ax.set_xlim(-5, 168)
    ax.set_ylim(115, -5)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
handles = [Line2D([], [], color=c, lw=2, ls="-" if "positive" in k else "--", label=k) for k, c in colours.items()]
for ax in axes:
    ax.legend(handles=handles, loc="lower right", fontsize=9)
fig.suptitle("Matching six anchors to two objects: every label", fontsize=13, y=1.01)
fig.tight_layout()
save(fig, "07_matching.png")

# %% [markdown]
# ## Exercises
#
# `minidet.exercises.check` runs your function against minidet's on random and edge cases and explains the first
# difference. Here it is on minidet's own `box_iou`, and on an IoU with a classic slip, "+ 1" in every width
# and height (the convention of pixel indices that include both ends):

# %%
from minidet.boxes import box_iou  # noqa: E402  (the exercises' imports, kept next to them)
from minidet.exercises import ExerciseFailed, check  # noqa: E402

check("iou", box_iou)


def iou_plus_one(boxes1, boxes2):
    top_left = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    sides = np.maximum(np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:]) - top_left + 1, 0)
    inter = sides[..., 0] * sides[..., 1]
    area1 = np.prod(boxes1[:, 2:] - boxes1[:, :2] + 1, axis=1)
    area2 = np.prod(boxes2[:, 2:] - boxes2[:, :2] + 1, axis=1)
    return inter / (area1[:, None] + area2[None, :] - inter)


try:
    check("iou", iou_plus_one)
except ExerciseFailed as failure:
    print(failure)

# %% [markdown]
# 1. **Write IoU yourself** (`my_iou(boxes1, boxes2) -> (N, M)`) and pass `check("iou", my_iou)`.
# 2. **Write the matching rule** (`my_match(anchors, boxes) -> (A,)`: the best box's index where IoU >= 0.5, -1
#    below 0.4, -2 in between, the lowest box index among ties) and pass `check("match", my_match)`; one of its
#    cases has an anchor at IoU exactly 0.5.
# 3. **Thresholds.** Rerun the worked example with `match_anchors(anchors, boxes, high=0.6, low=0.5)`: which
#    labels change? Answer: only a1's, from ignored to background (its best IoU, 0.42, is now under `low`); a0,
#    at 0.805, stays positive. In general every anchor in [0.5, 0.6) turns from positive to ignored, and every
#    one in [0.4, 0.5) from ignored to background.
