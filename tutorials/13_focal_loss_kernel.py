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
# # Step 13: the focal loss kernel
#
# Two parts of a training step touch every anchor: the focal loss reads every (anchor, class) logit, and IoU
# matching compares every anchor with every box. With 8 images of 120,000 anchors and 80 classes that is 77
# million logits, and NumPy on a GPU (CuPy) would build several temporary arrays of that size: the (A, K) targets,
# p, 1 - p, the cross-entropy, the modulating factor... So minidet has a hand-written CUDA kernel that computes the
# loss **and** its gradient in one pass, from one class label per anchor. This step reads it; step 14 reads the
# matching kernel; step 15 shows how a kernel runs, and is checked, without a GPU.
#
# The kernel is in three kinds of file:
#
# - `kernels/focal_loss.cuh`: **the arithmetic** of one logit, as `__host__ __device__` functions;
# - `kernels/block_sum.cuh`: adding up one number per thread of a block (warp shuffles, shared memory, one atomic);
# - `kernels/focal_loss_v1.cu`, `focal_loss_v2.cu`, `focal_loss.cu` (version 3): **which thread does what**, in
#   three versions, each changing one thing from the one before. minidet launches version 3.
#
# No GPU is needed to run them. minidet's **CPU launch harness** (`minidet.cpu_harness`) compiles a `.cu` file with
# the ordinary C++ compiler and runs a launch on the CPU: the blocks on worker threads, a block's threads as fibers
# that meet at every `__syncthreads` and warp shuffle. It proves the indexing, the loops, the reductions and the
# atomics, not the GPU's speed. Every kernel below runs on it and is compared with NumPy, which is the specification.

# %%

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from tutorial_setup import SMALL, save, show_source  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet import backend, cpu_harness, cuda
from minidet.functional.loss import focal_loss_terms, focal_loss_with_labels_reference
from minidet.matching import BACKGROUND, IGNORED

KERNELS = Path(cuda.kernels_dir())
print("the focal loss kernel's files:", sorted(p.name for p in KERNELS.glob("*focal*")), "and block_sum.cuh")

# %% [markdown]
# ## The arithmetic of one logit (`focal_loss.cuh`)
#
# This is `focal_loss_terms` of step 9 for a single number, operation for operation: one `exp(-|x|)` from which
# both p and 1 - p are built (no subtraction, so 1 - p does not round to 0 for a large logit), softplus instead of
# `log(sigmoid(x))`, and the gradient computed in the same pass. `numpy_power` and `numpy_maximum` (in
# `common.cuh`) behave as NumPy's `**` and `maximum` do, so the two sides round alike.

# %%
show_source(KERNELS / "focal_loss.cuh", "FocalLossTerm<T> focal_loss_term(T x")

# %% [markdown]
# Because the header is plain C++ once the CUDA words are defined away, we can run it on the CPU. Here is a kernel
# of our own, six lines: thread i computes the loss and gradient of element i. `cpu_harness.load_module` compiles
# it (with g++, against `kernels/cpu_harness.h`), and a launch takes a grid, a block and the arguments, as a GPU
# launch does; arrays are NumPy arrays, and the scalars are typed, `np.int32` for an `int`, `np.float32` for a
# `float` (a plain Python float would be 8 bytes, and the harness refuses it, as step 15 shows).

# %%
TERMS_KERNEL = r"""
#include "focal_loss.cuh"

extern "C" __global__ void focal_terms(const float* x, const float* t, int n, float alpha, float gamma,
                                       float* loss, float* grad) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const minidet::FocalLossTerm<float> term = minidet::focal_loss_term(x[i], t[i], alpha, gamma);
        loss[i] = term.loss;
        grad[i] = term.grad;
    }
}
"""
terms_kernel = cpu_harness.load_module(TERMS_KERNEL, str(KERNELS), "focal_terms.cu").get_function("focal_terms")


