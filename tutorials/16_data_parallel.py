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
# # Step 16: training on many workers
#
# The paper trains RetinaNet with **synchronised SGD** on 8 GPUs, 16 images per step, 2 per GPU. Each GPU holds a
# copy of the whole model, computes the gradient of its own 2 images, and before the update all 8 gradients are
# added together (an **all-reduce**); every copy then takes the same step and stays identical to the others. That
# is data-parallel training, and `minidet train` does it under `mpiexec -n N` (`minidet/distributed.py`).
#
# We build it by hand on workers simulated in one process: why the sum of the workers' gradients is the gradient of
# the whole batch, how an all-reduce moves the data (the ring, and its cost), and the learning-rate rule for a
# larger batch. Then the real thing: two processes under `mpiexec`, whose weights equal one process's.

# %%

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from tutorial_setup import save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
from minidet.train import TrainConfig, train

# %% [markdown]
# ## The gradient of a batch is the sum of its parts' gradients
#
# A loss that is a sum over the images, divided by a normaliser D of the whole batch (RetinaNet's: its positive
# anchors), splits exactly: L = (S_1 + S_2) / D, where S_w sums worker w's images, so dL/dw = dS_1/dw / D +
# dS_2/dw / D. Each worker can compute its own term, if it divides by the **global** D rather than its own. A
# small least-squares model shows it, in float64.

# %%
rng = np.random.default_rng(0)
x, y = rng.standard_normal((16, 5)), rng.standard_normal(16)             # a batch of 16 examples
weights = rng.standard_normal((5, 1))


def gradient(rows, normaliser):
    w = md.tensor(weights, requires_grad=True)
    residual = md.tensor(x[rows]) @ w - md.tensor(y[rows, None])            # (rows, 1)
    ((residual * residual).sum() / normaliser).backward()
    return w.grad


whole = gradient(slice(0, 16), 16)
workers = [gradient(slice(0, 8), 16), gradient(slice(8, 16), 16)]       # each divides by the global 16
print("whole batch        :", whole.ravel().round(6))
print("sum of two workers :", (workers[0] + workers[1]).ravel().round(6))
np.testing.assert_allclose(workers[0] + workers[1], whole, rtol=1e-12)
own = [gradient(slice(0, 8), 8), gradient(slice(8, 16), 8)]             # each divides by its own 8
np.testing.assert_allclose((own[0] + own[1]) / 2, whole, rtol=1e-12)
print("with equal shares, the mean of the workers' own-normalised gradients is the same thing")
uneven = [gradient(slice(0, 12), 12), gradient(slice(12, 16), 4)]       # 12 and 4 examples: the mean is wrong
print(f"with shares of 12 and 4, that mean is off by {np.abs((uneven[0] + uneven[1]) / 2 - whole).max():.3f};"
      f" weighting each by its share (12/16, 4/16) is right again")
np.testing.assert_allclose(uneven[0] * 12 / 16 + uneven[1] * 4 / 16, whole, rtol=1e-12)

# %% [markdown]
# RetinaNet's normaliser is not the number of images but the number of positive anchors, different on each worker:
# `minidet.distributed.loss_share` multiplies each worker's loss by its own positives / the batch's, so that every
# worker divides by the batch's, before the backward pass. A worker left without images at the end of an epoch
# adds zeros.
#
# ## The all-reduce by hand: the ring
#
# Afterwards every worker must hold the sum. Sending every gradient to every worker moves N - 1 copies per worker.
# The **ring all-reduce** moves less: cut each worker's array into N chunks; in N - 1 steps each worker passes one
# chunk to its right neighbour, which adds it to its own (reduce-scatter: worker w ends with the full sum of chunk
# w + 1); in N - 1 more steps the summed chunks go round (all-gather). Each worker sends 2 (N - 1) / N of the array
# in all, almost twice its size whatever N is, which is why the ring (NCCL's default) scales to many GPUs.

# %%
def ring_all_reduce(arrays):
    """Sum ``arrays`` (one per simulated worker) the way a ring all-reduce does; returns the results and the
    number of values each worker sent."""
    n = len(arrays)
    chunks = [np.array_split(a.astype(np.float64), n) for a in arrays]          # chunks[worker][c]
    sent = 0
    for step in range(n - 1):                                                   # reduce-scatter
        outgoing = [(w, (w - step) % n, chunks[w][(w - step) % n].copy()) for w in range(n)]
        for w, c, values in outgoing:
            chunks[(w + 1) % n][c] += values
        sent += len(outgoing[0][2])
    for step in range(n - 1):                                                   # all-gather
        outgoing = [(w, (w + 1 - step) % n, chunks[w][(w + 1 - step) % n].copy()) for w in range(n)]
        for w, c, values in outgoing:
            chunks[(w + 1) % n][c] = values
        sent += len(outgoing[0][2])
    return [np.concatenate(c) for c in chunks], sent


simulated = [rng.standard_normal(1000) for _ in range(4)]
reduced, sent = ring_all_reduce(simulated)
for result in reduced:
    np.testing.assert_allclose(result, sum(simulated), rtol=1e-12)
print(f"4 workers, 1000 values each: every worker holds the sum, and sent {sent} values, "
      f"2 (N - 1) / N x 1000 = {2 * 3 / 4 * 1000:.0f}")

