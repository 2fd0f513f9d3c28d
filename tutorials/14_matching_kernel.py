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
# # Step 14: the matching kernel
#
# IoU matching (step 7) compares every anchor with every box. NumPy does it with the (anchors, boxes) IoU matrix:
# 8 images of 120,000 anchors and 50 boxes make 48 million IoUs, 192 MB in float32, and its temporaries several
# times that. minidet's CUDA kernels never build that matrix: each thread holds one anchor and walks through the
# boxes, keeping its best. As in step 13, the files split the work:
#
# - `kernels/iou_match.cuh`: **the arithmetic**: the IoU of one anchor and one box, and the matching rules;
# - `kernels/iou_match_v1.cu` and `iou_match.cu` (version 2): **which thread does what**. minidet launches
#   version 2, which adds shared memory to version 1.
#
# Both versions run here on minidet's CPU launch harness (step 15 shows how it works) and are compared with
# `match_anchors`, bit for bit.

# %%

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from tutorial_setup import SMALL, save, show_source  # shared by the steps: tutorials/tutorial_setup.py

from minidet import backend, cpu_harness, cuda
from minidet.anchors import AnchorGenerator
from minidet.boxes import box_iou
from minidet.matching import BACKGROUND, IGNORED, match_anchors, match_anchors_batch

KERNELS = Path(cuda.kernels_dir())

# %% [markdown]
# ## The arithmetic (`iou_match.cuh`)
#
# The IoU of one anchor with one box, in the order of operations of `minidet.boxes.box_iou`. Every operation here
# is a subtraction, a product, a comparison or one division, each rounded once as IEEE 754 says, so the GPU, the
# CPU and NumPy give **the same bits**, provided the compiler does not fuse a * b + c into one rounding (a fused
# multiply-add): minidet compiles with `--fmad=false` for the GPU and `-ffp-contract=off` for the CPU.

# %%
show_source(KERNELS / "iou_match.cuh", "T box_iou(const Box<T>& anchor")
show_source(KERNELS / "iou_match.cuh", "void keep_best(BestBox<T>& best")
show_source(KERNELS / "iou_match.cuh", "long long match_label(const BestBox<T>& best")

# %% [markdown]
# ## Version 1: one thread per (image, anchor)
#
# The grid is (ceil(A / 256), B) blocks of 256 threads: block (x, b) takes anchors 256 x to 256 x + 255 of image
# b. Each thread loops over its image's boxes, keeps the best IoU and its box, and writes its anchor's label. The
# (anchors, boxes) matrix is never stored: each thread holds one row of it, one number at a time.

# %%
show_source(KERNELS / "iou_match_v1.cu", "const int image = blockIdx.y;", "ious[out] = minidet::match_iou(best);")

# %% [markdown]
# **Low-quality matches** (the torchvision preset, step 7) need each box's best IoU over *all* anchors, which no
# thread knows alone. Pass 1 also folds every IoU into a per-box maximum with `atomicMax`; pass 2, a second launch,
# recomputes each anchor's IoUs (the same function, so the same bits) and promotes the anchor if one equals its
# box's best. `atomicMax` works on integers: the kernel gives it the float's bits read as an integer
# (`float_bits.cuh`), which is right because for floats >= 0 (IoUs are) a larger float has a larger bit pattern:

# %%
rng = np.random.default_rng(0)
ious_demo = np.concatenate([rng.random(10_000), [0.0, 1.0, 0.5, 0.4]]).astype(np.float32)
bits = ious_demo.view(np.int32)                                   # the same 4 bytes, read as an integer
assert (np.argsort(bits, kind="stable") == np.argsort(ious_demo, kind="stable")).all()
print(f"max of the IoUs {ious_demo.max()}; the float with the largest bits {bits.max().view(np.float32)}: "
      "for floats >= 0 the integer order is the float order")

# %% [markdown]
# ## Version 2: the boxes in shared memory
#
# In version 1 the 256 threads of a block all read the same boxes from global memory, and pass 1 makes up to one
# `atomicMax` per (anchor, box) on the few addresses of the image's boxes, which the GPU performs one after
# another. Version 2 (`iou_match.cu`) has the block copy its boxes into fast **shared memory** first, together
# (thread j copies box j), waits for every thread (`__syncthreads`), and then every thread reads them from there.
# An image with more than 256 boxes is done in tiles of 256. The per-box maximum is taken over a warp with
# shuffles, folded into shared memory, and only then into global memory: one `atomicMax` per (block, box).

