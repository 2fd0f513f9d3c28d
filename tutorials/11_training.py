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
# # Step 11: training
#
# Step 10 computed the two losses of a batch and their gradients. Training repeats that and, after each backward
# pass, moves every weight a little against its gradient. The paper's recipe (Section 5):
#
# - **SGD with momentum** 0.9 and **weight decay** 1e-4, 16 images a batch, learning rate 0.01;
# - a **warm-up**: the rate starts lower and rises linearly to 0.01 over the first iterations;
# - the rate is divided by 10 at 60k and again at 80k of 90k iterations;
# - the only augmentation is a horizontal flip.
#
# That recipe starts from a backbone pretrained on ImageNet. minidet's models learn from scratch, on a CPU, in a few
# hundred steps, and there **Adam** gets much further than SGD (the measurements are in `TrainConfig`'s notes), so
# `TrainConfig` defaults to Adam with a warm-up and a cosine schedule, and group norm in the subnets. We do two
# steps of each optimizer by hand and check them against `minidet.optim.SGD` and `minidet.optim.Adam`, then let
# `minidet.train.train` run the whole loop on the built-in Shapes dataset, and draw its loss curve from its log.

# %%

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from tutorial_setup import OUT, SMALL, course_training, save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
from minidet import optim
from minidet.data import Shapes
from minidet.models import RetinaNet
from minidet.plots import plot_losses
from minidet.train import train, training_batch

# %% [markdown]
# ## One step by hand
#
# With learning rate lr, momentum m and weight decay wd, one SGD step updates each weight w with gradient g as
#
# $$g' = g + \text{wd}\, w, \qquad v \leftarrow m\, v + g', \qquad w \leftarrow w - \text{lr}\, v.$$
#
# Weight decay is the gradient of an L2 penalty (wd / 2) |w|^2: it pulls every weight slightly towards 0.
# The **velocity** v is a running sum of past gradients, each older one weighted by another factor m = 0.9: a
# direction that the gradients keep agreeing on builds up speed (up to 1 / (1 - m) = 10 times a single step),
# while gradients that flip from batch to batch cancel. On the first step v is just g'.
#
# The **warm-up** multiplies the rate by a factor that rises linearly from 1/3 at step 0 to 1 at step
# `warmup_iters`: factor(s) = 1/3 + (2/3) s / warmup_iters. A fresh detector has large, noisy gradients (the
# regression subnet has not learnt anything yet, and batch norm statistics are still settling), and a full-size
# step then can throw the weights somewhere they never recover from.
#
# A tiny model (the small backbone, 16-channel pyramid), two 64 x 64 Shapes images, two steps by hand, then the
# same two steps with minidet's optimizer and schedule (the `MultiStepLR` of the paper's recipe, with its warm-up;
# its milestones are far away here):

# %%
SGD_LR, ADAM_LR, MOMENTUM, WEIGHT_DECAY, WARMUP_ITERS, WARMUP_FACTOR = 0.02, 0.002, 0.9, 1e-4, 100, 1 / 3
shapes = Shapes(2, image_size=64, seed=0)
images, targets = training_batch([shapes[0], shapes[1]], np.random.default_rng(0), 0.0, "cpu")   # no flips
print(f"batch {tuple(images.shape)}; boxes per image {[len(t['boxes']) for t in targets]}")


def tiny_model():
    md.manual_seed(0)                                  # the same initial weights each time
    return RetinaNet(num_classes=len(Shapes.classes), backbone="resnet_small", fpn_channels=16)


def warmup_lr(lr, step):
    factor = WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / WARMUP_ITERS if step < WARMUP_ITERS else 1.0
    return lr * factor


def sgd_update(state, g, lr, step):
    state["v"] = g if step == 0 else MOMENTUM * state["v"] + g          # momentum
    return lr * state["v"]


