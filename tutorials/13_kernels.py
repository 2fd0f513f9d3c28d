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
# # Step 13: the CUDA kernels
#
# Two parts of a training step touch every anchor: the focal loss reads every (anchor, class) logit, and IoU
# matching compares every anchor with every box. With 8 images of 120,000 anchors and 80 classes that is 77
# million logits, and NumPy on a GPU (CuPy) would build several temporary arrays of that size: the (A, K) targets,
# p, 1 - p, the cross-entropy, the modulating factor... and for the matching, the (anchors, boxes) IoU matrix.
# minidet has two hand-written CUDA kernels instead, each one pass over its inputs:
#
# - `kernels/focal_loss.cu`: the focal loss **and** its gradient, from one class label per anchor;
# - `kernels/iou_match.cu`: each anchor's best box, label and IoU, without the IoU matrix.
#
# Each kernel is split in two files. The `.cu` file says **which thread does what**: the launch layout, the
# loops, shared memory, the reductions. The `.cuh` header holds **the arithmetic** for one element (the loss of one
# logit, the IoU of one anchor and one box) as `__host__ __device__` functions: the GPU calls them, and so can a
# CPU. That is how we check a kernel without a GPU: compile the header with the ordinary C++ compiler and compare
# it with the NumPy code, which is the specification. Where a GPU exists, minidet launches the real kernels
# whenever its inputs are CuPy arrays, and we compare those too.

# %%

import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from tutorial_setup import SMALL, save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet import backend, cuda
from minidet.anchors import AnchorGenerator
from minidet.boxes import box_iou
from minidet.functional.loss import focal_loss_terms, focal_loss_with_labels_reference
from minidet.matching import BACKGROUND, IGNORED, match_anchors

KERNELS = Path(cuda.kernels_dir())
print("kernel sources in", KERNELS, ":", sorted(p.name for p in KERNELS.iterdir() if p.suffix in (".cu", ".cuh")))


def show(name, first, last=None):
    """Print kernels/<name> from the line containing ``first`` to the line containing ``last`` (None: to the
    function's closing brace, the next line that is just "}")."""
    lines = (KERNELS / name).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if (last in lines[i] if last else lines[i] == "}"))
    print(f"--- kernels/{name}, lines {start + 1}-{end + 1}")
    for number in range(start, end + 1):
        print(f"{number + 1:4d} | {lines[number]}")


# %% [markdown]
# ## The focal loss kernel
#
# ### The arithmetic of one logit (`focal_loss.cuh`)
#
# This is `focal_loss_terms` of step 9 for a single number, operation for operation: one `exp(-|x|)` from which
# both p and 1 - p are built (no subtraction, so 1 - p does not round to 0 for a large logit), softplus instead of
# `log(sigmoid(x))`, and the gradient computed in the same pass. `numpy_power` and `numpy_maximum` (in
# `common.cuh`) behave as NumPy's `**` and `maximum` do, so the two sides round alike.

# %%
show("focal_loss.cuh", "FocalLossTerm<T> focal_loss_term(T x")

# %% [markdown]
# ### Which thread does what (`focal_loss.cu`)
#
# The (A, K) logits are one flat list of A * K numbers, element i = anchor * K + class. The kernel launches S
# threads in blocks of 256, and thread t takes elements t, t + S, t + 2S, ...: a **grid-stride loop**. It works
# for any A * K with any number of threads, and neighbouring threads read neighbouring logits, so the 32 threads of
# a warp read 32 consecutive floats in one memory transaction. minidet launches one "wave", as many blocks as the
# GPU runs at once.

# %%
show("focal_loss.cu", "const unsigned int stride = gridDim.x * blockDim.x;", "while (at.i < num_elements) {")

# %% [markdown]
# By hand, for 6 anchors and 5 classes, with 2 blocks of 4 threads (S = 8; the real blocks have 256 threads):

# %%
A_DEMO, K_DEMO, BLOCKS_DEMO, THREADS_DEMO = 6, 5, 2, 4
S_DEMO = BLOCKS_DEMO * THREADS_DEMO
element = np.arange(A_DEMO * K_DEMO).reshape(A_DEMO, K_DEMO)      # (A, K): element i = anchor * K + class
thread_of = element % S_DEMO                                       # thread t takes t, t + S, t + 2S, ...
round_of = element // S_DEMO                                       # ... in rounds 0, 1, 2, ...
print("thread that computes each logit (rows: anchors, columns: classes):")
print(thread_of)
print(f"each thread computes {A_DEMO * K_DEMO / S_DEMO:.2f} logits on average, in rounds 0..{round_of.max()}")

