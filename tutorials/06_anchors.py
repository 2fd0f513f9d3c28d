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
# # Step 6: anchors (the article's Fig. 7)
#
# RetinaNet does not search for objects. It looks at a fixed set of reference boxes, the **anchors**, and for
# each one the subnets of step 5 predict K class probabilities and 4 offsets. Every cell of every pyramid level
# carries A = 9 anchors, all centred on the cell: 3 **aspect ratios** (h/w = 0.5, 1, 2) times 3 **scales**
# (2^0, 2^(1/3), 2^(2/3)) of a base size of 4 x stride (32 pixels on P3, 64 on P4, ..., 512 on P7).
#
# Why these numbers? The three scales fill the octave between one level and the next, so the 15 anchor sizes of
# P3-P7 form one geometric series (32, 40.3, 50.8, 64, ..., 812.7 pixels). And a base of 4 strides makes
# neighbouring anchors overlap heavily, so an object never sits far from an anchor centre.

# %%

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from tutorial_setup import SMALL, save  # shared by the steps: tutorials/tutorial_setup.py

from minidet.anchors import AnchorGenerator, cell_anchors
from minidet.boxes import box_iou

# %% [markdown]
# ## The 9 anchors of one cell, by hand
#
# An anchor of size S and aspect ratio r = h/w has the area of an S x S square: h = S sqrt(r), w = S / sqrt(r).
# Centred on (0, 0), its corners are (-w/2, -h/2, w/2, h/2). minidet orders them ratio-major (all scales of
# ratio 0.5, then of ratio 1, then of 2), the order the subnets' channels follow.

# %%
BASE, STRIDE = 32, 8                                     # level P3
ratios, scales = (0.5, 1.0, 2.0), (2 ** 0, 2 ** (1 / 3), 2 ** (2 / 3))
by_hand = []
for r in ratios:
    for s in scales:
        size = BASE * s
        h, w = size * np.sqrt(r), size / np.sqrt(r)
        by_hand.append([-w / 2, -h / 2, w / 2, h / 2])
by_hand = np.array(by_hand, dtype=np.float32)            # (A, 4)
minidet_cell = cell_anchors(BASE)                        # (A, 4)
np.testing.assert_allclose(minidet_cell, by_hand, rtol=1e-6)
print("the 9 anchors of a P3 cell (x1, y1, x2, y2), centred at (0, 0):")
for a, (row, (r, s)) in enumerate(zip(minidet_cell, [(r, s) for r in ratios for s in scales])):
    w, h = row[2] - row[0], row[3] - row[1]
    print(f"  a={a}: ratio {r:3.1f} scale {s:5.3f}  w {w:6.2f}  h {h:6.2f}  area {w * h:7.1f}")
print("by hand equals minidet.anchors.cell_anchors")

# %% [markdown]
# ## Over a 3 x 3 feature map
#
# The anchors of cell (y, x) are the cell anchors shifted to the cell's centre ((x + 0.5) stride, (y + 0.5)
# stride), and the rows run cell by cell, 9 anchors per cell: row (y W + x) A + a, the order of step 5.
# `AnchorGenerator.grid_anchors` does this for a list of levels; here, one level of 3 x 3 cells.

# %%
H = W = 3
ys, xs = np.meshgrid((np.arange(H) + 0.5) * STRIDE, (np.arange(W) + 0.5) * STRIDE, indexing="ij")   # (H, W)
centres = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)                                     # (H*W, 1, 4)
grid_hand = (centres + by_hand[None]).reshape(-1, 4)                                                # (H*W*A, 4)
generator = AnchorGenerator()
grid_md = generator.grid_anchors([(H, W)], [(STRIDE, STRIDE)])[0]
np.testing.assert_allclose(grid_md, grid_hand, rtol=1e-6)
print(f"3 x 3 map: {grid_md.shape[0]} anchors = 3*3*9; cell (1, 1), a=4 is row {(1 * W + 1) * 9 + 4}:",
      grid_md[(1 * W + 1) * 9 + 4])

# %% [markdown]
# ### Fig. 7: anchors for one cell of a 3 x 3 feature map
#
# Left: the 9 anchors of the centre cell; colour is the aspect ratio, line style the scale. Right: one of the 9
# anchors of every cell, the 32 x 32 square (81 anchors in all would be a tangle); the grey square is the 24 x 24
# pixel area the map covers, and each anchor's centre, its cell's, is a dot of its colour. Each anchor is four cells
# wide, so the anchors of neighbouring cells overlap heavily (the darker, the more of them): an object is seen by
# the anchors of several cells.

