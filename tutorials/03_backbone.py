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
# # Step 3: the backbone and its feature maps (the article's Figs. 2 and 3)
#
# The first part of RetinaNet is a **backbone**, an image classification network such as a ResNet, used as a
# *bottom-up pathway*: a sequence of stages, each but the first halving the height and width of its input and
# usually adding channels. Early stages see small windows of
# the image and respond to edges and colours; later stages see large windows and respond to larger patterns, at a
# coarser resolution. RetinaNet keeps the outputs of the last three stages, called C3, C4 and C5; the number is
# the level, and level l has a **stride** of 2^l pixels: one cell of C3 covers 8 x 8 pixels of the image, one
# cell of C5 covers 32 x 32.
#
# We first predict the shapes by hand from the layers' strides, then check them on minidet's ResNet, then draw a
# few channels of each level for a synthetic image, as the article's Fig. 3 does for a photograph. Then the other
# two families the article names, VGG and EfficientNet: where their C3-C5 are, an EfficientNet block by hand, and
# the article's Fig. 2, which compares the families by accuracy against their number of weights.

# %%

import time

import matplotlib.pyplot as plt
import numpy as np
from tutorial_setup import SMALL, course_training, save, trained_detector  # shared: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.data import Shapes
from minidet.functional.conv import output_size
from minidet.models import BACKBONES, FeaturePyramid
from minidet.models.efficientnet import SCALING
from minidet.models.resnet import resnet18, resnet_small
from minidet.testing import assert_close
from minidet.train import training_batch

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
def draw_levels(picture, levels, title, boxes=()):
    """Fig. 3's layout: per level (row), the input ``picture`` (its ``boxes`` dashed) and the four channels with the
    largest spatial variance, each in its own colour range."""
    fig, axes = plt.subplots(3, 5, figsize=(12, 7.5))
    for row, (name, c) in enumerate(zip(("C3", "C4", "C5"), levels)):
        maps = c.numpy()[0]                                         # (C, H_l, W_l)
        top = np.argsort(maps.reshape(len(maps), -1).var(axis=1))[::-1][:4]
        axes[row, 0].imshow(picture.transpose(1, 2, 0))
        for (x1, y1, x2, y2) in boxes:
            axes[row, 0].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=1, ls="--"))
        stride = picture.shape[-1] // maps.shape[2]
        axes[row, 0].set_ylabel(f"{name}\n{maps.shape[1]} x {maps.shape[2]} cells, stride {stride}", fontsize=11)
        for col, channel in enumerate(top, start=1):
            axes[row, col].imshow(maps[channel], cmap="viridis", interpolation="nearest")
            axes[row, col].set_title(f"{name} channel {channel}", fontsize=9)
    axes[0, 0].set_title("input image")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return fig


save(draw_levels(image, (c3, c4, c5), "Feature maps of the bottom-up pathway (randomly initialised backbone): finer "
                 "to coarser"), "03_feature_maps.png")

# %% [markdown]
# ### Fig. 3 again, after training
#
# Random weights respond to edges and colours everywhere alike. The same drawing for the backbone of the detector
# that step 11 trains on the Shapes images (`trained_detector`, in `tutorial_setup.py`: loaded from step 11's run
# folder, or trained there first, once, if you have not run step 11 yet), on a Shapes image it never saw. C3's
# most varied channels now trace the objects' edges (the disc's outline, the squares' sides) and ignore most of the
# cluttered background; C4's and C5's light up on parts of the objects, at their coarser grids. (In the small run
# the detector has trained for only 8 steps, and looks much like the random one.)

# %%
detector = trained_detector().eval()
shape_image, shape_target = Shapes(1, image_size=course_training().image_size, seed=1)[0]
batch, _ = training_batch([(shape_image, shape_target)], np.random.default_rng(0), 0.0, "cpu")  # normalised
with md.no_grad():
    trained_maps = detector.backbone(md.tensor(batch))
save(draw_levels(shape_image, trained_maps, "Feature maps of the backbone trained in step 11, on a held-out Shapes "
                 "image", boxes=shape_target["boxes"]), "03_feature_maps_trained.png")