# %% [markdown]
# Each thread needs the anchor and class of its element, a division i / K, but an integer division costs about 20
# instructions on a GPU. So `ElementIndex` (in `focal_loss.cuh`) divides once, at the start, and then moves along:
# a step of S elements is S // K anchors and S % K classes, with a carry into the anchor when the class passes K.
# The same walk in Python, checked against the division:

# %%
def walk(first, stride, num_classes, steps):
    anchor, k = divmod(first, num_classes)                 # the one division
    stride_anchors, stride_classes = divmod(stride, num_classes)
    positions = []
    for _ in range(steps):
        positions.append((anchor, k))
        anchor, k = anchor + stride_anchors, k + stride_classes
        if k >= num_classes:                               # the carry
            k, anchor = k - num_classes, anchor + 1
    return positions


for first, stride, num_classes in ((3, 8, 5), (255, 168_960, 80), (7, 1_081_344, 85)):
    expected = [divmod(first + s * stride, num_classes) for s in range(1000)]
    assert walk(first, stride, num_classes, 1000) == expected
print("ElementIndex's walk (one division, then additions and a carry) equals i // K and i % K at every step")

# %% [markdown]
# ### Summing the loss: a warp, a block, the grid
#
# Each thread keeps a running sum of its elements' losses in a register. The 256 sums of a block become one number
# in two steps of **warp shuffles**: `__shfl_down_sync(value, offset)` hands each lane (thread of the warp) the
# value of the lane `offset` places further on; adding it, with offsets 16, 8, 4, 2, 1, leaves the warp's total in
# lane 0 after 5 steps. The 8 warp totals go through shared memory to the first warp, which adds them the same
# way, and thread 0 adds the block's total to the loss with one `atomicAdd`. So there are a few hundred atomic
# additions (one per block), not A * K.

# %%
show("focal_loss.cu", "__device__ __forceinline__ T warp_sum(T value)")
show("focal_loss.cu", "sum = warp_sum(sum);", "if (lane == 0) atomicAdd(loss, sum);")

# %% [markdown]
# The whole launch, simulated in NumPy: the per-element arithmetic of `focal_loss_terms`, the grid-stride running
# sums, the shuffles, the atomics (blocks finish in any order, so we add their totals in a random order). The sum
# comes out in a different order from NumPy's `sum` (pairwise), so the two agree within float32 rounding, not bit
# for bit; each gradient element is computed alone and does not depend on any order.

# %%
def shuffle_down_sum(values):
    """(..., 32) values, one per lane -> the warp_sum of each row, as lane 0 ends up with it."""
    values = values.copy()
    for offset in (16, 8, 4, 2, 1):
        received = values.copy()                              # lanes past the end get their own value back
        received[..., :32 - offset] = values[..., offset:]
        values = values + received
    return values[..., 0]