# %%
colours = {0.5: "tab:blue", 1.0: "tab:green", 2.0: "tab:red"}
styles = dict(zip(scales, ("-", "--", ":")))
fig, axes = plt.subplots(1, 2, figsize=(12, 6))
SQUARE = list(ratios).index(1.0) * len(scales)          # the ratio-1, scale-1 anchor of a cell: a = 3
for ax, rows, title in ((axes[0], range(36, 45), "the 9 anchors of the centre cell (1, 1)"),
                        (axes[1], range(SQUARE, 81, 9), "the 32 x 32 anchor of each of the 9 cells")):
    ax.add_patch(Rectangle((0, 0), W * STRIDE, H * STRIDE, fc="0.85", ec="none"))
    for k in range(4):
        ax.plot([0, W * STRIDE], [k * STRIDE] * 2, color="0.5", lw=0.8)
        ax.plot([k * STRIDE] * 2, [0, H * STRIDE], color="0.5", lw=0.8)
    for m in rows:
        a = m % 9
        r, s = ratios[a // 3], scales[a % 3]
        x1, y1, x2, y2 = grid_md[m]
        colour = colours[r] if ax is axes[0] else plt.get_cmap("tab10")(m // 9)     # right: a colour per cell
        face = "none" if ax is axes[0] else (*colour[:3], 0.07)                        # darker where they overlap
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fc=face, ec=colour, ls=styles[s], lw=1.6))
        if ax is axes[1]:
            ax.plot((x1 + x2) / 2, (y1 + y2) / 2, "o", color=colour, ms=7)            # its cell's centre
    ax.plot(xs.ravel(), ys.ravel(), "k.", ms=6)
    ax.set_xlim(-30, 54)
    ax.set_ylim(54, -30)                                    # image coordinates: y grows downwards
    ax.set_aspect("equal")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    ax.set_title(title)
handles = [Line2D([], [], color=c, lw=2, label=f"h/w = {r}") for r, c in colours.items()]
handles += [Line2D([], [], color="black", ls=st, label=f"scale {s:.3g} ({BASE * s:.1f} px)")
            for s, st in styles.items()]
handles += [Line2D([], [], color="black", marker=".", ls="none", label="cell centres (stride 8)")]
axes[0].legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.9)
fig.suptitle("Fig. 7: anchor frames for a 3 x 3 feature map on level P3 (stride 8, base size 32)", fontsize=12, y=1.02)
fig.tight_layout()
save(fig, "06_anchors.png")

# %% [markdown]
# ## Why the base size is 4 x stride
#
# An object never sits far from some anchor centre: at worst half a stride off in x and in y. For a square object
# of an anchor's own size s, shifted by d in both directions, IoU = (s - d)^2 / (2 s^2 - (s - d)^2). With the base
# size at 4 x stride, d = s / 8 and the worst case still matches (IoU >= 0.5); at 2 x stride, d = s / 4, it does
# not, and some objects would get no positive anchor wherever they fell between the centres.

# %%
for cells in (4, 2):
    size, offset = 32.0, 32.0 / cells / 2                 # half a stride, the stride being size / cells
    shifted = np.array([[offset, offset, size + offset, size + offset]])
    worst = box_iou(np.array([[0.0, 0.0, size, size]]), shifted)[0, 0]
    print(f"base size {cells} x stride: the worst-placed object of the anchor's size has IoU {worst:.3f} "
          f"({'matches' if worst >= 0.5 else 'no positive anchor'})")

# %% [markdown]
# ## The smallest object that can match
#
# During training (step 7) an anchor learns an object only if their IoU is at least 0.5. The smallest anchors
# have the area of a 32 x 32 square. A square object of side s <= 32 centred inside such an anchor overlaps it
# in s^2 pixels, and their union is the anchor itself, so
#
# $$\text{IoU} = \frac{s^2}{32^2} \ge 0.5 \iff s \ge \sqrt{512} \approx 22.6 \text{ pixels},$$
#
# and no placement or other anchor shape does better. Objects smaller than about 23 pixels never get a positive
# anchor: anchor sizes must fit the data (or the image must be enlarged).
#
# Check it with all the anchors of a real image: square objects of every side from 10 to 100 pixels, placed at
# every offset within a stride-8 cell, and for each the best IoU over all anchors.