def two_steps_by_hand(update, lr):
    model = tiny_model()
    state = {}
    for step in range(2):
        losses = model(images, targets)
        loss = losses["classification"] + losses["box_regression"]
        for p in model.parameters():
            p.grad = None
        loss.backward()
        for i, p in enumerate(model.parameters()):
            g = p.grad + WEIGHT_DECAY * p.data                                # weight decay
            p.data = p.data - update(state.setdefault(i, {}), g, warmup_lr(lr, step), step)
        print(f"  step {step}: loss {loss.item():.5f} (classification {losses['classification'].item():.5f}, "
              f"box regression {losses['box_regression'].item():.5f}), lr {warmup_lr(lr, step):.6f}")
    return model


def two_steps_of_minidet(optimizer):
    model = tiny_model()
    optimizer = optimizer(model.parameters())
    schedule = optim.MultiStepLR(optimizer, milestones=[1000], warmup_iters=WARMUP_ITERS, warmup_factor=WARMUP_FACTOR)
    for _ in range(2):
        losses = model(images, targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        schedule.step()
    return model


def largest_difference(a, b):
    return max(float(np.abs(p.data - q.data).max()) for p, q in zip(a.parameters(), b.parameters()))


print(f"SGD by hand, lr {SGD_LR}:")
by_hand = two_steps_by_hand(sgd_update, SGD_LR)
sgd = two_steps_of_minidet(lambda params: optim.SGD(params, lr=SGD_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))
print(f"{len(sgd.parameters())} parameter tensors; largest difference between the steps by hand and optim.SGD: "
      f"{largest_difference(by_hand, sgd)}; the largest change of a weight: "
      f"{largest_difference(sgd, tiny_model()):.4f}")
assert largest_difference(by_hand, sgd) == 0
print("warm-up rates of SGD for steps 0, 1, 2, 50, 99, 100:",
      [round(warmup_lr(SGD_LR, s), 6) for s in (0, 1, 2, 50, 99, 100)])

# %% [markdown]
# **Adam** keeps two running averages per weight, of the gradient (m) and of its square (v), and steps by their
# ratio: each weight gets its own step size, about lr in the direction the recent gradients agree on, whatever the
# scale of its gradients. Early on both averages are biased towards their starting value 0, which the division by
# 1 - beta^t corrects (t counts the steps from 1):
#
# $$m \leftarrow \beta_1 m + (1 - \beta_1) g', \quad v \leftarrow \beta_2 v + (1 - \beta_2) g'^2, \quad
#   w \leftarrow w - \text{lr}\, \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}.$$

# %%
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def adam_update(state, g, lr, step):
    t = step + 1
    state["m"] = BETA1 * state.get("m", 0) + (1 - BETA1) * g
    state["v"] = BETA2 * state.get("v", 0) + (1 - BETA2) * g * g
    return lr * (state["m"] / (1 - BETA1 ** t)) / (np.sqrt(state["v"] / (1 - BETA2 ** t)) + EPS)


print(f"Adam by hand, lr {ADAM_LR}:")
by_hand = two_steps_by_hand(adam_update, ADAM_LR)
adam = two_steps_of_minidet(lambda params: optim.Adam(params, lr=ADAM_LR, weight_decay=WEIGHT_DECAY))
print(f"largest difference between the steps by hand and optim.Adam: {largest_difference(by_hand, adam):.3g}; "
      f"the largest change of a weight: {largest_difference(adam, tiny_model()):.4f}, two steps of about lr each: "
      "on its first step Adam moves every weight by lr, whatever the size of its gradient (m / sqrt(v) = +-1)")
assert largest_difference(by_hand, adam) <= 1e-7

# %% [markdown]
# ## Training on Shapes
#
# `TrainConfig` holds every setting, `train` runs the loop: each step takes a batch in a random order, flips each
# image left-right half the time, normalises, pads to a multiple of 32, computes the losses, backward, the
# optimizer's step, and writes one line per step to `metrics.jsonl` in the run folder (and a checkpoint,
# `last.npz`, at the end of each epoch, from which `train(config, resume=True)` continues exactly). We keep the
# defaults (Adam at 2e-3, warm-up, cosine schedule, group norm in the subnets) and choose only the size of the run.
#
# In the small run (CI) a tiny model takes 8 steps on eight 64 x 64 images, in about a second: enough to see the
# loop work and the losses start to fall. The full run is `minidet demo`'s training, `TrainConfig`'s defaults: the
# small model (64-channel pyramid) on 1024 images of 128 x 128 for 15 epochs, 960 steps, about 4 minutes on a fast
# 2-core CPU and 10 on a slow one. It trains the detector that steps 12 and 3 use (`course_training` and
# `trained_detector` in `tutorial_setup.py`), which finds the shapes in images it never saw (step 12).

# %%
config = course_training()     # in tutorial_setup.py: steps 3 and 12 load the detector this run trains
result = train(config)
steps_per_epoch = math.ceil(config.num_images / config.batch_size)
print(f"trained {len(result.metrics)} steps of {config.optimizer} ({config.epochs} epochs of {steps_per_epoch} steps, "
      f"batches of {config.batch_size} images of {config.image_size} x {config.image_size}) in "
      f"{sum(row['seconds'] for row in result.metrics):.1f} s; run folder {result.out}")

# %% [markdown]
# ## Reading the log
#
# `metrics.jsonl` is one JSON object per line, one line per step: easy to read back in any language.

# %%
with open(Path(result.out) / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
assert rows == result.metrics
print("keys:", list(rows[0]))
for row in rows[:3] + rows[-2:]:
    print(f"step {row['step']:4d}  lr {row['lr']:.5f}  classification {row['classification']:.4f}  "
          f"box regression {row['box_regression']:.4f}  anchors: {row['num_positive']} positive, "
          f"{row['num_ignored']} ignored, {row['num_negative']} negative")

# %% [markdown]
# ### The anchor counts
#
# Every anchor of every image in the batch falls in exactly one of the three categories of step 7. An image of
# S x S pixels has (S/8)^2 + (S/16)^2 + ... + (S/128)^2 cells over P3-P7 (at least one per level), 9 anchors each.
# Most are negatives: the focal loss is what keeps them from drowning the few positives (step 9).

# %%
size, batch = config.image_size, config.batch_size
anchors_per_image = 9 * sum(max(1, size // stride) ** 2 for stride in (8, 16, 32, 64, 128))
first = rows[0]
counted = first["num_positive"] + first["num_ignored"] + first["num_negative"]
print(f"{size} x {size} image: {anchors_per_image} anchors; a batch of {batch}: {batch * anchors_per_image}; "
      f"the counts of step 1 add up to {counted}")
assert counted == batch * anchors_per_image
print(f"step 1: {first['num_negative'] / first['num_positive']:.0f} negatives per positive")

# %% [markdown]
# ### Why the classification loss starts where it does
#
# The classification subnet's bias starts at -4.595, so every probability starts near pi = 0.01 (step 9). Then
# each positive anchor costs about 0.25 x 0.99^2 x log(100) = 1.128 for its class, and every other (anchor, class)
# pair, with target 0, about 0.75 x 0.01^2 x -log(0.99) = 7.5e-7. Dividing the sum by the number of positives:
#
# $$L_\text{cls} \approx 1.128 + \frac{(P (K - 1) + N K) \cdot 7.5\times10^{-7}}{P} \approx 1.128.$$
#
# The first step's log agrees within a few percent, whatever the batch: the last layer of the subnet adds small
# random terms to the bias (its weights start as N(0, 0.01)), so the logits start near -4.595, not exactly on it.
# A start far from 1.13 would mean a wrong prior bias, or a loss not divided by the positives.

# %%
K = len(Shapes.classes)
positive_cost = 0.25 * 0.99 ** 2 * math.log(100)
negative_cost = 0.75 * 0.01 ** 2 * -math.log(0.99)
P, N = first["num_positive"], first["num_negative"]
predicted = (P * (positive_cost + (K - 1) * negative_cost) + N * K * negative_cost) / P
print(f"predicted from the prior: {predicted:.4f}; step 1 logged {first['classification']:.4f} "
      f"({first['classification'] / predicted - 1:+.1%})")
assert abs(first["classification"] / predicted - 1) < 0.03

# %% [markdown]
# ## The loss curve
#
# Classification and box regression losses per step, and the learning rate: the warm-up ramp, then half a cosine
# down to 0 at the last step (the paper's schedule instead divides the rate by 10 at 2/3 and 8/9 of training:
# `schedule="step"`). Per-step losses are noisy (each batch has different objects), so a running mean over 10
# steps is drawn on top in the full run.

# %%
steps = np.array([row["step"] for row in rows])
curves = {name: np.array([row[name] for row in rows]) for name in ("classification", "box_regression", "loss")}
window = 1 if SMALL else 10

fig, (ax, lr_ax) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.6, 1]})
for name, colour in (("loss", "black"), ("classification", "tab:blue"), ("box_regression", "tab:orange")):
    label = {"loss": "total", "classification": "classification (focal)",
             "box_regression": "box regression (smooth L1)"}[name]
    ax.plot(steps, curves[name], color=colour, alpha=0.35 if window > 1 else 1, lw=1,
            label=None if window > 1 else label)
    if window > 1:
        smooth = np.convolve(curves[name], np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color=colour, lw=2, label=f"{label}, mean of {window}")
ax.axhline(positive_cost, color="tab:blue", ls=":", lw=1)
ax.text(steps[-1], positive_cost, "0.25 x 0.99² x log 100", color="tab:blue", ha="right", va="bottom", fontsize=9)
ax.set_xlabel("step")
ax.set_ylabel("loss (per positive anchor)")
ax.set_ylim(0, None)
ax.set_title(f"training on Shapes: {len(rows)} steps of {batch} images")
ax.grid(alpha=0.3)
ax.legend()
lr_ax.plot(steps, [row["lr"] for row in rows], color="tab:green", lw=2)
lr_ax.axvspan(0.5, min(config.warmup_iters, len(rows)) + 0.5, color="0.92")
lr_ax.text(0.6, config.lr * 0.05, "warm-up", fontsize=9)
lr_ax.set_xlabel("step")
lr_ax.set_ylabel("learning rate")
lr_ax.set_ylim(0, config.lr * 1.1)
lr_ax.set_title(f"learning rate: warm-up, then {'cosine' if config.schedule == 'cosine' else 'x0.1 steps'}")
lr_ax.grid(alpha=0.3)
fig.tight_layout()
save(fig, "11_loss_curve.png")

first_mean, last_mean = (curves["loss"][:window].mean(), curves["loss"][-window:].mean())
print(f"total loss: {first_mean:.3f} over the first {window} step(s), {last_mean:.3f} over the last {window}")

# %% [markdown]
# What the full run shows (960 steps). Both losses fall fastest in the first ten steps or so, the classification
# loss from the prior's 1.12 to about 0.55 and the box regression loss from about 0.8 to about 0.34, then more
# slowly: around step 100 they are near 0.41 and 0.20, around step 480 near 0.10 and 0.06, and over the last 20
# steps 0.034 and 0.030. The classification loss is the one to watch: it says how well the subnet tells the four
# shapes from each other and from the background. In the rate's curve, the warm-up and the cosine multiply, so the
# peak, at the end of the warm-up (step 101), is a little under 0.002. The paper trains for 90,000 iterations.

# %% [markdown]
# `minidet.plots.plot_losses` draws the same curves from the same rows, on log scales (so the late, slow progress
# stay visible); `minidet train` writes it as `loss.png` in its run folder.

# %%
print("saved", plot_losses(rows, OUT / "11_plot_losses.png", smooth=window))

# %% [markdown]
# ## Exercises
#
# 1. **Read the log.** In `metrics.jsonl`, at which step is the learning rate highest, and why there? Answer: at
#    the end of the warm-up (`warmup_iters`), after which the cosine schedule only lowers it.
# 2. **SGD against Adam.** Train the same run with `optimizer="sgd", lr=0.02` and compare the classification
#    losses at the end. Answer: SGD's stays far higher in so few steps (on the demo's data, after 190 steps 1.03
#    against Adam's 0.33): the paper's SGD recipe assumes a backbone pretrained on ImageNet.
# 3. **The first loss.** Why does the classification loss start near 1.13 for every run? Answer: every probability
#    starts at 0.01 (step 9's prior), so each positive costs about 0.25 * 0.99^2 * log(100) = 1.13, and the
#    negatives almost nothing; divided by the positives, that is the loss.
