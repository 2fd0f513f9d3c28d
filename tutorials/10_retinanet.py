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
# # Step 10: the whole model
#
# Steps 3 to 9 built every part of RetinaNet. Put together (the article's Fig. 1, drawn below from a real model):
#
# ```
# images (N, 3, H, W)
#   -> backbone                 C3, C4, C5                       step 3
#   -> feature pyramid          P3 ... P7                        step 4
#   -> classification subnet    (N, M, K) logits, M anchors      step 5
#   -> regression subnet        (N, M, 4) offsets                step 5
# training: anchors (step 6) matched to the boxes (step 7); focal loss (step 9) + smooth L1 on the offsets (step 8)
# ```
#
# Both losses are sums over anchors divided by the number of **positive** anchors in the batch: the few objects
# set the scale, not the many easy negatives. We compute the two losses by hand from the parts, compare them with
# `RetinaNet`'s, and look at which anchors learn each object.

# %%

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle
from tutorial_setup import SMALL, save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.boxes import encode_boxes
from minidet.matching import BACKGROUND, IGNORED, match_anchors
from minidet.models import RetinaNet
from minidet.testing import assert_close

# %% [markdown]
# ## A model and an image with three objects
#
# A small backbone so that this runs in seconds on a CPU (`backbone="resnet50"` and `fpn_channels=256` are the
# paper's), three classes, and one synthetic image with a small, a medium and a large object.

# %%
SIZE, CHANNELS = (128, 32) if SMALL else (256, 64)
md.manual_seed(0)
model = RetinaNet(num_classes=3, backbone="resnet_small", fpn_channels=CHANNELS)
scale = SIZE / 256
boxes = np.array([[30, 40, 62, 70], [110, 20, 190, 90], [60, 110, 230, 240]], dtype=np.float32) * scale
labels = np.array([0, 1, 2])
names = ["small (class 0)", "medium (class 1)", "large (class 2)"]
image = np.full((1, 3, SIZE, SIZE), 0.2, dtype=np.float32)
for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels):
    image[0, :, y1:y2, x1:x2] = 0.45 + 0.2 * label      # grey squares, one shade per class
images = md.tensor(image)
targets = [{"boxes": boxes, "labels": labels}]
print(f"image {SIZE} x {SIZE}; boxes (x1, y1, x2, y2):\n{boxes}")

# %% [markdown]
# ## Fig. 1: the architecture of this model
#
# The article's Fig. 1, drawn from the model itself: each box is one feature map of this image, labelled with its
# real shape (channels x height x width), and the wider the more cells it has across. The backbone's C3-C5 feed the
# pyramid through 1x1 lateral convolutions; the top-down path upsamples each level and adds it to the one below;
# P6 and P7 are strided 3x3 convolutions on top. Every level goes through the same two subnets (shared weights),
# whose outputs are concatenated over the levels into one row per anchor.

# %%
backbone_maps = model.backbone(images)                                # [C3, C4, C5]
features = model.fpn(backbone_maps)                                   # [P3, ..., P7]
anchors_per_level = model.anchor_generator.num_anchors_per_level([tuple(p.shape[-2:]) for p in features])
per_cell = anchors_per_level[0] // (features[0].shape[-2] * features[0].shape[-1])     # A anchors per cell


def millions(module):
    return sum(p.data.size for p in module.parameters()) / 1e6


fig, ax = plt.subplots(figsize=(13, 6.2))
column_x = {"backbone": 2.2, "pyramid": 4.8, "subnets": 7.5}
top = features[0].shape[-1]                                           # P3's width in cells: the widest box
HALF_HEIGHT = 0.28


def box(x, y, cells, text, colour, label="left"):
    """A feature map as a box centred at (x, y), as wide as ``cells`` relative to P3, its shape written on its
    ``label`` side ("left", "right" (above the arrow that leaves it), "below"); returns its edges and y."""
    width = 0.25 + 1.3 * cells / top
    left, right = x - width / 2, x + width / 2
    ax.add_patch(Rectangle((left, y - HALF_HEIGHT), width, 2 * HALF_HEIGHT, fc=colour, ec="black", lw=1))
    where = {"left": (left - 0.06, y, "right", "center"), "right": (right + 0.08, y + 0.04, "left", "bottom"),
             "below": (x, y - HALF_HEIGHT - 0.05, "center", "top")}[label]
    ax.text(where[0], where[1], text, ha=where[2], va=where[3], fontsize=8)
    return left, right, y


