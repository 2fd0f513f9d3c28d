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
# # Step 5: the classification and regression subnets (the article's Fig. 6)
#
# The third part of RetinaNet is two small fully convolutional networks, run on every pyramid level with the
# **same** weights:
#
# - the **classification subnet** predicts, for each of the A anchors of every cell, K class probabilities
#   (a sigmoid per class: there is no background class, "no object" is all K probabilities near 0);
# - the **regression subnet** predicts, for each anchor, 4 numbers that move it onto the object it covers.
#
# Each is four 3x3 convolutions of C channels with ReLU, then one 3x3 convolution to A*K (or A*4) channels. Being
# convolutional, they give one prediction per cell whatever the level's size; sharing the weights across levels
# means an object is handled the same way whatever its size, only the anchors differ.

# %%

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from tutorial_setup import SMALL, save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.models.heads import ClassificationHead, RegressionHead, flatten_levels
from minidet.testing import assert_close

# An image, its pyramid levels P3-P7 (random here: the subnets only care about their shapes), A anchors, K classes.
SIZE, C, K = (128, 32, 3) if SMALL else (512, 256, 80)      # K = 80: the COCO classes
A = 9
md.manual_seed(0)
rng = np.random.default_rng(0)
sizes = [-(-SIZE // s) for s in (8, 16, 32, 64, 128)]       # ceil(SIZE / stride)
pyramid = [md.tensor(rng.standard_normal((1, C, s, s), dtype=np.float32)) for s in sizes]
print(f"image {SIZE} x {SIZE}, pyramid channels C = {C}, classes K = {K}, anchors per cell A = {A}")

# %% [markdown]
# ## The subnets, by hand and by minidet
#
# `ClassificationHead` and `RegressionHead` (in `minidet/models/heads.py`) hold the two towers. We run the
# classification tower on P3 by hand, five `F.conv2d` calls with its weights, and compare with the head's own
# tower and final layer.

# %%
cls_head = ClassificationHead(C, A, K)
box_head = RegressionHead(C, A)

p3 = pyramid[0]
with md.no_grad():
    x = p3
    for block in cls_head.conv:                          # four (conv 3x3, ReLU) blocks
        x = F.relu(F.conv2d(x, block[0].weight, block[0].bias, padding=1))
    logits_hand = F.conv2d(x, cls_head.cls_logits.weight, cls_head.cls_logits.bias, padding=1)
    logits_p3 = cls_head.cls_logits(cls_head.conv(p3))
assert_close(logits_p3, logits_hand, rtol=1e-6, name="classification subnet on P3")
print("classification subnet on P3 by hand equals the head's:", tuple(logits_p3.shape), "= (N, A*K, H, W)")

# %% [markdown]
# ## Output shapes per level
#
# On level l the classification subnet gives (N, A*K, H_l, W_l) and the regression subnet (N, A*4, H_l, W_l).

# %%
with md.no_grad():
    per_level_cls = [cls_head.cls_logits(cls_head.conv(p)) for p in pyramid]
    per_level_box = [box_head.bbox_reg(box_head.conv(p)) for p in pyramid]
for level, (p, c, b) in enumerate(zip(pyramid, per_level_cls, per_level_box), start=3):
    print(f"P{level} {tuple(p.shape)} -> classification {tuple(c.shape)}, regression {tuple(b.shape)}")

# %% [markdown]
# ## From (N, A*K, H, W) to (N, H*W*A, K)
#
# The loss and the inference want **one row per anchor**: row m holds the K logits (or 4 offsets) of anchor m,
# in the same order as the anchors of step 6, which run over cells (y, x) row by row and, inside a cell, over its
# A anchors. Channel a*K + k of the subnet's output is class k of anchor a. So:
#
# ```
# (N, A*K, H, W)  --reshape-->  (N, A, K, H, W)      split the channels into (anchor, class)
#                 --permute-->  (N, H, W, A, K)      put the cell first, then the anchor, then the class
#                 --reshape-->  (N, H*W*A, K)        row (y*W + x)*A + a: anchor a of cell (y, x)
# ```
#
# The permute is the step that matters: reshaping (N, A*K, H, W) directly to (N, -1, K) would mix classes of one
# anchor with different cells. The levels' rows are then concatenated, P3 first. By hand, with loops, on a tiny
# output whose values say where they came from:

# %%
n, a_, k_, h, w = 1, 2, 3, 2, 2
tiny = np.zeros((n, a_ * k_, h, w))
for a in range(a_):
    for k in range(k_):
        for y in range(h):
            for x in range(w):
                tiny[0, a * k_ + k, y, x] = 1000 * y + 100 * x + 10 * a + k     # digits: y, x, anchor, class
rows_hand = np.zeros((n, h * w * a_, k_))
for y in range(h):
    for x in range(w):
        for a in range(a_):
            rows_hand[0, (y * w + x) * a_ + a] = tiny[0, a * k_:(a + 1) * k_, y, x]
rows_md = flatten_levels([md.tensor(tiny)], k_).numpy()
np.testing.assert_array_equal(rows_md, rows_hand)
print("row = (y*W + x)*A + a; each value's four digits read y, x, anchor a, class k:")
for m, row in enumerate(rows_md[0]):
    print(f"  row {m}:", "  ".join(f"{int(v):04d}" for v in row))

# %% [markdown]
# The whole heads do this for all levels at once:

# %%
with md.no_grad():
    cls_rows = cls_head(pyramid)
    box_rows = box_head(pyramid)
per_level_rows = [s * s * A for s in sizes]
print("classification", tuple(cls_rows.shape), " regression", tuple(box_rows.shape),
      " anchors per level", per_level_rows, "total", sum(per_level_rows))
assert cls_rows.shape == (1, sum(per_level_rows), K) and box_rows.shape == (1, sum(per_level_rows), 4)
assert_close(cls_rows[:, :per_level_rows[0]], flatten_levels([per_level_cls[0]], K), rtol=0, name="P3 rows")

# %% [markdown]
# At initialisation every class probability is about 0.01: the last layer's bias starts at -4.595, the prior
# explained in step 9.

# %%
probabilities = F.sigmoid(cls_rows).numpy()
print(f"initial probabilities: mean {probabilities.mean():.4f}, min {probabilities.min():.4f}, "
      f"max {probabilities.max():.4f}")

# %% [markdown]
# ### Fig. 6: the two subnets, with this model's shapes
#
# Left, the subnets as the article draws them (for P3 here; every level goes through the same layers). Right,
# how many anchors each level contributes: the fine levels hold almost all of them.

# %%
def block(ax, x, y, text, colour, width=2.1):
    ax.add_patch(FancyBboxPatch((x - width / 2, y - 0.38), width, 0.76, boxstyle="round,pad=0.05", fc=colour,
                                ec="black", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def link(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, color="black", lw=1.2))


_, _, h3, w3 = pyramid[0].shape
fig, (ax, bars) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2.3, 1]})
block(ax, 0.9, 1.5, f"P3\n{C} x {h3} x {w3}", "#c9e8c2", width=1.5)
for y, colour, name, out, rows in ((2.5, "#f6c6c6", "classification subnet", f"A*K = {A}*{K} = {A * K}", K),
                                   (0.5, "#c6d8f6", "regression subnet", f"A*4 = {A}*4 = {A * 4}", 4)):
    link(ax, (1.7, 1.5), (2.55, y))
    block(ax, 3.7, y, f"4 x (3x3 conv {C}, ReLU)\n{C} x {h3} x {w3}", colour)
    link(ax, (4.8, y), (5.4, y))
    block(ax, 6.5, y, f"3x3 conv\n{out} x {h3} x {w3}", colour)
    link(ax, (7.6, y), (8.2, y))
    block(ax, 9.5, y, f"reshape + permute\n{h3 * w3 * A} x {rows}", colour, width=2.3)
    ax.text(6.5, y + 0.55, name, ha="center", fontsize=10, weight="bold")
