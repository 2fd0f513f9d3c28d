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
# # Step 4: nearest-neighbour upsampling and the feature pyramid (the article's Figs. 4 and 5)
#
# Step 3 ended on a dilemma: C3 is fine enough to see small objects but semantically weak, C5 is semantically
# strong but too coarse for them. The **feature pyramid** (FPN) gives every level both. A *top-down pathway*
# starts from C5 and walks back to the finer levels, doubling the resolution at each step by **nearest-neighbour
# upsampling**; a **lateral connection**, a 1x1 convolution, brings each C_l to the pyramid's width so the two can
# be added element by element. A 3x3 convolution then smooths each sum into the output level P_l. Two more levels,
# P6 and P7, come from stride-2 convolutions on top, for the largest objects.

# %%

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle
from tutorial_setup import SMALL, save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.models.fpn import FeaturePyramid
from minidet.models.resnet import resnet18, resnet_small
from minidet.testing import assert_close

# %% [markdown]
# ## Nearest-neighbour upsampling by hand
#
# To double a map's resolution, copy every value into a 2 x 2 block: no new information, just a finer grid on
# which it can be added to the finer lateral map. `np.repeat` along the rows and then the columns does exactly
# that. minidet's `F.interpolate(x, scale_factor=2)` broadcasts the map over two new axes instead, which needs no
# copy until the final reshape.

# %%
x = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)                  # (N, C, H, W)
up_hand = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)                     # (1, 1, 8, 8)
xt = md.tensor(x, requires_grad=True)
up_md = F.interpolate(xt, scale_factor=2, mode="nearest")
assert_close(up_md, up_hand, rtol=0, name="upsampling")
print("input 4x4:\n", x[0, 0])
print("upsampled 8x8, top-left rows:\n", up_md.numpy()[0, 0, :4])
print("np.repeat and F.interpolate agree exactly")

# %% [markdown]
# The backward pass follows from the picture: each input value was copied into four outputs, so its gradient is
# the **sum** of the four output gradients of its block.

# %%
upstream = np.arange(64, dtype=np.float64).reshape(1, 1, 8, 8)
up_md.backward(upstream)
block_sum = upstream.reshape(1, 1, 4, 2, 4, 2).sum(axis=(3, 5))            # (1, 1, 4, 4)
np.testing.assert_array_equal(xt.grad, block_sum)
print("gradient of the input = the sum of each 2x2 block of the upstream gradient:\n", xt.grad[0, 0])