def arrow(start, end, **style):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, lw=1.1, color="0.3", **style))


image_at = box(column_x["backbone"], -1.3, top, f"image\n3 x {SIZE} x {SIZE}", "0.85", label="below")
c_at = [box(column_x["backbone"], level - 3, c.shape[-1], f"C{level}  {' x '.join(map(str, c.shape[1:]))}",
            "tab:blue") for level, c in zip((3, 4, 5), backbone_maps)]
p_at = [box(column_x["pyramid"], level - 3, p.shape[-1], f"P{level}  {' x '.join(map(str, p.shape[1:]))}",
            "tab:orange", label="right") for level, p in zip(range(3, 8), features)]
for (_, right, y), p, rows in zip(p_at, features, anchors_per_level):
    h, w = p.shape[-2:]
    subnet_outputs = f"class: {per_cell * model.num_classes} x {h} x {w}\nbox:   {per_cell * 4} x {h} x {w}"
    ax.text(column_x["subnets"], y, subnet_outputs, va="center", fontsize=8, family="monospace",
            bbox=dict(fc="tab:green", alpha=0.35, ec="black"))
    ax.text(column_x["subnets"] + 1.65, y, f"-> {rows} anchors", va="center", fontsize=8)
    arrow((right, y), (column_x["subnets"] - 0.1, y))                 # the same two subnets on every level
arrow((column_x["backbone"], -1.3 + HALF_HEIGHT), (column_x["backbone"], -HALF_HEIGHT))
for (left, right, y), upper in zip(c_at, c_at[1:]):
    arrow(((left + right) / 2, y + HALF_HEIGHT), ((left + right) / 2, upper[2] - HALF_HEIGHT))   # bottom-up
for (_, right, y), (left, _, _) in zip(c_at, p_at):
    arrow((right, y), (left, y))                                      # lateral 1x1 convolutions
down_x = p_at[0][0] - 0.15
for level in (5, 4):                                                  # top-down: upsample x2 and add
    arrow((down_x, level - 3 - HALF_HEIGHT), (down_x, level - 4 + HALF_HEIGHT))
ax.text(down_x - 0.05, 1.5, "x2, +", ha="right", va="center", fontsize=8)
p6_from = c_at[2] if model.fpn.p6_input == "c5" else p_at[2]
arrow((p6_from[1], p6_from[2] + HALF_HEIGHT), ((p_at[3][0] + p_at[3][1]) / 2, 3 - HALF_HEIGHT))
arrow(((p_at[3][0] + p_at[3][1]) / 2, 3 + HALF_HEIGHT), ((p_at[4][0] + p_at[4][1]) / 2, 4 - HALF_HEIGHT))
total = sum(anchors_per_level)
ax.text(column_x["subnets"] + 1.5, -0.6, f"concatenated: ({len(image)}, {total}, {model.num_classes}) "
        f"class logits\nand ({len(image)}, {total}, 4) box offsets", fontsize=9, va="top")
for name, module in (("backbone", model.backbone), ("pyramid", model.fpn)):
    ax.text(column_x[name], 4.75, f"{name}\n{millions(module):.2f} M weights", ha="center", fontsize=10,
            weight="bold")
ax.text(column_x["subnets"] + 0.6, 4.75, f"two subnets, shared by the levels\n"
        f"{millions(model.classification_head) + millions(model.regression_head):.2f} M weights", ha="center",
        fontsize=10, weight="bold")
ax.set_xlim(0.2, 10.6)
ax.set_ylim(-2.1, 5.4)
ax.axis("off")
ax.set_title(f"RetinaNet ({model.backbone.__class__.__name__} backbone, {CHANNELS}-channel pyramid, "
             f"{model.num_classes} classes, A = {per_cell} anchors per cell), shapes of one {SIZE} x {SIZE} image")
save(fig, "10_architecture.png")

# %% [markdown]
# ## The losses by hand
#
# 1. run the network: backbone, pyramid, the two subnets, and the anchors of every level;
# 2. match the anchors to the boxes: positive (its box's index), background (-1) or ignored (-2);
# 3. classification: focal loss (alpha 0.25, gamma 2) with target 1 for a positive anchor's class and 0
#    elsewhere, summed over every anchor that is not ignored;
# 4. box regression: smooth L1 (beta 0.11) between the positive anchors' predicted offsets and their boxes
#    encoded against them;
# 5. divide both by the number of positive anchors;
# 6. the loss to train is the article's L = L_cls + lambda L_loc, with lambda = 1 (the paper's; `RetinaNet`'s
#    `box_loss_weight`, below).