# %% [markdown]
# So an all-reduce of B bytes takes about 2 (N - 1) / N x B / bandwidth. For the demo's model (about 0.9 M
# weights, 3.5 MB of float32 gradients) over a 10 Gbit/s network (1.25 GB/s), 8 workers: 2 x 7/8 x 3.5 MB / 1.25
# GB/s, about 5 ms per step, small next to a CPU step of a few hundred ms; for a ResNet-50-FPN RetinaNet's 38 M
# weights (152 MB) the same network needs about 210 ms, which is why GPUs in one machine talk over NVLink instead.

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.8))
workers_n = np.arange(2, 33)
ax.plot(workers_n, 2 * (workers_n - 1) / workers_n, "o-", label="ring: 2 (N - 1) / N")
ax.plot(workers_n, workers_n - 1, "s-", label="send to all: N - 1")
ax.set_xlabel("workers N")
ax.set_ylabel("bytes each worker sends / gradient bytes")
ax.set_yscale("log")
ax.set_title("what one all-reduce costs each worker")
ax.grid(alpha=0.3)
ax.legend()
save(fig, "16_all_reduce.png")

# %% [markdown]
# ## The learning rate of a larger batch
#
# N workers of b images make a global batch of N * b, and the gradient is that batch's. The paper's rate, 0.01,
# is for 16 images. The **linear scaling rule** (Goyal et al., 2017, used by Detectron for RetinaNet) keeps the
# rate proportional to the global batch: twice the images per step, twice the rate and half the steps, with a
# warm-up so that the first large steps do not blow up a fresh model.

# %%
for workers_count, per_worker in ((1, 16), (8, 2), (8, 4), (16, 4)):
    batch = workers_count * per_worker
    print(f"{workers_count:2d} workers x {per_worker} images = {batch:3d} a step: learning rate "
          f"{0.01 * batch / 16:.3f}")

# %% [markdown]
# ## The real thing: two processes
#
# `mpiexec -n 2 minidet train ...` starts two processes; each finds the other through MPI (`mpi4py`), takes half of
# every global batch, and all-reduces its gradients. Below, 2 workers of 4 images train a small model for one
# epoch, then one process trains it with batches of 8 in the same order; the backbone's batch norm is frozen
# (`--backbone-norm frozen`): trainable batch norm would normalise each worker's 4 images by their own statistics,
# close to, but not the same as, 8 images'. The weights agree to float32 rounding: the sums are the same, added in
# another order. (With SGD. Adam divides each gradient element by its own running size, so a near-zero element
# that rounding flips from + to - moves its weight by a whole step the other way: with Adam, the same comparison
# gave 3.5e-4 instead. This needs `pip install -e ".[mpi]"`: mpi4py and MPICH.)

# %%
RUN = Path(tempfile.mkdtemp(prefix="minidet_step16_"))
settings = dict(num_images=16, image_size=64, epochs=1, fpn_channels=32, backbone_norm="frozen", optimizer="sgd",
                lr=0.01, progress=False, auto_anchors=False)
mpiexec = shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401  (mpiexec runs minidet's workers with it)
    have_mpi = mpiexec is not None
except ImportError:
    have_mpi = False
if have_mpi:
    command = [mpiexec, "-n", "2", sys.executable, "-m", "minidet.cli", "train", "--num-images", "16",
               "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--fpn-channels", "32",
               "--backbone-norm", "frozen", "--optimizer", "sgd", "--lr", "0.01", "--no-auto-anchors",
               "--out", str(RUN / "two")]
    print("$", " ".join(["mpiexec", "-n", "2", "minidet", *command[6:]]))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    print(finished.stdout.strip())
    assert finished.returncode == 0, finished.stderr[-2000:]
    two = md.load(RUN / "two" / "last.npz")
    one = train(TrainConfig(batch_size=8, out=str(RUN / "one"), **settings)).model.state_dict()
    differences = {name: float(np.abs(two["model." + name] - value).max() / max(np.abs(value).max(), 1e-12))
                   for name, value in one.items()}
    worst = max(differences, key=differences.get)
    print(f"2 workers x 4 against 1 process x 8: largest relative difference of a weight tensor "
          f"{differences[worst]:.1e} ({worst})")
    assert differences[worst] < 1e-4
else:
    print("mpiexec or mpi4py is not installed here: pip install -e '.[mpi]' and run this step again")
shutil.rmtree(RUN)

# %% [markdown]
# To measure it on your machine: `benchmarks/bench_data_parallel.py` times a step of the demo's model on one
# process and under `mpiexec -n 2`, and the all-reduce alone. Across machines, `mpiexec` takes a host file
# (`mpiexec -f hosts -n 16 ...` with MPICH) and the run folder must be on a file system every machine sees (only
# worker 0 writes, but all read the checkpoint on resume); on GPUs each worker takes its own device and the
# gradients travel by NCCL (`minidet train --device cuda` under `mpiexec`).
#
# ## Exercises
#
# 1. **Own normalisers.** In the least-squares example, give the workers 10 and 6 examples and let each divide by
#    its own count: by how much is the mean of their gradients off, and which weights make it right? Answer: off by
#    0.57 in its largest element; weights 10/16 and 6/16 make it exact.
# 2. **The ring's traffic.** With `ring_all_reduce`, count what each of 8 workers sends for 800 values. Answer:
#    2 x 7 x 100 = 1,400 values, 2 (N - 1) / N x 800.
# 3. **The rate.** You move from 1 process with 16 images to 4 workers with 16 images each: what learning rate does
#    the linear scaling rule give for SGD, starting from 0.01? Answer: 0.04, for a global batch of 64.