# %%
print(f"by hand: smallest matchable square side = sqrt(0.5) * 32 = {np.sqrt(0.5) * 32:.2f} pixels")
IMAGE = 128
feature_sizes = [(IMAGE // s, IMAGE // s) for s in (8, 16, 32, 64, 128)]
anchors = generator((IMAGE, IMAGE), feature_sizes)                 # (M, 4) every anchor of a 128 x 128 image
sides = np.arange(10, 101, dtype=np.float32)                       # (S,)
offsets = np.arange(0, STRIDE, 2 if SMALL else 1, dtype=np.float32)   # positions inside one cell
ox, oy = np.meshgrid(offsets, offsets)                             # (P, P)
cx, cy = 48 + ox.ravel(), 48 + oy.ravel()                          # (P*P,) centres near the image's middle
best_iou = np.empty((len(sides), len(cx)), dtype=np.float32)       # (S, P*P)
for i, s in enumerate(sides):
    objects = np.stack([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], axis=1)   # (P*P, 4)
    best_iou[i] = box_iou(objects, anchors).max(axis=1)                            # (P*P, M) -> (P*P,)
best_placement, worst_placement = best_iou.max(axis=1), best_iou.min(axis=1)       # (S,)
smallest = sides[np.argmax(best_placement >= 0.5)]
always = sides[np.argmax(worst_placement >= 0.5)]
print(f"measured: the smallest square with a positive anchor (IoU >= 0.5) somewhere: {smallest:.0f} pixels")
print(f"          the smallest square that has one wherever it lies:                {always:.0f} pixels")
print(f"          a 32-pixel square at its worst placement still reaches IoU "
      f"{worst_placement[sides == 32][0]:.2f}")
assert smallest == np.ceil(np.sqrt(512))

fig, ax = plt.subplots(figsize=(7, 4.2))
ax.plot(sides, best_placement, label="best placement in the cell")
ax.plot(sides, worst_placement, label="worst placement in the cell")
ax.axhline(0.5, color="tab:green", ls="--", lw=1, label="positive from IoU 0.5")
ax.axhline(0.4, color="tab:red", ls="--", lw=1, label="background below IoU 0.4")
ax.axvline(np.sqrt(512), color="grey", ls=":", label=r"$\sqrt{512} \approx 22.6$ px")
ax.set_xlabel("side of a square object (pixels)")
ax.set_ylabel("best IoU with any anchor")
ax.set_title("Objects under ~23 pixels never reach IoU 0.5 with a 32-pixel anchor")
ax.legend(fontsize=8, loc="lower right")
ax.set_ylim(0, 1)
save(fig, "06_smallest_object.png")

# %% [markdown]
# ## Anchors fitted to a dataset
#
# So the anchors must suit the objects. Take a dataset of small objects, 10 to 40 pixels on 128-pixel images:
# the paper's anchors leave most of them out of reach. `minidet.anchor_report.fit_anchors` keeps the paper's
# structure (sizes doubling from level to level as the stride does, three scales per level, the same aspect ratios
# everywhere) and chooses the base size of P3 and the set of three aspect ratios that leave the fewest boxes
# unmatchable, scoring every choice on the dataset's own boxes with all the anchors of each image. `minidet train`
# does this before it starts, by default, whenever 10% or more of the boxes are out of reach.
#
# **Exercise.** Before running the cell: which P3 base size do you expect, given that a square of side s reaches
# IoU 0.5 with an anchor of side S only when s^2 >= S^2 / 2?

# %%
from minidet.anchor_report import anchor_statistics, fit_anchors  # noqa: E402
from minidet.data import Shapes  # noqa: E402

small_objects = Shapes(100 if SMALL else 400, image_size=128, seed=0, min_size=10, max_size=40)
fit = fit_anchors(small_objects)
print(fit.summary())
before, after = fit.before, fit.after
assert after.share_unmatchable < before.share_unmatchable

fig, ax = plt.subplots(figsize=(7, 4.2))
bins = np.linspace(0, 1, 21)
ax.hist(before.best_iou, bins=bins, alpha=0.6, label=f"paper's anchors: {before.share_unmatchable:.0%} below 0.5")
ax.hist(after.best_iou, bins=bins, alpha=0.6, label=f"fitted anchors: {after.share_unmatchable:.0%} below 0.5")
ax.axvline(0.5, color="tab:green", ls="--", lw=1)
ax.set_xlabel("best IoU of a box with any anchor")
ax.set_ylabel("boxes")
ax.set_title(f"Objects of 10-40 px: P3 anchors of {fit.anchor_sizes[0]:g} px instead of 32")
ax.legend(fontsize=8, loc="upper left")
save(fig, "06_fitted_anchors.png")

# %% [markdown]
# The boxes still out of reach are the smallest ones, where even the fitted anchors, laid out every 8 pixels on
# P3, sit too far from most positions; there only larger images help (`--min-size`), at the price of a slower
# step. `anchor_statistics(dataset, anchor_sizes=..., aspect_ratios=...)` scores any anchors you choose, and
# `minidet inspect-anchors --data FOLDER` prints the same report for your own data.

# %%
mine = anchor_statistics(small_objects, anchor_sizes=[16, 32, 64, 128, 256])
print(f"your choice, P3 at 16 px: {mine.share_unmatchable:.1%} unmatchable "
      f"(fitted: {after.share_unmatchable:.1%})")

# %% [markdown]
# ## Exercises
#
# 1. **Write the anchors of one cell yourself** and check them:
#    `from minidet.exercises import check; check("anchors", my_cell_anchors)`, where
#    `my_cell_anchors(size, scales, aspect_ratios)` returns the (A, 4) rows (-w/2, -h/2, w/2, h/2), ratio-major,
#    with aspect ratio = h / w. The checker says which anchor differs, and recognises w and h swapped.
# 2. **The smallest object.** Which is the smallest square object centred on a 32 x 32 anchor that still reaches
#    IoU 0.5 with it? Answer: 32 / sqrt(2), about 22.6 pixels: the "about 23" above.
# 3. **One ratio only.** With `aspect_ratios=(1.0,)`, how many anchors per cell, and how many for a 256 x 256
#    image? Answer: 3 per cell, 4,092 in all (a third of 12,276).