ax.text(9.5, 1.5, f"one row per anchor:\n{h3}*{w3}*{A} = {h3 * w3 * A} on P3", ha="center", va="center",
        fontsize=8.5)
ax.set_xlim(0, 10.8)
ax.set_ylim(-0.1, 3.3)
ax.axis("off")
ax.set_title(f"Fig. 6: the subnets on P3 of a {SIZE} x {SIZE} image (shared by P3-P7)")
levels = [f"P{level}\n{s} x {s}" for level, s in enumerate(sizes, start=3)]
bars.bar(levels, per_level_rows, color="#9ecae1", ec="black")
for i, r in enumerate(per_level_rows):
    bars.text(i, r, f"{r}", ha="center", va="bottom", fontsize=8.5)
bars.set_yscale("log")
bars.set_ylabel("anchors (rows) = H * W * A")
bars.set_title(f"rows per level: {sum(per_level_rows)} anchors in all")
bars.spines[["top", "right"]].set_visible(False)
fig.tight_layout()
save(fig, "05_subnets.png")

# %% [markdown]
# ## Exercises
#
# 1. **Anchors of a 512 x 512 image.** With P3-P7 at strides 8 to 128 and 9 anchors per cell, how many rows M do
#    the subnets' outputs have? Answer: (64^2 + 32^2 + 16^2 + 8^2 + 4^2) * 9 = 49,104.
# 2. **The classifier's last layer for COCO.** With K = 80 classes and A = 9, how many output channels does the
#    classification subnet's last convolution have? Answer: A * K = 720.
# 3. **The reshape, done wrong.** Reshape the (N, A*K, H, W) output straight to (N, -1, K), without the permute
#    to (N, H, W, A*K) first, and compare with `ClassificationHead`'s output. Answer: not equal: the rows then mix
#    channels of different anchors and positions.
