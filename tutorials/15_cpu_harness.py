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
# # Step 15: running a CUDA kernel on a CPU, and catching its bugs
#
# Steps 13 and 14 ran minidet's kernels without a GPU. This step shows how, and what it is good for: the CPU launch
# harness runs a kernel as a real grid launch and stops, with the file and line, at mistakes a GPU would let pass
# silently or answer with a hang.
#
# How a launch runs (`kernels/cpu_harness.h`, compiled with the kernel by g++; `minidet/cpu_harness.py` loads and
# launches it):
#
# - **blocks** run on 4 worker threads of the operating system, each taking the next block until none is left, so
#   blocks really run at the same time and their atomics on global memory really race;
# - a block's **threads** run as fibers on their worker: each has its own stack and runs until it reaches a
#   synchronisation point (`__syncthreads`, a warp shuffle) or its end, then the next one runs. The order in which
#   they run between two synchronisation points is forward, reverse or a seeded random order: right code gives the
#   same answer in every order;
# - `__syncthreads` is a barrier that checks every thread waits at the same one; a warp shuffle completes when
#   every lane of its mask has arrived at it; when no thread can go on, the launch fails with where each waits;
# - **shared memory** is filled with a poison byte before every block, so reading it before anyone wrote it gives
#   garbage that shows (0xFF bytes are a NaN); every **array** ends at memory that cannot be read or written, so a
#   thread that goes past the end stops the process at once, and the harness says which thread, which argument and
#   which line; every **argument** is checked against the kernel's C++ signature.
#
# What it cannot tell: the GPU's math library rounds a little differently (an ulp or two), CuPy compiles with
# `-ftz` (tiny floats become 0), a GPU's memory model is weaker than a CPU's, and nothing here says how fast a
# kernel is on a GPU.

# %%

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from tutorial_setup import save  # shared by the steps: tutorials/tutorial_setup.py

from minidet import cpu_harness, cuda
from minidet.cpu_harness import HarnessError
from minidet.functional.loss import focal_loss_with_labels_reference

KERNELS = Path(cuda.kernels_dir())

# %% [markdown]
# ## The order of the threads
#
# A kernel of our own: each thread takes a ticket (an atomic counter per block) when it runs. The tickets show the
# order the harness ran the threads of two blocks in, for each schedule.

# %%
TICKETS = cpu_harness.load_module(r"""
extern "C" __global__ void take_ticket(unsigned int* counter, unsigned int* ticket) {
    ticket[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(&counter[blockIdx.x], 1u);
}
""", str(KERNELS), "tickets.cu").get_function("take_ticket")

THREADS = 64
orders = {}
for label, schedule, seed in [("forward", "forward", 0), ("reverse", "reverse", 0), ("random, seed 1", "random", 1),
                              ("random, seed 2", "random", 2)]:
    counter, ticket = np.zeros(2, np.uint32), np.zeros(2 * THREADS, np.uint32)
    TICKETS(2, THREADS, (counter, ticket), schedule=schedule, seed=seed)
    orders[label] = ticket.reshape(2, THREADS)
    print(f"{label:>15}: block 0 ran threads {np.argsort(orders[label][0])[:10].tolist()} ... first")

# %% [markdown]
# ## A race: a missing `__syncthreads`
#
# The block sum of step 13 (`block_sum.cuh`) writes each warp's total to shared memory, waits at `__syncthreads`,
# and then the first warp reads the totals. Take the barrier out and the first warp may read a total that its warp
# has not written yet. We copy the kernels to a temporary folder, delete that one line, and launch the focal loss
# kernel on the same inputs as NumPy, once in each order.

# %%
rng = np.random.default_rng(0)
logits = (rng.standard_normal((3000, 8)) * 3).astype(np.float32)
labels = rng.integers(-2, 8, 3000).astype(np.int32)
weights = np.ones(3000, np.float32)
expected_loss, _ = focal_loss_with_labels_reference(logits, labels, weights, 0.25, 2.0)

planted = Path(tempfile.mkdtemp(prefix="minidet_planted_"))
for path in KERNELS.iterdir():
    if path.suffix in (".cu", ".cuh", ".h"):
        shutil.copy(path, planted / path.name)
block_sum = (planted / "block_sum.cuh").read_text()
assert block_sum.count("    __syncthreads();\n") == 1
(planted / "block_sum.cuh").write_text(block_sum.replace("    __syncthreads();\n", ""))
racy = cpu_harness.load_module(cuda.kernel_source("focal_loss", planted), str(planted))


def focal_loss_on(module, schedule, poison=0xFF, num_classes=8, alpha=0.25):
    loss, grad = np.zeros((), np.float32), np.empty_like(logits)
    module.get_function("focal_loss_with_labels_float32")(
        (8,), (256,), (logits, labels, weights, np.int32(len(logits)), np.int32(num_classes), alpha,
                       np.float32(2.0), grad, loss), schedule=schedule, poison=poison)
    return float(loss)


race = {}
for schedule in ("forward", "reverse", "random"):
    race[schedule] = focal_loss_on(racy, schedule, alpha=np.float32(0.25))
    print(f"without the __syncthreads, {schedule:>7} order: loss {race[schedule]:.6g} (NumPy: {expected_loss:.6g})")
assert np.isnan(race["forward"]) and abs(race["reverse"] - expected_loss) <= 1e-5 * expected_loss