# %%
cls_logits = model.classification_head(features)                      # (1, M, K)
box_deltas = model.regression_head(features)                          # (1, M, 4)
feature_sizes = [tuple(p.shape[-2:]) for p in features]
anchors = model.anchor_generator((SIZE, SIZE), feature_sizes)          # (M, 4)
matches, ious = match_anchors(anchors, boxes)                          # (M,)
positive = matches >= 0
num_positive = int(positive.sum())

one_hot = np.zeros(cls_logits.shape[1:], dtype=np.float32)             # (M, K)
one_hot[positive, labels[matches[positive]]] = 1
not_ignored = matches != IGNORED
focal = F.sigmoid_focal_loss(cls_logits[0][not_ignored], one_hot[not_ignored], alpha=0.25, gamma=2.0,
                             reduction="sum")
box_targets = encode_boxes(boxes[matches[positive]], anchors[positive])    # (P, 4)
smooth_l1 = F.smooth_l1_loss(box_deltas[0][positive], box_targets, reduction="sum", beta=0.11)
classification_hand = focal / max(1, num_positive)
box_regression_hand = smooth_l1 / max(1, num_positive)
print(f"{len(anchors)} anchors: {num_positive} positive, {int((matches == IGNORED).sum())} ignored, "
      f"{int((matches == BACKGROUND).sum())} background")
print(f"by hand:  classification {classification_hand.item():.5f}, box regression {box_regression_hand.item():.5f}")

# %% [markdown]
# ## `RetinaNet` does the same
#
# `model(images, targets)` runs these steps (`RetinaNet.compute_loss`, for a whole batch at once, with one label
# per anchor instead of the (M, K) one-hot targets).

# %%
losses = model(images, targets)
print(f"RetinaNet: classification {losses['classification'].item():.5f}, "
      f"box regression {losses['box_regression'].item():.5f}; positives {losses['num_positive']}, "
      f"ignored {losses['num_ignored']}, negatives {losses['num_negative']}")
assert_close(losses["classification"], classification_hand, rtol=1e-5, name="classification loss")
assert_close(losses["box_regression"], box_regression_hand, rtol=1e-5, name="box regression loss")
assert losses["num_positive"] == num_positive
print("the losses by hand equal RetinaNet's")
print(f"at the start a positive costs about 0.25 x 0.99^2 x log(100) = {0.25 * 0.99 ** 2 * np.log(100):.3f} "
      f"and a negative almost nothing: the classification loss per positive is {losses['classification'].item():.3f}")

assert_close(losses["loss"], classification_hand + box_regression_hand, rtol=1e-5, name="L = L_cls + L_loc")

losses["loss"].backward()
grad_norm = np.sqrt(sum((p.grad.astype(np.float64) ** 2).sum() for p in model.parameters() if p.grad is not None))
print(f"backward: gradients for {sum(p.grad is not None for p in model.parameters())} parameter tensors, "
      f"norm {grad_norm:.3f}")

# %% [markdown]
# ## lambda: how much the boxes count
#
# The article writes the loss as L = lambda L_loc + L_cls: lambda (`RetinaNet(box_loss_weight=...)`,
# `TrainConfig.box_loss_weight`, `minidet train --box-loss-weight`) sets how much getting the boxes right counts
# against getting the classes right. The regression subnet's gradients scale with lambda and the classification
# subnet's do not depend on it at all; the backbone and the pyramid, which both subnets share, get a mix, so
# lambda decides how much of what they learn serves the boxes; 0 would train a detector whose boxes never leave
# its anchors. Below, the same model and image with lambda 1 and 4: the gradient norm of each part (here the
# pyramid's and the backbone's come almost all from the boxes, as the untrained classifier's loss is nearly flat).


# %%
def gradient_norms(box_loss_weight):
    """The gradient norm of each part of the model for one backward of L = L_cls + lambda L_loc."""
    md.manual_seed(0)
    weighted = RetinaNet(num_classes=3, backbone="resnet_small", fpn_channels=CHANNELS,
                         box_loss_weight=box_loss_weight)
    weighted(images, targets)["loss"].backward()
    parts = {"classification subnet": weighted.classification_head, "regression subnet": weighted.regression_head,
             "pyramid": weighted.fpn, "backbone": weighted.backbone}
    return {name: np.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in part.parameters()))
            for name, part in parts.items()}