def kernel_focal_terms(x, t, alpha, gamma):
    loss, grad = np.full_like(x, np.nan), np.full_like(x, np.nan)     # NaN: an element nobody wrote shows
    blocks = -(-x.size // 256)
    terms_kernel((blocks,), (256,), (x, t, np.int32(x.size), np.float32(alpha), np.float32(gamma), loss, grad))
    return loss, grad


def ulps(actual, expected):
    """|actual - expected| in units of the last place of ``expected`` (float32)."""
    return np.abs(actual.astype(np.float64) - expected) / np.spacing(np.abs(expected)).astype(np.float64)


# %% [markdown]
# Logits from -100 to 100 (where a careless `log(sigmoid(x))` gives infinity), targets 0 and 1. `exp` and `log1p`
# are not rounded exactly by any library, so we expect agreement within a few units in the last place (ulp: the
# gap between a float32 and the next one, about 1.2e-7 relative), not bit for bit.

# %%
x_grid = np.concatenate([np.linspace(-12, 12, 2001), [-100, -87.5, -30, 30, 87.5, 100]]).astype(np.float32)
focal_cpu = {}
for target in (0, 1):
    t = np.full_like(x_grid, target)
    cpu_loss, cpu_grad = kernel_focal_terms(x_grid, t, 0.25, 2.0)
    numpy_loss, numpy_grad = focal_loss_terms(x_grid, t, 0.25, 2.0)
    assert np.isfinite(cpu_loss).all() and np.isfinite(cpu_grad).all()
    worst_loss, worst_grad = ulps(cpu_loss, numpy_loss).max(), ulps(cpu_grad, numpy_grad).max()
    print(f"target {target}: loss max |kernel - NumPy| = {np.abs(cpu_loss - numpy_loss).max():.3g} "
          f"({worst_loss:.0f} ulp), gradient {np.abs(cpu_grad - numpy_grad).max():.3g} ({worst_grad:.0f} ulp); "
          f"same bits for {np.mean(cpu_loss == numpy_loss):.1%} of the losses")
    assert worst_loss <= 32 and worst_grad <= 32            # tests/test_kernels.py's tolerance
    focal_cpu[target] = (cpu_loss, cpu_grad, numpy_loss, numpy_grad)
print(f"at x = -100, target 1: loss {focal_cpu[1][0][-6]:.6g} (about 0.25 x 100 = 25), finite")

# %% [markdown]
# ## Version 1: one thread per logit
#
# The (A, K) logits are one flat list of A * K numbers, element i = anchor * K + class. The simplest kernel gives
# every element its own thread: thread i finds its anchor and class by a division, computes its term, writes the
# gradient, and adds its loss to the total with `atomicAdd`. The launch needs ceil(A * K / 256) blocks of 256.

# %%
show_source(KERNELS / "focal_loss_v1.cu", "const long long i = ", "atomicAdd(loss, term.loss);")

# %% [markdown]
# It is right, but A * K atomic additions go to one address, and the GPU performs those one after another: 77
# million of them take far longer than reading the logits. (And in float32, adding 77 million terms one by one to
# a running total loses digits: each addition rounds.)
#
# ## Version 2: a grid-stride loop, and block sums
#
# Version 2 launches only as many threads as the GPU runs at once (one "wave", S threads), and thread t takes
# elements t, t + S, t + 2S, ...: a **grid-stride loop**, which works for any A * K with any number of threads.
# Neighbouring threads read neighbouring logits, so the 32 threads of a warp read 32 consecutive floats in one
# memory transaction. Each thread adds its losses in a register; at the end the block adds its 256 sums into one
# (`add_block_sum`, below) and makes **one** atomic addition.

# %%
show_source(KERNELS / "focal_loss_v2.cu", "const unsigned int stride = ", "minidet::add_block_sum<BLOCK_SIZE>")

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
# ### Summing the loss: a warp, a block, the grid (`block_sum.cuh`)
#
# The 256 sums of a block become one number in two steps of **warp shuffles**: `__shfl_down_sync(mask, value,
# offset)` hands each lane (thread of the warp) the value of the lane `offset` places further on; adding it, with
# offsets 16, 8, 4, 2, 1, leaves the warp's total in lane 0 after 5 steps. The 8 warp totals go through shared
# memory to the first warp, which adds them the same way, and thread 0 adds the block's total to the loss.

# %%
show_source(KERNELS / "block_sum.cuh", "__device__ __forceinline__ T warp_sum(T value)")
show_source(KERNELS / "block_sum.cuh", "__device__ __forceinline__ void add_block_sum(")

# %% [markdown]
# ## Version 3: one division per thread, four loads in flight
#
# Each element of version 2 divides i by K, and an integer division costs about 20 instructions on a GPU. Version
# 3 (`focal_loss.cu`) divides once, at the start, and then moves along with `ElementCursor` (in `focal_loss.cuh`): a
# step of S elements is S // K anchors and S % K classes, with a carry into the anchor when the class passes K. It
# also loads 4 of its elements before it computes any, so that several logits are on their way from memory at once.
# The walk in Python, checked against the division:

# %%
show_source(KERNELS / "focal_loss.cu", "minidet::ElementCursor at(", "while (at.i < num_elements) {")


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
print("ElementCursor's walk (one division, then additions and a carry) equals i // K and i % K at every step")

# %% [markdown]
# ## The three versions, launched on the CPU, against NumPy
#
# Each version is launched as minidet/cuda.py launches it: version 1 with a block per 256 logits, versions 2 and
# 3 with one wave (here 8 blocks; a GPU runs a few hundred at once). Each gradient element is computed alone and
# agrees with NumPy within a few ulp. The loss is a sum, added in a different order from NumPy's (pairwise), so it
# agrees within rounding, not bit for bit, and how much rounding depends on the version:
#
# - version 1 adds every term to one float32 total, one rounding after another: n terms can be off by up to
#   (n - 1) x eps of the sum, and in practice a good part of that shows;
# - versions 2 and 3 add in a tree (a few hundred terms per thread, then 32 per warp, then 8 per block): far fewer
#   roundings on the way, within 1e-5 of NumPy's.

# %%
rng = np.random.default_rng(0)
NUM_ANCHORS, NUM_CLASSES = (2000, 4) if SMALL else (20000, 20)
logits = (rng.standard_normal((NUM_ANCHORS, NUM_CLASSES)) * 3 - 2).astype(np.float32)
labels = rng.choice([BACKGROUND, IGNORED, 0, 1, 2, 3], NUM_ANCHORS, p=[0.85, 0.05, 0.025, 0.025, 0.025, 0.025])
labels = labels.astype(np.int32)
weights = np.full(NUM_ANCHORS, 1 / max(1, int((labels >= 0).sum())), dtype=np.float32)   # 1 / positives
numpy_loss, numpy_grad = focal_loss_with_labels_reference(logits, labels, weights, 0.25, 2.0)
WAVE = 8


def launch_focal(version, logits, labels, weights, alpha=0.25, gamma=2.0):
    """One launch of a version of the kernel on the CPU harness, with minidet/cuda.py's grid: (loss, grad)."""
    source = cuda.kernel_source(cuda.FOCAL_LOSS_VERSIONS[version])
    kernel = cpu_harness.load_module(source, str(KERNELS)).get_function("focal_loss_with_labels_float32")
    num_anchors, num_classes = logits.shape
    blocks = -(-logits.size // 256)
    if version > 1:
        blocks = min(blocks, WAVE)
    loss, grad = np.zeros((), np.float32), np.full_like(logits, np.nan)
    kernel((blocks,), (256,), (logits, labels, weights, np.int32(num_anchors), np.int32(num_classes),
                               np.float32(alpha), np.float32(gamma), grad, loss))
    return loss, grad


print(f"{NUM_ANCHORS} anchors x {NUM_CLASSES} classes; NumPy's loss {numpy_loss:.9g}")
for version in sorted(cuda.FOCAL_LOSS_VERSIONS):
    loss, grad = launch_focal(version, logits, labels, weights)
    relative = abs(float(loss) - float(numpy_loss)) / float(numpy_loss)
    allowed = (logits.size - 1) * np.finfo(np.float32).eps if version == 1 else 1e-5   # see the list above
    print(f"  version {version}: loss {float(loss):.9g} (relative difference {relative:.2g}, allowed "
          f"{allowed:.2g}), gradient within {ulps(grad, numpy_grad).max():.0f} ulp of NumPy's")
    assert relative <= allowed and ulps(grad, numpy_grad).max() <= 32

# %% [markdown]
# ## The picture
#
# Left: which thread computes each logit in the grid-stride loop, and in which round (the number in the cell).
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
# And the arithmetic: the focal loss and its gradient for each logit, from our six-line kernel on the CPU (dots)
# and from NumPy (lines); then their difference in ulp, which is all there is between them.

# %%
fig, (curves, error) = plt.subplots(1, 2, figsize=(12, 4.6))
shown = slice(0, 2001, 40)                                            # every 40th point of the grid
for target, colour in ((1, "tab:green"), (0, "tab:red")):
    cpu_loss, cpu_grad, numpy_loss_t, numpy_grad_t = focal_cpu[target]
    curves.plot(x_grid[:2001], numpy_loss_t[:2001], color=colour, lw=1.5, label=f"loss, target {target}")
    curves.plot(x_grid[:2001], numpy_grad_t[:2001], color=colour, lw=1.5, ls="--", label=f"gradient, target {target}")
    curves.plot(x_grid[shown], cpu_loss[shown], "o", color=colour, ms=3)
    curves.plot(x_grid[shown], cpu_grad[shown], "o", color=colour, ms=3)
    error.plot(x_grid[:2001], ulps(cpu_loss, numpy_loss_t)[:2001], ".", color=colour, ms=2,
               label=f"loss, target {target}")
    error.plot(x_grid[:2001], -ulps(cpu_grad, numpy_grad_t)[:2001], "x", color=colour, ms=2,
               label=f"gradient, target {target} (drawn negative)")
curves.set_xlabel("logit x")
curves.set_title("focal loss (alpha 0.25, gamma 2): kernel on the CPU (dots) and NumPy (lines)", fontsize=10)
curves.set_ylim(-0.8, 2.5)
curves.grid(alpha=0.3)
curves.legend(fontsize=8)
error.set_xlabel("logit x")
error.set_ylabel("|kernel - NumPy| in ulp")
error.set_title("the only difference: rounding of exp and log1p", fontsize=10)
error.grid(alpha=0.3)
error.legend(fontsize=7, loc="lower right")
fig.tight_layout()
save(fig, "13_focal_on_cpu.png")

# %% [markdown]
# ## On a GPU
#
# With CuPy and a GPU, minidet compiles each `.cu` file the first time it is needed (`cupy.RawModule`, which runs
# NVRTC, with `--fmad=false` among its options) and launches version 3 whenever the inputs are CuPy arrays:
# `F.sigmoid_focal_loss_with_labels` is the same call as on the CPU. This cell compares every version there too.

# %%
if not backend.cuda_available():
    print("no CUDA GPU here (or no CuPy): the kernels ran on the CPU launch harness above. On a machine with one, "
          "this cell compares them on the GPU (pip install -e '.[cuda12]')")
else:
    cp = backend.cupy
    x_cpu = md.tensor(logits, requires_grad=True)
    x_gpu = md.tensor(logits, requires_grad=True, device="cuda")
    loss_cpu = F.sigmoid_focal_loss_with_labels(x_cpu, labels, weights)
    loss_gpu = F.sigmoid_focal_loss_with_labels(x_gpu, cp.asarray(labels), cp.asarray(weights))
    loss_cpu.backward()
    loss_gpu.backward()
    print(f"GPU, F.sigmoid_focal_loss_with_labels: loss {loss_gpu.item():.9g} against NumPy {loss_cpu.item():.9g}")
    assert abs(loss_gpu.item() - loss_cpu.item()) <= 1e-5 * loss_cpu.item()
    assert ulps(backend.to_numpy(x_gpu.grad), x_cpu.grad).max() <= 32
    for version in sorted(cuda.FOCAL_LOSS_VERSIONS):
        loss, grad = cuda.focal_loss_with_labels(cp.asarray(logits), cp.asarray(labels), cp.asarray(weights), 0.25,
                                                 2.0, version)
        print(f"  GPU, version {version}: loss {float(loss):.9g}, gradient within "
              f"{ulps(cp.asnumpy(grad), numpy_grad).max():.0f} ulp")

# %% [markdown]
# How fast each version is, against the floor set by the bytes it must move, is measured on a GPU by
# `benchmarks/bench_kernels.py` (`--version N` for one version).

# %% [markdown]
# ## Exercises
#
# 1. **The memory floor.** For 8 images x 120,000 anchors x 80 classes, how many bytes must the kernel move at the
#    least? Answer: each float32 logit is read and its gradient written, 8 bytes per logit, 614 MB; a label and a
#    weight per anchor add 7.7 MB: about 622 MB, which at the 3.0 TB/s an H100 copies at takes about 207 us, the
#    floor no version can beat.
# 2. **The block sum.** With 256 threads per block, how many warp totals does a block's reduction combine through
#    shared memory, and how many atomic additions does the whole launch make? Answer: 256 / 32 = 8 warp totals,
#    and one atomic addition per block (a few hundred), instead of one per logit in version 1.
# 3. **Why version 1 is less exact.** Its float32 atomic additions round after every one of millions of terms,
#    each added to a running total far larger than itself; versions 2 and 3 first add a block's terms in a tree,
#    so each rounding is of a partial sum of terms of similar size.