# %% [markdown]
# In forward order thread 0 runs first: it reads the totals of warps 1-7 before their first lanes have written
# them, gets the poison (0xFF bytes, a NaN), and the loss is NaN. In reverse order the other warps have written
# their totals by the time warp 0 reads them, and the answer is right: a race can hide in one order and show in
# another. That is why minidet's CI runs the kernel tests in two orders, forward with poison 0x7F and seeded random
# with poison 0xFF.
#
# ## A deadlock: a shuffle in a branch
#
# The first warp adds the 8 warp totals with `warp_sum(lane < 8 ? warp_sums[lane] : 0)`: every lane takes part,
# the ones past 8 with a 0. Write it as `if (lane < 8) value = warp_sum(warp_sums[lane]);` instead, and lanes 8-31
# never reach the shuffle that lanes 0-7 wait in, with a mask that names all 32. On a GPU that is undefined
# (often a hang); the harness finds that no thread can go on and says where each one is.

# %%
(planted / "block_sum.cuh").write_text(block_sum.replace(
    "value = warp_sum(lane < BLOCK_SIZE / 32 ? warp_sums[lane] : T(0));",
    "if (lane < BLOCK_SIZE / 32) value = warp_sum(warp_sums[lane]);"))
divergent = cpu_harness.load_module(cuda.kernel_source("focal_loss", planted), str(planted))
try:
    focal_loss_on(divergent, "forward", alpha=np.float32(0.25))
    raise AssertionError("the deadlock went unnoticed")
except HarnessError as error:
    deadlock_message = str(error)
print(textwrap.fill(deadlock_message, 116))
assert "deadlock" in deadlock_message and "for lanes 8-31 of their warp" in deadlock_message

# %% [markdown]
# ## A wrong argument: a Python float for a `float`
#
# A launch passes each argument's bytes as they are; a Python float is 8 bytes (a double), and a kernel parameter
# `float alpha` reads 4 of them: garbage, and no GPU says so. The harness compares each argument with the kernel's
# C++ signature:

# %%
production = cpu_harness.load_module(cuda.kernel_source("focal_loss"), str(KERNELS))
try:
    focal_loss_on(production, "forward", alpha=0.25)        # 0.25, not np.float32(0.25)
    raise AssertionError("the wrong type went unnoticed")
except HarnessError as error:
    print(textwrap.fill(str(error), 116))
print(f"with np.float32(0.25): loss {focal_loss_on(production, 'forward', alpha=np.float32(0.25)):.6g}, "
      f"NumPy {expected_loss:.6g}")

# %% [markdown]
# ## Past the end of an array
#
# A load guard written `<=` instead of `<` reads one element too many. On a GPU that may read whatever lies after
# the array, silently. In the harness every array ends at memory that cannot be touched: the process stops at
# once, and the harness says which thread, how far past the end of which argument, and the source line. Because
# it stops the process, we run it in a separate Python process and print what it said.

# %%
PROGRAM = r'''
import numpy as np
from minidet import cpu_harness, cuda
module = cpu_harness.load_module("""
extern "C" __global__ void scale(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = 2 * x[i];      // <= : one element too far
}
""", str(cuda.kernels_dir()), "scale.cu")
x, y = cpu_harness.device_empty(1000, np.float32), cpu_harness.device_empty(1000, np.float32)
x[:] = 1
module.get_function("scale")(4, 256, (x, y, np.int32(1000)))
'''
result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300)
print(f"exit status {result.returncode}; the harness said:")
print(textwrap.fill(result.stderr.strip().splitlines()[0], 116))
print(result.stderr.strip().splitlines()[-1])
assert result.returncode == 86 and "past the end of argument 0 (x)" in result.stderr

# %% [markdown]
# ## The picture
#
# The order in which the threads of block 0 ran, under each schedule (colour: the thread's place in the order),
# and the race above: the loss the kernel without its `__syncthreads` computed in each order, against NumPy's.

# %%
fig, (order_axes, race_axes) = plt.subplots(1, 2, figsize=(14, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
matrix = np.stack([orders[label][0] for label in orders])
image = order_axes.imshow(matrix, aspect="auto", cmap="viridis")
order_axes.set_yticks(range(len(orders)), list(orders))
order_axes.set_xlabel("thread (threadIdx.x) of block 0")
order_axes.set_title("when each thread ran, between two synchronisation points", fontsize=10)
fig.colorbar(image, ax=order_axes, label="place in the order", fraction=0.03)
names = list(race)
shown = [value if np.isfinite(value) else 0 for value in race.values()]
bars = race_axes.bar(names, shown, color=["tab:red" if not np.isfinite(v) else "tab:green" for v in race.values()])
race_axes.axhline(expected_loss, color="black", ls="--", lw=1, label=f"NumPy {expected_loss:.5g}")
for bar, value in zip(bars, race.values()):
    race_axes.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0) + expected_loss * 0.03,
                   "NaN" if not np.isfinite(value) else f"{value:.5g}", ha="center", fontsize=9)
race_axes.set_ylim(0, expected_loss * 1.3)
race_axes.set_title("loss without the __syncthreads, by schedule", fontsize=10)
race_axes.legend(fontsize=8, loc="upper left")
fig.tight_layout()
save(fig, "15_cpu_harness.png")

# %% [markdown]
# ## Exercises
#
# 1. **Why one order shows the race and the other hides it.** Answer: the reader is warp 0. In forward order it
#    runs first and reads the other warps' totals before they are written (the poison, a NaN); in reverse order
#    every other warp has written its total by the time warp 0 reads. Which order would a GPU use? Any: that is
#    why CI runs the kernel tests in two orders.
# 2. **Why the shuffle deadlocks.** A warp shuffle needs every thread named in its mask to arrive at it; in a
#    branch only some threads do, so the others are waited for forever. The harness reports it instead of hanging.
# 3. **A Python float for a `float`.** ctypes passes a Python float as a C double (8 bytes) unless told the
#    argument types; the kernel reads 4 of them. What does the harness do about it? Answer: it checks every
#    argument against the kernel's signature before the launch and refuses the wrong type by name.