# %%
show_source(KERNELS / "iou_match.cu", "for (int start = 0; start < num_boxes; start += BLOCK_SIZE) {",
            "atomicMax(&box_best[first_box + start + threadIdx.x], tile_box_best[threadIdx.x]);")

# %% [markdown]
# The algorithm by hand in NumPy, vectorised over the threads: every anchor loops over the boxes (one column of
# IoUs at a time) keeping the first strictly greater IoU, as `keep_best` does; then the labels as `match_label`
# gives them; then pass 2. On the anchors of a 128 x 128 image with five boxes it equals `match_anchors`.

# %%
def match_like_the_kernel(anchors, boxes, high=0.5, low=0.4, low_quality=False):
    best_iou = np.full(len(anchors), -1, dtype=anchors.dtype)          # no_box_yet: below every IoU
    best_box = np.full(len(anchors), -1)
    box_best = np.zeros(len(boxes), dtype=anchors.dtype)               # pass 1's atomicMax targets, from 0
    for j in range(len(boxes)):                                        # each thread's loop over the boxes
        iou = box_iou(anchors, boxes[j:j + 1])[:, 0]                   # (A,) one column, never the matrix
        better = iou > best_iou                                        # strictly: ties keep the lower index
        best_iou[better], best_box[better] = iou[better], j
        box_best[j] = max(box_best[j], iou.max())
    matches = np.where(best_iou < low, BACKGROUND, np.where(best_iou < high, IGNORED, best_box))
    if low_quality:                                                    # pass 2
        for j in range(len(boxes)):
            promote = box_iou(anchors, boxes[j:j + 1])[:, 0] == box_best[j]
            matches[promote] = best_box[promote]
    return matches


IMAGE = 128
feature_sizes = [(IMAGE // s, IMAGE // s) for s in (8, 16, 32, 64, 128)]
anchors = AnchorGenerator("paper")((IMAGE, IMAGE), feature_sizes)        # (A, 4) float32
boxes = np.array([[10, 12, 40, 38], [50, 20, 120, 70], [30, 60, 62, 124], [5, 80, 27, 102],
                  [64, 64, 100, 110]], dtype=np.float32)
for low_quality in (False, True):
    np.testing.assert_array_equal(match_like_the_kernel(anchors, boxes, low_quality=low_quality),
                                  match_anchors(anchors, boxes, allow_low_quality_matches=low_quality)[0])
blocks_x = -(-len(anchors) // 256)
print(f"{len(anchors)} anchors, {len(boxes)} boxes: the kernel's loop equals match_anchors, with and without "
      f"low-quality matches; a batch of 8 such images is a grid of ({blocks_x}, 8) blocks, "
      f"{blocks_x * 256 - len(anchors)} idle threads in the last block of each image")

# %% [markdown]
# ## Both versions, launched on the CPU, against NumPy
#
# The launch, as minidet/cuda.py makes it: the boxes of a batch padded to (B, Gmax, 4) with a count per image (the
# padding is never read), the per-box maxima starting at 0, pass 1, and pass 2 for low-quality matches. Some
# images here have more than 256 boxes, so version 2 goes through several tiles.

# %%
def launch_matching(version, anchors, padded, counts, high=0.5, low=0.4, low_quality=True):
    """Both passes of a version of the matching kernels on the CPU harness: (matches, ious), each (B, A)."""
    module = cpu_harness.load_module(cuda.kernel_source(cuda.MATCHING_VERSIONS[version]), str(KERNELS))
    num_images, max_boxes = padded.shape[:2]
    matches = np.full((num_images, len(anchors)), -999, np.int64)       # -999, NaN: what nobody wrote shows
    ious = np.full((num_images, len(anchors)), np.nan, np.float32)
    box_best = np.zeros((num_images, max_boxes), np.int32)             # the bits of 0.0
    grid = (-(-len(anchors) // 256), num_images)
    inputs = (anchors, padded, counts.astype(np.int32), np.int32(len(anchors)), np.int32(max_boxes))
    module.get_function("match_best_box_float32")(
        grid, (256,), inputs + (np.float32(high), np.float32(low), np.int32(low_quality), box_best, matches, ious))
    if low_quality:
        module.get_function("promote_low_quality_float32")(grid, (256,), inputs + (box_best, matches))
    return matches, ious


counts = np.array([5, 0, 40] if SMALL else [5, 0, 40, 300, 600])
padded = np.zeros((len(counts), counts.max(), 4), np.float32)
for image, count in enumerate(counts):
    corners = rng.uniform(0, IMAGE - 8, (count, 2))
    padded[image, :count] = np.concatenate([corners, corners + rng.uniform(4, 70, (count, 2))], axis=1)
padded[0, :5] = boxes
for low_quality in (False, True):
    expected_matches, expected_ious = match_anchors_batch(anchors, padded, counts, 0.5, 0.4, low_quality)
    for version in sorted(cuda.MATCHING_VERSIONS):
        matches, ious = launch_matching(version, anchors, padded, counts, low_quality=low_quality)
        same_matches = np.array_equal(matches, expected_matches)
        same_bits = np.array_equal((ious + 0).view(np.int32), (expected_ious + 0).view(np.int32))   # -0 -> 0
        print(f"version {version}, low-quality matches {low_quality}: matches equal {same_matches}, IoUs bit for "
              f"bit {same_bits} ({len(counts)} images, {counts.tolist()} boxes)")
        assert same_matches and same_bits

# %% [markdown]
# ## The picture
#
# For the first image: the best IoU of each P3 cell's 9 anchors with one box (left), and the anchors the kernel
# matched, each in the colour of its box (right).

# %%
matches, ious = launch_matching(max(cuda.MATCHING_VERSIONS), anchors, padded[:1], counts[:1], low_quality=False)
per_box_iou = box_iou(anchors, boxes)                         # NumPy's, only for the single-box map
p3 = IMAGE // 8
fig, (heat, matched) = plt.subplots(1, 2, figsize=(11, 4.8))
best_per_cell = per_box_iou[:p3 * p3 * 9, 1].reshape(p3, p3, 9).max(axis=2)   # P3 anchors: cell-major, 9 each
image = heat.imshow(best_per_cell, extent=(0, IMAGE, IMAGE, 0), cmap="viridis", vmin=0, vmax=1)
x1, y1, x2, y2 = boxes[1]
heat.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=2))
heat.set_title("best IoU of each P3 cell's 9 anchors with the box (white)", fontsize=10)
fig.colorbar(image, ax=heat, fraction=0.046)
colours = plt.get_cmap("tab10")
for j, (x1, y1, x2, y2) in enumerate(boxes):
    matched.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colours(j), lw=2.5))
for a in np.flatnonzero(matches[0] >= 0):
    x1, y1, x2, y2 = anchors[a]
    matched.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colours(matches[0, a]), lw=0.8))