# %% [markdown]
# ### Fig. 4
#
# The same 4 x 4 map and its nearest-neighbour upsampling, every value printed: each colour becomes a 2 x 2 block.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4.6), gridspec_kw={"width_ratios": [1, 1]})
for ax, grid, title in ((axes[0], x[0, 0], "input: 4 x 4"),
                        (axes[1], up_md.numpy()[0, 0], "nearest-neighbour upsampling x2: 8 x 8")):
    ax.imshow(grid, cmap="tab20", vmin=0.5, vmax=20.5)
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=11 if grid.shape[0] == 4 else 9)
    ax.set_xticks(np.arange(grid.shape[1] + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(grid.shape[0] + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=1)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(title)
fig.suptitle("Fig. 4: increasing the resolution by the nearest-neighbour method", fontsize=12)
save(fig, "04_nearest_upsampling.png")

# %% [markdown]
# ## The pyramid, by hand and by minidet
#
# With the paper's notation (M_l the sum before the 3x3 output convolution):
#
# ```
# M5 = lateral5(C5)                       P5 = output5(M5)
# M4 = lateral4(C4) + upsample(M5)        P4 = output4(M4)
# M3 = lateral3(C3) + upsample(M4)        P3 = output3(M3)
# P6 = p6(C5)            a 3x3 stride-2 convolution (torchvision's preset takes P5 instead)
# P7 = p7(ReLU(P6))      a 3x3 stride-2 convolution
# ```
#
# We run a backbone on a random image, then compute the pyramid twice: by hand with `F.conv2d` and `np.repeat`
# on the weights of a `FeaturePyramid`, and by calling the `FeaturePyramid` itself.

# %%
SIZE, FPN_CHANNELS = (128, 64) if SMALL else (512, 256)
md.manual_seed(0)
backbone = resnet_small() if SMALL else resnet18()
backbone.eval()
fpn = FeaturePyramid(backbone.out_channels, FPN_CHANNELS)
images = md.tensor(np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32))
with md.no_grad():
    c3, c4, c5 = backbone(images)
    pyramid = fpn([c3, c4, c5])


def conv(layer, x, stride=1):
    kernel = layer.weight.shape[-1]
    return F.conv2d(md.tensor(x), layer.weight, layer.bias, stride=stride, padding=kernel // 2).numpy()


def upsample(x):
    return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)


with md.no_grad():
    m5 = conv(fpn.lateral5, c5.numpy())
    m4 = conv(fpn.lateral4, c4.numpy()) + upsample(m5)
    m3 = conv(fpn.lateral3, c3.numpy()) + upsample(m4)
    p6 = conv(fpn.p6, c5.numpy(), stride=2)
    by_hand = [conv(fpn.output3, m3), conv(fpn.output4, m4), conv(fpn.output5, m5), p6,
               conv(fpn.p7, np.maximum(p6, 0), stride=2)]
for level, (hand, p) in enumerate(zip(by_hand, pyramid), start=3):
    assert_close(p, hand, rtol=1e-5, name=f"P{level}")
print("the pyramid by hand equals FeaturePyramid")

print(f"image {SIZE} x {SIZE}")
for name, c in zip(("C3", "C4", "C5"), (c3, c4, c5)):
    print(f"  {name}: {tuple(c.shape)}")
for level, p in enumerate(pyramid, start=3):
    print(f"  P{level}: {tuple(p.shape)}  stride {SIZE // p.shape[-1]:3d}")

# %% [markdown]
# ### Fig. 5: the design of the feature pyramid, drawn from the shapes above
#
# Each box is drawn as a square whose side grows with its feature map's side (a fixed 0.35 plus a part proportional
# to the map's side, so that the 1 x 1 P7 still shows). On the left the bottom-up
# pathway (the backbone), in the middle the top-down pathway with its lateral connections, on the right the
# levels the subnets will see.

# %%
def box(ax, x, y, size, label, colour):
    side = 0.35 + 1.6 * size / SIZE * 8                     # grows with the map's side
    ax.add_patch(Rectangle((x - side / 2, y - side / 2), side, side, fc=colour, ec="black", lw=1))
    ax.text(x, y - side / 2 - 0.12, label, ha="center", va="top", fontsize=8.5)
    return side


def arrow(ax, start, end, text="", colour="black", offset=(0, 0.12), rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=colour, lw=1.4,
                                 connectionstyle=f"arc3,rad={rad}"))
    if text:
        mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        ax.text(*mid, text, ha="center", va="bottom", fontsize=8, color=colour)


fig, ax = plt.subplots(figsize=(13, 8.5))
ys = {3: 1.0, 4: 3.6, 5: 5.9, 6: 7.7, 7: 9.1}
side = {level: 0.35 + 1.6 * 8 * p.shape[-1] / SIZE for level, p in enumerate(pyramid, start=3)}
LABEL = 0.45                                                  # room for the label under a box
bottom_up, top_down, outputs = "#c7dcef", "#fdd9b5", "#c9e8c2"
for level, c in zip((3, 4, 5), (c3, c4, c5)):
    y, half = ys[level], side[level] / 2
    box(ax, 0.8, y, c.shape[-1], f"C{level}  {c.shape[1]} x {c.shape[2]} x {c.shape[3]}", bottom_up)
    box(ax, 5.2, y, c.shape[-1], f"M{level}  {FPN_CHANNELS} x {c.shape[2]} x {c.shape[3]}", top_down)
    arrow(ax, (0.8 + half + 0.05, y), (5.2 - half - 0.25, y), "lateral: 1x1 conv", "tab:blue")
    if level < 5:                                             # M5 is the lateral alone: nothing to add to it
        ax.text(5.2 - half - 0.15, y, "+", fontsize=15, ha="center", va="center", color="tab:blue")
    p = pyramid[level - 3]
    box(ax, 9.6, y, p.shape[-1], f"P{level}  {p.shape[1]} x {p.shape[2]} x {p.shape[3]}", outputs)
    arrow(ax, (5.2 + half + 0.05, y), (9.6 - half - 0.05, y), "output: 3x3 conv", "tab:green")
