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
# # Step 3: the backbone and its feature maps (the article's Fig. 3)
#
# The first part of RetinaNet is a **backbone**, a ResNet, used as a *bottom-up pathway*: a sequence of stages,
# each halving the height and width of its input and usually adding channels. Early stages see small windows of
# the image and respond to edges and colours; later stages see large windows and respond to larger patterns, at a
# coarser resolution. RetinaNet keeps the outputs of the last three stages, called C3, C4 and C5; the number is
# the level, and level l has a **stride** of 2^l pixels: one cell of C3 covers 8 x 8 pixels of the image, one
# cell of C5 covers 32 x 32.
#
# We first predict the shapes by hand from the layers' strides, then check them on minidet's ResNet, then draw a
# few channels of each level for a synthetic image, as the article's Fig. 3 does for a photograph.

# %%

import matplotlib.pyplot as plt
import numpy as np
from tutorial_setup import SMALL, save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.functional.conv import output_size
from minidet.models.resnet import resnet18, resnet_small
from minidet.testing import assert_close

SIZE = 128 if SMALL else 256
md.manual_seed(0)
backbone = resnet_small() if SMALL else resnet18()    # the paper uses ResNet-50; the stages and strides are the same
backbone.eval()                                       # batch norm uses its running statistics, not the batch's
print(f"backbone: {'resnet_small' if SMALL else 'resnet18'}, input {SIZE} x {SIZE}, "
      f"C3/C4/C5 channels {backbone.out_channels}")

# %% [markdown]
# ## A synthetic image
#
# A dark background with a bright square, a disc and a patch of diagonal stripes: objects of different sizes and
# textures, whose edges a freshly initialised network already responds to.

# %%
yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE                     # (H, W) coordinates in [0, 1)
image = np.full((3, SIZE, SIZE), 0.1, dtype=np.float32)      # (3, H, W)
square = (np.abs(xx - 0.28) < 0.14) & (np.abs(yy - 0.3) < 0.14)
disc = (xx - 0.7) ** 2 + (yy - 0.68) ** 2 < 0.18 ** 2
stripes = (xx > 0.55) & (xx < 0.95) & (yy > 0.08) & (yy < 0.38) & (np.sin(40 * (xx + yy)) > 0)
image[0, square], image[1, square], image[2, square] = 0.95, 0.8, 0.2
image[0, disc], image[1, disc], image[2, disc] = 0.2, 0.6, 0.95
image[:, stripes] = 0.9
small_square = (np.abs(xx - 0.2) < 0.04) & (np.abs(yy - 0.75) < 0.04)   # a small object: 8% of the width
image[:, small_square] = 1.0
images = md.tensor(image[None])                              # (N=1, 3, H, W)

# %% [markdown]
# ## The shapes, by hand
#
# Every convolution and pooling layer maps a size H to `(H + 2 * padding - kernel) // stride + 1`. The ResNet
# stem is a 7x7 stride-2 convolution and a 3x3 stride-2 max pooling (stride 4 so far, the level C2); stage 1
# keeps the size, and stages 2, 3, 4 each start with a stride-2 convolution: C3, C4, C5.

# %%
h = output_size(SIZE, 7, 2, 3)          # stem convolution
h = output_size(h, 3, 2, 1)             # max pooling            -> C2, stride 4
expected = {}
for level in (3, 4, 5):
    h = output_size(h, 3, 2, 1)         # the first 3x3 convolution of the stage has stride 2
    expected[f"C{level}"] = h
print("predicted sizes:", {k: f"{v} x {v}, stride {SIZE // v}" for k, v in expected.items()})

# %% [markdown]
# ## minidet's ResNet
#
# `minidet.models.resnet.ResNet.forward` returns `[C3, C4, C5]`. Before trusting it, rebuild its first
# stage-2 block by hand from `F.conv2d`: a residual block computes y = ReLU(F(x) + shortcut(x)), where F is two
# 3x3 convolutions with batch norm and the shortcut is a strided 1x1 convolution because the shape changes.

# %%
with md.no_grad():
    c3, c4, c5 = backbone(images)
    stem = backbone.maxpool(F.relu(backbone.bn1(backbone.conv1(images))))
    c2 = backbone.layer1(stem)
    block = backbone.layer2[0]
    residual = F.relu(block.bn1(F.conv2d(c2, block.conv1.weight, stride=2, padding=1)))
    residual = block.bn2(F.conv2d(residual, block.conv2.weight, padding=1))
    shortcut = block.downsample[1](F.conv2d(c2, block.downsample[0].weight, stride=2))
    by_hand = F.relu(residual + shortcut)
    assert_close(by_hand, block(c2), rtol=1e-6, name="residual block by hand")
print("residual block by hand equals layer2[0]:", tuple(by_hand.shape))

for name, c in zip(("C3", "C4", "C5"), (c3, c4, c5)):
    stride = SIZE // c.shape[-1]
    print(f"{name}: shape {tuple(c.shape)}  stride {stride:2d}  one cell covers {stride} x {stride} pixels")
    assert c.shape[-1] == expected[name] and c.shape[-2] == expected[name]

# %% [markdown]
# ## Fig. 3: what each level sees
#
# For each level, the four channels with the largest spatial variance (the ones that respond most differently
# across the image), each normalised to its own range. The grid of each map is the grid of that level's cells:
# C3 still outlines the square, the disc and the stripes; C4 keeps blobs; C5, 32 times coarser than the image,
# keeps only where the large objects are, and the small square has almost vanished. That is the weakness of the
# bottom-up pathway the article describes, and the reason for the feature pyramid of step 4.

# %%
fig, axes = plt.subplots(3, 5, figsize=(12, 7.5))
for row, (name, c) in enumerate(zip(("C3", "C4", "C5"), (c3, c4, c5))):
    maps = c.numpy()[0]                                             # (C, H_l, W_l)
    top = np.argsort(maps.reshape(len(maps), -1).var(axis=1))[::-1][:4]
    axes[row, 0].imshow(image.transpose(1, 2, 0))
    axes[row, 0].set_title("input image" if row == 0 else "")
    axes[row, 0].set_ylabel(f"{name}\n{maps.shape[1]} x {maps.shape[2]} cells, stride {SIZE // maps.shape[2]}",
                            fontsize=11)
    for col, channel in enumerate(top, start=1):
        axes[row, col].imshow(maps[channel], cmap="viridis", interpolation="nearest")
        axes[row, col].set_title(f"{name} channel {channel}", fontsize=9)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("Feature maps of the bottom-up pathway (randomly initialised backbone): finer to coarser", fontsize=13)
fig.tight_layout()
save(fig, "03_feature_maps.png")