matched.set_xlim(0, IMAGE)
matched.set_ylim(IMAGE, 0)
matched.set_aspect("equal")
matched.set_title(f"the kernel's matches: {int((matches[0] >= 0).sum())} positive anchors (thin, in their box's "
                  f"colour);\n{int((matches[0] == IGNORED).sum())} ignored ones not drawn", fontsize=10)
fig.tight_layout()
save(fig, "14_matching.png")

# %% [markdown]
# ## On a GPU
#
# With CuPy and a GPU, `match_anchors` launches version 2 whenever its inputs are CuPy arrays. This cell compares
# both versions there too.

# %%
if not backend.cuda_available():
    print("no CUDA GPU here (or no CuPy): the kernels ran on the CPU launch harness above")
else:
    cp = backend.cupy
    expected_matches, _ = match_anchors_batch(anchors, padded, counts, 0.5, 0.4, True)
    for version in sorted(cuda.MATCHING_VERSIONS):
        gpu_matches, _ = cuda.match_anchors_batch(cp.asarray(anchors), cp.asarray(padded), cp.asarray(counts), 0.5,
                                                  0.4, True, version)
        print(f"GPU, version {version}: matches equal {np.array_equal(cp.asnumpy(gpu_matches), expected_matches)}")
        assert np.array_equal(cp.asnumpy(gpu_matches), expected_matches)

# %% [markdown]
# ## Exercises
#
# 1. **The launch.** For 8 images x 120,519 anchors, one thread each, in blocks of 256, how many blocks? Answer:
#    ceil(964,152 / 256) = 3,767.
# 2. **Shared memory.** Version 2 keeps a tile of 256 boxes in shared memory, five float32 values each (the corners
#    and the area). How many bytes is that? Answer: 5,120 bytes (plus 1 KB for the boxes' best IoUs), far under
#    the 48 KB a block may use.
# 3. **Why atomicMax on bits.** Each box's best IoU over all anchors is the maximum of values computed by
#    different threads; IoUs are non-negative floats, and for those the order of the bit patterns read as integers
#    is the order of the values, so an integer atomicMax finds the float maximum.