for level in (4, 3):
    start_y, end_y = ys[level + 1] - side[level + 1] / 2 - LABEL, ys[level] + side[level] / 2 + 0.05
    arrow(ax, (5.2, start_y), (5.2, end_y), "", "tab:red")
    ax.text(5.35, (start_y + end_y) / 2, "upsample x2 (nearest),\nadded to the lateral", fontsize=8,
            color="tab:red", va="center")
    arrow(ax, (0.8, ys[level] + side[level] / 2 + 0.05), (0.8, ys[level + 1] - side[level + 1] / 2 - LABEL),
          "", "grey")
    ax.text(0.95, (ys[level] + ys[level + 1]) / 2, "ResNet stage\n(stride 2)", fontsize=8, color="grey",
            va="center")
for level in (6, 7):
    p = pyramid[level - 3]
    box(ax, 9.6, ys[level], p.shape[-1], f"P{level}  {p.shape[1]} x {p.shape[2]} x {p.shape[3]}", outputs)
arrow(ax, (0.8, ys[5] + side[5] / 2 + 0.05), (9.6 - side[6] / 2 - 0.05, ys[6]), "P6: 3x3 conv, stride 2, on C5",
      "tab:purple", offset=(0.6, -0.1), rad=-0.15)
arrow(ax, (9.6, ys[6] + side[6] / 2 + 0.05), (9.6, ys[7] - side[7] / 2 - LABEL), "", "tab:purple")
ax.text(9.75, (ys[6] + ys[7]) / 2 - 0.1, "P7: ReLU, then\n3x3 conv, stride 2", fontsize=8, color="tab:purple",
        va="center")
for x, title in ((0.8, "bottom-up pathway\n(backbone)"), (5.2, "top-down pathway\n+ lateral connections"),
                 (9.6, "pyramid levels\n(to the subnets)")):
    ax.text(x, 10.2, title, ha="center", va="center", fontsize=11, weight="bold")
ax.set_xlim(-0.6, 11.6)
ax.set_ylim(-0.4, 10.7)
ax.set_aspect("equal")
ax.axis("off")
ax.set_title(f"Fig. 5: the feature pyramid of a {SIZE} x {SIZE} image (channels x height x width)", fontsize=12)
save(fig, "04_feature_pyramid.png")

# %% [markdown]
# ## Exercises
#
# 1. **Upsampling by hand.** Double a 2 x 3 map with `np.repeat` along both axes and compare it with
#    `F.interpolate(x, scale_factor=2)`. Answer: equal, element for element.
# 2. **Count the pyramid's weights** for ResNet-50's channels (512, 1024, 2048) and C = 256: three 1x1 laterals,
#    three 3x3 output convolutions, P6 (3x3 on C5) and P7 (3x3 on P6), each with a bias. Check with
#    `FeaturePyramid((512, 1024, 2048), 256)`. Answer: 7,997,440.
# 3. **torchvision's P6.** Build the pyramid with `p6_input="p5"` (P6 from P5, as torchvision does): are the shapes
#    of P3-P7 any different? Answer: no; only what P6 is computed from changes, and its weights (256 input
#    channels instead of C5's).