# %% [markdown]
# ## Three families, one interface
#
# The article: the backbone "is variable and may include classification neural networks, such as ResNet, VGG,
# EfficientNet". Whatever the family, RetinaNet asks it for three maps at strides 8, 16 and 32, and needs to know
# only their channel counts, `out_channels`: the pyramid's lateral 1x1 convolutions (step 4) are built from them,
# `FeaturePyramid(backbone.out_channels, 256)`. Where each family's C3, C4, C5 come from:
#
# - **ResNet**: the outputs of its last three stages (`layer2`, `layer3`, `layer4`), as above;
# - **VGG** (plain 3x3 convolutions and ReLUs in five blocks, each ending in a 2x2 max pooling): the maps after the
#   third, fourth and fifth pooling;
# - **EfficientNet** (MBConv blocks, below): the outputs of the stages with 40, 112 and 320 channels (in B0), the
#   last at each of the strides 8, 16 and 32.
#
# Below, one backbone of each family on the same image, each feeding a pyramid: the pyramid levels have the same
# shapes whichever backbone is under them.

# %%
family = ("resnet_small", "vgg_small", "efficientnet_small") if SMALL else ("resnet18", "vgg16", "efficientnet_b0")
for name in family:
    md.manual_seed(0)
    net = BACKBONES[name]().eval()
    with md.no_grad():
        maps = net(images)
        levels = FeaturePyramid(net.out_channels, 64)(maps)
    strides = [SIZE // m.shape[-1] for m in maps]
    assert strides == [8, 16, 32]
    print(f"{name:18s} C3-C5 channels {str(net.out_channels):15s} strides {strides}   "
          f"-> pyramid P3-P7 {[tuple(p.shape[1:]) for p in levels]}")

# %% [markdown]
# ## An EfficientNet block by hand
#
# EfficientNet stacks **MBConv** blocks (inverted residuals). Each one
# 1. widens its input 6x with a 1x1 convolution (the expansion), then batch norm and SiLU, x * sigmoid(x);
# 2. filters each channel on its own with a **depthwise** convolution: `groups` = channels, one k x k kernel per
#    channel instead of one per (input, output) pair, so C * k * k weights instead of C * C * k * k;
# 3. reweights the channels with **squeeze-and-excitation**: the mean of each channel over the map, through two
#    1x1 convolutions, gives one gate in (0, 1) per channel;
# 4. projects back down with a 1x1 convolution (batch norm, no activation), and adds the block's input where the
#    shape allows. (In training, that residual branch is sometimes dropped for a whole image: stochastic depth.)
#
# We rebuild the second block of the stage that gives C3 from `F.conv2d`, `F.silu`, `F.mean` and `F.sigmoid`.

# %%
md.manual_seed(0)
efficientnet = BACKBONES["efficientnet_b0"]().eval()
stage = efficientnet.features[3]
with md.no_grad():
    x = images
    for layer in efficientnet.features[:3]:
        x = layer(x)
    x = stage[0](x)                                               # the stage's first block: stride 2, 40 channels
    expand, depthwise, squeeze, project = stage[1].block
    h = F.silu(expand[1](F.conv2d(x, expand[0].weight)))          # 1x1, 40 -> 240 channels (B0)
    k = depthwise[0].weight.shape[-1]
    h = F.silu(depthwise[1](F.conv2d(h, depthwise[0].weight, padding=k // 2, groups=h.shape[1])))
    summary = F.mean(h, dim=(2, 3), keepdim=True)                 # (N, 240, 1, 1): one number per channel
    gate = F.sigmoid(F.conv2d(F.silu(F.conv2d(summary, squeeze.fc1.weight, squeeze.fc1.bias)),
                              squeeze.fc2.weight, squeeze.fc2.bias))
    by_hand = x + project[1](F.conv2d(h * gate, project[0].weight))
    assert_close(by_hand, stage[1](x), rtol=1e-5, name="MBConv block by hand")
channels = h.shape[1]
print(f"MBConv by hand equals features[3][1]: {tuple(x.shape)} -> {tuple(by_hand.shape)}; its {k}x{k} depthwise "
      f"convolution has {depthwise[0].weight.data.size} weights, a full one would have {channels * channels * k * k}")

# %% [markdown]
# ## Fig. 2: accuracy against the number of weights
#
# The article's Fig. 2 plots each classification network's top-1 accuracy on ImageNet against its number of
# weights, and shows EfficientNet reaching a given accuracy with several times fewer weights. EfficientNet-B1 to B7
# are B0 grown by **compound scaling**: every stage's channels multiplied by a width factor and its number of blocks
# by a depth factor (`minidet.models.efficientnet.SCALING`), while the images grow from 224 to 600 pixels.
#
# The accuracies below are published figures: torchvision's model documentation for its ImageNet weights
# (IMAGENET1K_V1), top-1 on ImageNet-1K's validation images, with the published weight count and GFLOPs (billions
# of multiply-adds for one image) of each. The weight counts are also computed here from minidet's own models: the
# backbone's, plus the classifier head a detector leaves out (ResNet: one fully connected layer; VGG: three;
# EfficientNet: a 1x1 convolution to 4x the channels of C5 and one fully connected layer). The two agree exactly.

# %%
PUBLISHED = {   # name: (ImageNet top-1 %, weights, GFLOPs), torchvision's documentation, IMAGENET1K_V1 weights
    "resnet18": (69.758, 11_689_512, 1.814), "resnet34": (73.314, 21_797_672, 3.664),
    "resnet50": (76.130, 25_557_032, 4.089), "vgg11": (69.020, 132_863_336, 7.609),
    "vgg16": (71.592, 138_357_544, 15.470), "efficientnet_b0": (77.692, 5_288_548, 0.386),
    "efficientnet_b1": (78.642, 7_794_184, 0.687), "efficientnet_b2": (80.608, 9_109_994, 1.088),
    "efficientnet_b3": (82.008, 12_233_232, 1.827), "efficientnet_b4": (83.384, 19_341_616, 4.394),
    "efficientnet_b5": (83.444, 30_389_784, 10.266), "efficientnet_b6": (84.008, 43_040_704, 19.068),
    "efficientnet_b7": (84.122, 66_347_960, 37.746),
}
IMAGENET_CLASSES = 1000


def classifier_head_weights(name, c5_channels):
    """The weights of the ImageNet classifier on top of C5 that minidet's backbones leave out."""
    if name.startswith("resnet"):
        return c5_channels * IMAGENET_CLASSES + IMAGENET_CLASSES            # global pooling, one linear layer
    if name.startswith("vgg"):                                              # on the 7 x 7 map of a 224 px image
        sizes = [c5_channels * 7 * 7, 4096, 4096, IMAGENET_CLASSES]
        return sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    wide = 4 * c5_channels                                                  # EfficientNet: 1x1 conv, batch norm,
    return c5_channels * wide + 2 * wide + wide * IMAGENET_CLASSES + IMAGENET_CLASSES   # then one linear layer


# Building every model takes a few seconds (B7 alone has 62 M weights); the small run counts the smaller ones.
counted = [name for name in PUBLISHED if not SMALL or PUBLISHED[name][1] < 15e6]
timed = ("resnet18", "efficientnet_b0") if SMALL else ("resnet18", "resnet34", "resnet50", "vgg16", "efficientnet_b0")
TIME_SIZE = 64 if SMALL else 224
image_224 = md.tensor(np.random.default_rng(0).random((1, 3, TIME_SIZE, TIME_SIZE), dtype=np.float32))
weights, forward_ms = {}, {}
for name in counted:
    net = BACKBONES[name]().eval()
    backbone_weights = sum(p.data.size for p in net.parameters())
    weights[name] = backbone_weights + classifier_head_weights(name, net.out_channels[-1])
    assert weights[name] == PUBLISHED[name][1], name
    if name in timed:
        times = []
        with md.no_grad():
            for _ in range(4):                                  # the first run, which finds memory, is not kept
                start = time.perf_counter()
                net(image_224)
                times.append(time.perf_counter() - start)
        forward_ms[name] = 1000 * np.median(times[1:])
    head = weights[name] - backbone_weights
    print(f"{name:16s} backbone {backbone_weights / 1e6:5.1f} M + classifier {head / 1e6:5.1f} M = "
          f"{weights[name] / 1e6:6.1f} M weights (published: {PUBLISHED[name][1] / 1e6:.1f} M), top-1 "
          f"{PUBLISHED[name][0]:.1f}%" + (f", minidet forward {forward_ms[name]:.0f} ms" if name in forward_ms else ""))
print(f"the weight counts of minidet's {len(counted)} models equal the published ones; (width, depth) of B1-B7: "
      f"{[SCALING[v] for v in list(SCALING)[1:]]}")

# %% [markdown]
# Left, the article's Fig. 2 redrawn: EfficientNet-B0 is more accurate than ResNet-50 with a fifth of its weights,
# and VGG-16, with 138 M weights (most of them in its classifier), is less accurate than ResNet-34. Right, what the
# weights do not tell: one 224 x 224 image through each backbone in minidet on this CPU, beside the published
# GFLOPs. B0 needs a tenth of ResNet-50's arithmetic but is not ten times faster here: its depthwise convolutions and
# per-channel gates do little arithmetic for each value they read, so memory, not arithmetic, sets their speed
# (step 2's matrix products are the opposite case).

# %%
colours = {"resnet": "tab:blue", "vgg": "tab:red", "efficientnet": "tab:green"}
labels = {"resnet": "ResNet", "vgg": "VGG", "efficientnet": "EfficientNet"}
fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.3, 1]})
for prefix, colour in colours.items():
    names = [n for n in PUBLISHED if n.startswith(prefix)]
    params = [PUBLISHED[n][1] / 1e6 for n in names]
    top1 = [PUBLISHED[n][0] for n in names]
    ax.plot(params, top1, "o-" if prefix == "efficientnet" else "o", color=colour, label=labels[prefix], ms=7)
    for n, x_, y_ in zip(names, params, top1):
        short = n.replace("efficientnet_", "").replace("resnet", "ResNet-").replace("vgg", "VGG-").upper()
        ax.annotate(short.replace("RESNET", "ResNet"), (x_, y_), textcoords="offset points", xytext=(6, -10),
                    fontsize=8)
ax.set_xscale("log")
ax.set_xlim(3, 400)
ax.set_xlabel("weights (millions, log scale)")
ax.set_ylabel("ImageNet top-1 accuracy (%)")
ax.set_title("accuracy against weights (published figures)")
ax.grid(alpha=0.3)
ax.legend(loc="center right")
positions = np.arange(len(forward_ms))
bars.bar(positions, list(forward_ms.values()), 0.6, color=[colours[n.rstrip("0123456789_b").split("_")[0]]
                                                          for n in forward_ms])
for i, name in enumerate(forward_ms):
    bars.text(i, forward_ms[name], f"{PUBLISHED[name][2]:.2f}\nGFLOPs", ha="center", va="bottom", fontsize=8)
bars.set_xticks(positions, [n.replace("efficientnet_b", "EffNet-B").replace("resnet", "ResNet-").replace("vgg", "VGG-")
                            for n in forward_ms], fontsize=9)
bars.set_ylabel(f"minidet forward, one {TIME_SIZE} x {TIME_SIZE} image (ms)")
bars.set_ylim(0, 1.2 * max(forward_ms.values()))
bars.set_title("backbone forward time in minidet on the CPU")
fig.tight_layout()
save(fig, "03_backbones.png")

# %% [markdown]
# ## Exercises
#
# 1. **Predict the shapes.** For a 320 x 480 image, what are the heights and widths of C3, C4 and C5? Check with
#    `resnet18()`. Answer: 40 x 60, 20 x 30, 10 x 15.
# 2. **Why multiples of 32.** Feed a 100 x 100 image to `resnet18()`: C3, C4, C5 are 13, 7 and 4 cells wide.
#    Doubling C5 in the pyramid (step 4) gives 8, which cannot be added to C4's 7: the reason RetinaNet pads every
#    batch to multiples of 32.
# 3. **Compound scaling.** Build `minidet.models.efficientnet("b3")` and read its `out_channels`; then compute B3's
#    C5 channels by hand from B0's 320 and B3's width factor 1.2 (rounded to a multiple of 8). Answer: (48, 136,
#    384), and 320 * 1.2 = 384.