def simulate_focal_kernel(logits, labels, weights, alpha, gamma, blocks, rng, block_size=256):
    num_anchors, num_classes = logits.shape
    threads = blocks * block_size
    targets = (labels[:, None] == np.arange(num_classes)).astype(logits.dtype)       # (A, K) 1 for the class
    terms, _ = focal_loss_terms(logits, targets, alpha, gamma)                       # (A, K) what each thread
    terms = np.where((labels == IGNORED)[:, None], 0, terms * weights[:, None])      # computes per element
    terms = terms.reshape(-1).astype(logits.dtype)                                   # (A * K,) the flat list
    rounds = -(-terms.size // threads)
    padded = np.zeros(rounds * threads, dtype=logits.dtype)
    padded[:terms.size] = terms
    running = np.zeros(threads, dtype=logits.dtype)           # (S,) one register per thread
    for r in range(rounds):                                   # round r: thread t adds element r * S + t
        running += padded[r * threads:(r + 1) * threads]
    warp_totals = shuffle_down_sum(running.reshape(blocks, block_size // 32, 32))              # (blocks, 8)
    lanes = np.zeros((blocks, 32), dtype=logits.dtype)                                         # the first warp:
    lanes[:, :block_size // 32] = warp_totals                                                  # 8 values, 24 zeros
    block_totals = shuffle_down_sum(lanes)                                                     # (blocks,)
    total = logits.dtype.type(0)
    for b in rng.permutation(blocks):                          # atomicAdd, in whatever order the blocks finish
        total += block_totals[b]
    return total


rng = np.random.default_rng(0)
NUM_ANCHORS, NUM_CLASSES = (2000, 4) if SMALL else (20000, 20)
logits = (rng.standard_normal((NUM_ANCHORS, NUM_CLASSES)) * 3 - 2).astype(np.float32)
labels = rng.choice([BACKGROUND, IGNORED, 0, 1, 2, 3], NUM_ANCHORS, p=[0.85, 0.05, 0.025, 0.025, 0.025, 0.025])
labels = labels.astype(np.int32)
weights = np.full(NUM_ANCHORS, 1 / max(1, int((labels >= 0).sum())), dtype=np.float32)   # 1 / positives
kernel_sum = simulate_focal_kernel(logits, labels, weights, 0.25, 2.0, blocks=4, rng=rng)
numpy_sum, _ = focal_loss_with_labels_reference(logits, labels, weights, 0.25, 2.0)
exact = focal_loss_with_labels_reference(logits.astype(np.float64), labels, weights.astype(np.float64), 0.25, 2.0)[0]
print(f"{NUM_ANCHORS} anchors x {NUM_CLASSES} classes, 4 blocks of 256 threads:")
print(f"  kernel's order of additions (simulated): {kernel_sum:.9g}")
print(f"  NumPy's sum (pairwise):                  {numpy_sum:.9g}")
print(f"  in float64:                              {exact:.9g}")
print(f"  relative difference kernel / NumPy: {abs(kernel_sum - numpy_sum) / numpy_sum:.2g} "
      f"(float32 rounding is {np.finfo(np.float32).eps:.2g})")
assert abs(kernel_sum - numpy_sum) <= 1e-5 * numpy_sum

# %% [markdown]
# ## The matching kernel
#
# ### The arithmetic (`iou_match.cuh`)
#
# The IoU of one anchor with one box, in the order of operations of `minidet.boxes.box_iou` (step 7). Every
# operation here is a subtraction, a product, a comparison or one division, each rounded once as IEEE 754 says,
# so the GPU, the CPU and NumPy give **the same bits**, provided the compiler does not fuse a * b + c into one
# rounding (a fused multiply-add): minidet compiles with `--fmad=false`, and below we call g++ with
# `-ffp-contract=off`.

# %%
show("iou_match.cuh", "T box_iou(const Box<T>& anchor")
show("iou_match.cuh", "void keep_best(BestBox<T>& best")
show("iou_match.cuh", "long long match_label(const BestBox<T>& best")

# %% [markdown]
# ### Which thread does what (`iou_match.cu`)
#
# One thread per (image, anchor): the grid is (ceil(A / 256), B) blocks of 256 threads, and block (x, b) takes
# anchors 256 x to 256 x + 255 of image b. The 256 threads of a block need the same boxes, so they first copy them
# into fast **shared memory** together (thread j copies box j), wait for each other (`__syncthreads`), then each
# loops over the boxes and keeps its best. The (anchors, boxes) matrix is never stored: each thread holds one row
# of it, one number at a time.

# %%
show("iou_match.cu", "const int image = blockIdx.y;", "minidet::keep_best(best, iou, start + j);")

# %% [markdown]
# **Low-quality matches** (the torchvision preset, step 7) need each box's best IoU over *all* anchors, which no
# thread knows alone. Pass 1 also folds every IoU into a per-box maximum with `atomicMax`; pass 2, a second launch,
# recomputes each anchor's IoUs (the same function, so the same bits) and promotes the anchor if one equals its
# box's best. `atomicMax` works on integers: the kernel gives it the float's bits read as an integer, which is
# right because for floats >= 0 (IoUs are) a larger float has a larger bit pattern:

# %%
ious_demo = np.concatenate([rng.random(10_000), [0.0, 1.0, 0.5, 0.4]]).astype(np.float32)
bits = ious_demo.view(np.int32)                                   # the same 4 bytes, read as an integer
assert (np.argsort(bits, kind="stable") == np.argsort(ious_demo, kind="stable")).all()
print(f"max of the IoUs {ious_demo.max()}; the float with the largest bits {bits.max().view(np.float32)}: "
      "for floats >= 0 the integer order is the float order")

# %% [markdown]
# The kernel's algorithm by hand in NumPy, vectorised over the threads: every anchor loops over the boxes (one
# column of IoUs at a time) keeping the first strictly greater IoU, as `keep_best` does; then the labels as
# `match_label` gives them; then pass 2. On the anchors of a 128 x 128 image with five boxes it equals
# `match_anchors`, with and without low-quality matches.

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
generator = AnchorGenerator("paper")
feature_sizes = [(IMAGE // s, IMAGE // s) for s in (8, 16, 32, 64, 128)]
anchors = generator((IMAGE, IMAGE), feature_sizes)                     # (A, 4) float32
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
# ### The picture: the two layouts
#
# Left: which thread computes each logit in the focal loss kernel, and in which round (the number in the cell).
# Right: the warp shuffle sum, drawn for 8 lanes (a real warp has 32, and takes 5 steps): after step s, lane 0
# holds the sum of 2^s values.

# %%
fig, (ax, tree) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
colours = plt.get_cmap("tab10")
for a in range(A_DEMO):
    for k in range(K_DEMO):
        t = thread_of[a, k]
        ax.add_patch(Rectangle((k, a), 1, 1, fc=colours(t % 10), ec="white", lw=2, alpha=0.45 + 0.55 * (t < 4)))
        ax.text(k + 0.5, a + 0.5, f"t{t}\nround {round_of[a, k]}", ha="center", va="center", fontsize=8)
ax.set_xlim(0, K_DEMO)
ax.set_ylim(A_DEMO, 0)
ax.set_xticks(np.arange(K_DEMO) + 0.5, [f"class {k}" for k in range(K_DEMO)])
ax.set_yticks(np.arange(A_DEMO) + 0.5, [f"anchor {a}" for a in range(A_DEMO)])
ax.set_title(f"focal loss: grid-stride loop, {BLOCKS_DEMO} blocks x {THREADS_DEMO} threads\n"
             "(dark: block 0, light: block 1)", fontsize=11)
ax.set_aspect("equal")

LANES = 8
values = np.arange(1, LANES + 1, dtype=float)
for step, offset in enumerate((4, 2, 1)):
    received = values.copy()
    received[:LANES - offset] = values[offset:]
    for lane in range(LANES - offset):
        tree.annotate("", xy=(lane, step + 1), xytext=(lane + offset, step),
                      arrowprops=dict(arrowstyle="->", color="tab:blue" if lane == 0 else "0.7", lw=1.2))
    for lane in range(LANES):
        tree.text(lane, step, f"{values[lane]:g}", ha="center", va="center", fontsize=9,
                  bbox=dict(boxstyle="round", fc="tab:orange" if lane == 0 else "white", ec="0.5"))
    tree.text(LANES - 0.2, step + 0.5, f"+= shfl_down(value, {offset})", fontsize=9, va="center")
    values = values + received
for lane in range(LANES):
    tree.text(lane, 3, f"{values[lane]:g}", ha="center", va="center", fontsize=9,
              bbox=dict(boxstyle="round", fc="tab:orange" if lane == 0 else "white", ec="0.5"))
tree.set_xlim(-0.6, LANES + 2.6)
tree.set_ylim(3.5, -0.5)
tree.set_xticks(range(LANES), [f"lane {lane}" for lane in range(LANES)], fontsize=8)
tree.set_yticks(range(4), ["start", "step 1", "step 2", "step 3"])
tree.set_title(f"warp sum by shuffles: lane 0 ends with 1 + ... + {LANES} = {LANES * (LANES + 1) // 2}", fontsize=11)
for side in ("top", "right"):
    tree.spines[side].set_visible(False)
fig.tight_layout()
save(fig, "13_thread_layout.png")

# %% [markdown]
# ## The `.cuh` arithmetic on the CPU
#
# Without a GPU we can still run the headers' arithmetic: define the CUDA qualifiers away (`__host__`,
# `__device__` become nothing, `__forceinline__` becomes `inline`) and the headers are plain C++. A few lines of
# C++ call them in a loop, g++ builds a shared library, and `ctypes` calls it on NumPy arrays. (The tests in
# `tests/test_kernels.py` do the same, on many more edge cases.) This proves the maths, not the launch: the
# indexing, shared memory and atomics only run on a GPU.

# %%
WRAPPER = r"""
#include "focal_loss.cuh"
#include "iou_match.cuh"
using namespace minidet;

extern "C" void focal_terms(const float* x, const float* t, long n, float alpha, float gamma,
                            float* loss, float* grad) {
    for (long i = 0; i < n; ++i) {                    // what one thread does for each of its elements
        const FocalLossTerm<float> term = focal_loss_term(x[i], t[i], alpha, gamma);
        loss[i] = term.loss;
        grad[i] = term.grad;
    }
}

extern "C" void match(const float* a, long num_anchors, const float* b, long num_boxes, float high, float low,
                      long long* matches, float* ious) {
    for (long i = 0; i < num_anchors; ++i) {          // thread i of the matching kernel, pass 1
        const Box<float> anchor = make_box(a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]);
        BestBox<float> best = no_box_yet<float>();
        for (long j = 0; j < num_boxes; ++j) {
            const Box<float> box = make_box(b[4 * j], b[4 * j + 1], b[4 * j + 2], b[4 * j + 3]);
            const float iou = box_iou(anchor, box);
            ious[i * num_boxes + j] = iou;            // kept here only to compare them with NumPy's
            keep_best(best, iou, (int)j);
        }
        matches[i] = match_label(best, high, low);
    }
}
"""
GXX_FLAGS = ["-x", "c++", "-std=c++17", "-O2",
             "-ffp-contract=off",                      # no fused multiply-add: round every operation as written
             "-shared", "-fPIC",                       # a shared library, for ctypes
             "-D__host__=", "-D__device__=", "-D__forceinline__=inline"]   # the CUDA qualifiers, defined away


def build_host_library(folder):
    """Compile WRAPPER and the headers with g++ into folder/host_kernels.so; return it loaded, or None."""
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    (folder / "wrapper.cpp").write_text(WRAPPER)
    library = folder / "host_kernels.so"
    subprocess.run([gxx, *GXX_FLAGS, f"-I{KERNELS}", "-o", str(library), str(folder / "wrapper.cpp")],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(library))


def pointer(array):
    return ctypes.c_void_p(array.ctypes.data)


host = build_host_library(Path(tempfile.mkdtemp(prefix="minidet_kernels_")))
if host is None:
    print("g++ is not installed: skipping the CPU build of the kernels' arithmetic")
else:
    print("built the .cuh headers with: g++", " ".join(GXX_FLAGS), f"-I{KERNELS}")

# %% [markdown]
# ### The focal loss of one logit: CPU build against NumPy
#
# Logits from -100 to 100 (where a careless `log(sigmoid(x))` gives infinity), targets 0 and 1. `exp` and `log1p`
# are not rounded exactly by any library, so we expect agreement within a few units in the last place (ulp: the
# gap between a float32 and the next one, about 1.2e-7 relative), not bit for bit.

# %%
x_grid = np.concatenate([np.linspace(-12, 12, 2001), [-100, -87.5, -30, 30, 87.5, 100]]).astype(np.float32)


def host_focal_terms(x, t, alpha, gamma):
    x, t = np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(t, dtype=np.float32)
    loss, grad = np.empty_like(x), np.empty_like(x)
    host.focal_terms(pointer(x), pointer(t), ctypes.c_long(x.size), ctypes.c_float(alpha), ctypes.c_float(gamma),
                     pointer(loss), pointer(grad))
    return loss, grad


def ulps(actual, expected):
    """|actual - expected| in units of the last place of ``expected`` (float32)."""
    return np.abs(actual.astype(np.float64) - expected) / np.spacing(np.abs(expected)).astype(np.float64)


focal_cpu = {}
if host is not None:
    for target in (0, 1):
        t = np.full_like(x_grid, target)
        cpu_loss, cpu_grad = host_focal_terms(x_grid, t, 0.25, 2.0)
        numpy_loss, numpy_grad = focal_loss_terms(x_grid, t, 0.25, 2.0)
        assert np.isfinite(cpu_loss).all() and np.isfinite(cpu_grad).all()
        worst_loss, worst_grad = ulps(cpu_loss, numpy_loss).max(), ulps(cpu_grad, numpy_grad).max()
        print(f"target {target}: loss max |CPU build - NumPy| = {np.abs(cpu_loss - numpy_loss).max():.3g} "
              f"({worst_loss:.0f} ulp), gradient {np.abs(cpu_grad - numpy_grad).max():.3g} ({worst_grad:.0f} ulp); "
              f"same bits for {np.mean(cpu_loss == numpy_loss):.1%} of the losses")
        assert worst_loss <= 32 and worst_grad <= 32            # tests/test_kernels.py's tolerance
        focal_cpu[target] = (cpu_loss, cpu_grad, numpy_loss, numpy_grad)
    print(f"at x = -100, target 1: loss {focal_cpu[1][0][-6]:.6g} (about 0.25 x 100 = 25), finite")

# %% [markdown]
# ### IoU and matching: CPU build against NumPy, bit for bit
#
# The anchors of the 128 x 128 image above and random boxes, some of zero width, some sharing edges.

# %%
iou_cpu = None
if host is not None:
    n_boxes = 12 if SMALL else 60
    corners = rng.integers(0, IMAGE - 8, (n_boxes, 2))
    sizes = rng.integers(0, 72, (n_boxes, 2)) * (rng.random((n_boxes, 2)) > 0.1)   # about 10% zero width or height
    random_boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
    random_boxes[0] = boxes[0]                                                   # a small box, drawn below
    host_matches = np.empty(len(anchors), dtype=np.int64)
    iou_cpu = np.empty((len(anchors), n_boxes), dtype=np.float32)
    host.match(pointer(anchors), ctypes.c_long(len(anchors)), pointer(random_boxes), ctypes.c_long(n_boxes),
               ctypes.c_float(0.5), ctypes.c_float(0.4), pointer(host_matches), pointer(iou_cpu))
    iou_numpy = box_iou(anchors, random_boxes)
    numpy_matches, _ = match_anchors(anchors, random_boxes)
    same_bits = (iou_cpu + 0).view(np.int32) == (iou_numpy + 0).view(np.int32)      # + 0 turns -0 into 0
    print(f"{len(anchors)} anchors x {n_boxes} boxes: {same_bits.mean():.0%} of the IoUs have the same bits "
          f"(max difference {np.abs(iou_cpu - iou_numpy).max()}); matches equal: "
          f"{np.array_equal(host_matches, numpy_matches)} ({int((numpy_matches >= 0).sum())} positive, "
          f"{int((numpy_matches == IGNORED).sum())} ignored)")
    assert same_bits.all() and np.array_equal(host_matches, numpy_matches)

# %% [markdown]
# ### The picture
#
# Left: the focal loss and its gradient for each logit, from the CPU build of `focal_loss.cuh` (dots) and from
# NumPy (lines). Middle: their difference in ulp, which is all there is between them. Right: for one box, the
# best IoU of each P3 cell's 9 anchors with it, computed by the CPU build of `iou_match.cuh` (identical to NumPy's).

# %%
if host is not None:
    fig, (curves, error, heat) = plt.subplots(1, 3, figsize=(17, 4.6))
    shown = slice(0, 2001, 40)                                            # every 40th point of the grid
    for target, colour in ((1, "tab:green"), (0, "tab:red")):
        cpu_loss, cpu_grad, numpy_loss, numpy_grad = focal_cpu[target]
        curves.plot(x_grid[:2001], numpy_loss[:2001], color=colour, lw=1.5, label=f"loss, target {target}")
        curves.plot(x_grid[:2001], numpy_grad[:2001], color=colour, lw=1.5, ls="--",
                    label=f"gradient, target {target}")
        curves.plot(x_grid[shown], cpu_loss[shown], "o", color=colour, ms=3)
        curves.plot(x_grid[shown], cpu_grad[shown], "o", color=colour, ms=3)
        error.plot(x_grid[:2001], ulps(cpu_loss, numpy_loss)[:2001], ".", color=colour, ms=2,
                   label=f"loss, target {target}")
        error.plot(x_grid[:2001], -ulps(cpu_grad, numpy_grad)[:2001], "x", color=colour, ms=2,
                   label=f"gradient, target {target} (drawn negative)")
    curves.set_xlabel("logit x")
    curves.set_title("focal loss (alpha 0.25, gamma 2): CPU build (dots) and NumPy (lines)", fontsize=10)
    curves.set_ylim(-0.8, 2.5)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    error.set_xlabel("logit x")
    error.set_ylabel("|CPU build - NumPy| in ulp")
    error.set_title("the only difference: rounding of exp and log1p", fontsize=10)
    error.grid(alpha=0.3)
    error.legend(fontsize=7, loc="lower right")

    p3 = IMAGE // 8
    best_per_cell = iou_cpu[:p3 * p3 * 9, 0].reshape(p3, p3, 9).max(axis=2)     # P3 anchors: cell-major, 9 each
    image = heat.imshow(best_per_cell, extent=(0, IMAGE, IMAGE, 0), cmap="viridis", vmin=0, vmax=1)
    x1, y1, x2, y2 = random_boxes[0]
    heat.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=2))
    heat.set_title("best IoU of each P3 cell's 9 anchors with the box (white)", fontsize=10)
    fig.colorbar(image, ax=heat, fraction=0.046)
    fig.tight_layout()
    save(fig, "13_cpu_build.png")

# %% [markdown]
# ## The real kernels, on a GPU
#
# With CuPy and a GPU, minidet compiles each `.cu` file the first time it is needed (`cupy.RawModule`, which runs
# NVRTC, with `--fmad=false` among its options) and launches the kernels whenever the inputs are CuPy arrays:
# `F.sigmoid_focal_loss_with_labels` and `match_anchors` are the same calls as on the CPU. We run both on the same
# inputs and compare.

# %%
if not backend.cuda_available():
    print("no CUDA GPU here (or no CuPy): the kernels themselves are not launched. On a machine with one, this "
          "cell compares them with NumPy (pip install -e '.[cuda12]')")
else:
    cp = backend.cupy
    x_cpu = md.tensor(logits, requires_grad=True)
    x_gpu = md.tensor(logits, requires_grad=True, device="cuda")
    loss_cpu = F.sigmoid_focal_loss_with_labels(x_cpu, labels, weights)
    loss_gpu = F.sigmoid_focal_loss_with_labels(x_gpu, cp.asarray(labels), cp.asarray(weights))
    loss_cpu.backward()
    loss_gpu.backward()
    grad_gpu, grad_cpu = backend.to_numpy(x_gpu.grad), x_cpu.grad
    print(f"focal loss kernel: loss {loss_gpu.item():.9g} against NumPy {loss_cpu.item():.9g} "
          f"(relative difference {abs(loss_gpu.item() - loss_cpu.item()) / loss_cpu.item():.2g}); "
          f"gradient max |GPU - NumPy| {np.abs(grad_gpu - grad_cpu).max():.3g}, "
          f"{ulps(grad_gpu, grad_cpu).max():.0f} ulp")
    assert abs(loss_gpu.item() - loss_cpu.item()) <= 1e-5 * loss_cpu.item()
    assert ulps(grad_gpu, grad_cpu).max() <= 32

    for low_quality in (False, True):
        gpu_matches, gpu_ious = match_anchors(cp.asarray(anchors), cp.asarray(boxes),
                                              allow_low_quality_matches=low_quality)
        cpu_matches, cpu_ious = match_anchors(anchors, boxes, allow_low_quality_matches=low_quality)
        same = np.array_equal(backend.to_numpy(gpu_matches), cpu_matches)
        same_ious = np.array_equal((backend.to_numpy(gpu_ious) + 0).view(np.int32), (cpu_ious + 0).view(np.int32))
        print(f"matching kernel (low-quality matches {low_quality}): matches equal {same}, "
              f"IoUs bit for bit {same_ious}")
        assert same and same_ious

# %% [markdown]
# How fast they are, and against what floor (the bytes they must move at the GPU's memory speed), is measured in
# `benchmarks/`; `design/gpu.md` explains how to time a kernel fairly.