norms = {weight: gradient_norms(weight) for weight in (1.0, 4.0)}
for name in norms[1.0]:
    print(f"{name:22s} gradient norm: lambda 1 {norms[1.0][name]:8.4f}, lambda 4 {norms[4.0][name]:8.4f}, "
          f"ratio {norms[4.0][name] / norms[1.0][name]:.2f}")
assert abs(norms[4.0]["regression subnet"] / norms[1.0]["regression subnet"] - 4) < 1e-4
assert abs(norms[4.0]["classification subnet"] / norms[1.0]["classification subnet"] - 1) < 1e-6

# %% [markdown]
# An untrained model finds nothing: every probability starts at 0.01, under the 0.05 score threshold.

# %%
detections = model.predict(images)
print("detections of the untrained model:", {k: v.shape for k, v in detections[0].items()})

# %% [markdown]
# ## Which anchors learn each object
#
# Left: the positive anchors of each object, coloured by pyramid level. Each object is learnt at the level whose
# anchors fit its size: at full size (256 px) the small object on P3, the medium one on P4, the large one on P5.
# In the small-size run (128 px) everything is half as large, and the small object, about 16 pixels, gets no positive
# anchor at all: under about 23 pixels, as step 6 predicted. Right: the positive anchors of each object, by level.

# %%
level_of = np.repeat(np.arange(3, 8), model.anchor_generator.num_anchors_per_level(feature_sizes))   # (M,)
level_colours = {3: "tab:blue", 4: "tab:orange", 5: "tab:green", 6: "tab:red", 7: "tab:purple"}
fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1, 1.1]})
ax.imshow(image[0].transpose(1, 2, 0))
for m in np.flatnonzero(positive):
    x1, y1, x2, y2 = anchors[m]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=level_colours[level_of[m]], lw=1.2,
                           alpha=0.8))
for (x1, y1, x2, y2), name in zip(boxes, names):
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=2.5))
    ax.text(x1, y1 - 2, name, color="white", fontsize=9, va="bottom", weight="bold")
ax.set_xlim(-0.3 * SIZE, 1.3 * SIZE)
ax.set_ylim(1.3 * SIZE, -0.3 * SIZE)
ax.set_title(f"{num_positive} positive anchors (IoU >= 0.5), coloured by level")
counts = np.array([[int(((matches == g) & (level_of == lv)).sum()) for lv in range(3, 8)] for g in range(3)])
bottom = np.zeros(3)
for i, lv in enumerate(range(3, 8)):
    bars.bar(np.arange(3), counts[:, i], 0.6, bottom=bottom, color=level_colours[lv], ec="black", label=f"P{lv}")
    bottom += counts[:, i]
for g, name in enumerate(names):
    side = np.sqrt((boxes[g, 2] - boxes[g, 0]) * (boxes[g, 3] - boxes[g, 1]))
    print(f"{name:17s} ({side:5.1f} px) positives per level P3..P7: {counts[g].tolist()}"
          + ("  <- none: smaller than ~23 px, as step 6 predicted" if counts[g].sum() == 0 else ""))
bars.set_xticks(np.arange(3), [n.replace(" (", "\n(") for n in names])
bars.set_xlabel("object")
bars.set_ylabel("positive anchors")
bars.set_ylim(0, 1.15 * counts.sum(axis=1).max())
bars.set_title("positive anchors per object, by level")
bars.legend(title="level")
fig.tight_layout()
save(fig, "10_positive_anchors.png")

# %% [markdown]
# ## Exercises
#
# 1. **Count the anchors by hand** for this 256 x 256 image: P3-P7 are 32, 16, 8, 4, 2 cells across, 9 anchors
#    per cell. Answer: 12,276, the figure's total.
# 2. **A smaller object.** Shrink the small object to 20 x 20 pixels and rerun the matching: how many positive
#    anchors does it get? Answer: none, being under about 23 pixels (step 6).
# 3. **lambda.** With `box_loss_weight=0`, which parameters get no gradient from the boxes at all, and what would
#    such a detector predict? Answer: the whole regression subnet gets a zero gradient (only weight decay moves
#    it), so its offsets stay those of its initial weights: boxes near the anchors, wherever the objects are.
# 4. **The positives set the scale.** If an image held twice as many objects, why would `RetinaNet`'s losses stay
#    about the same size? Answer: both sums grow with the positive anchors, and both are divided by their number.
