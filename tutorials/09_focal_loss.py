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
# # Step 9: the focal loss (the article's Fig. 8)
#
# An 800 x 1333 image gives RetinaNet about 200,000 anchors, and only a handful of them lie on objects. Almost
# all are **easy negatives**: plain background that the classifier already calls background with confidence.
# With the ordinary cross-entropy each of them still costs a little, and 200,000 littles add up to more than the
# few positives: the easy background dominates the gradient, and the detector learns mostly that background is
# background. This **class imbalance** is what kept one-stage detectors behind two-stage ones.
#
# The focal loss multiplies the cross-entropy by a factor that vanishes for well-classified examples. With p the
# predicted probability of the class and y in {0, 1} the target, write p_t for the probability of the *true*
# answer (p_t = p if y = 1, else 1 - p):
#
# $$\text{CE}(p_t) = -\log p_t, \qquad \text{FL}(p_t) = -\alpha_t (1 - p_t)^\gamma \log p_t.$$
#
# An example classified with p_t = 0.9 has its loss cut 100-fold with gamma = 2, one with p_t = 0.99 10,000-fold;
# a misclassified one (small p_t) keeps almost all of its loss. alpha_t (0.25 for positives, 0.75 for negatives)
# is a fixed balance on top.

# %%

import matplotlib.pyplot as plt
import numpy as np
from tutorial_setup import save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.models.heads import ClassificationHead
from minidet.testing import assert_close, gradcheck

# %% [markdown]
# ## By hand, then minidet
#
# minidet's `F.sigmoid_focal_loss` takes **logits** x, not probabilities: p = sigmoid(x). It never computes
# log(sigmoid(x)) directly, which underflows to log(0) = -inf for a logit of -100 in float32; it uses
# softplus, log(1 + e^x), written to be exact for any x.

# %%
def focal_by_hand(p, y, gamma, alpha=0.25):
    p_t = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, alpha, 1 - alpha) if alpha >= 0 else 1.0
    return -alpha_t * (1 - p_t) ** gamma * np.log(p_t)


rng = np.random.default_rng(0)
logits = rng.normal(0, 3, (6, 4))                      # (anchors, classes)
targets = (rng.random((6, 4)) < 0.3).astype(np.float64)
p = 1 / (1 + np.exp(-logits))
for gamma in (0.0, 2.0):
    minidet_loss = F.sigmoid_focal_loss(md.tensor(logits), md.tensor(targets), alpha=0.25, gamma=gamma)
    assert_close(minidet_loss, focal_by_hand(p, targets, gamma), rtol=1e-12, name=f"focal loss, gamma {gamma}")
print("F.sigmoid_focal_loss equals the formula for gamma 0 (weighted cross-entropy) and 2")
big = F.sigmoid_focal_loss(md.tensor(np.array([-100.0, 100.0], dtype=np.float32)),
                           md.tensor(np.array([1.0, 0.0], dtype=np.float32)), alpha=-1, gamma=0)
print("stable for logits of +-100 in float32: two confident, wrong predictions cost", big.numpy(),
      "(the exact cross-entropy, 100 + log(1 + e^-100), not inf or nan)")

# %% [markdown]
# The gradient with respect to the logit has a closed form (the paper's Appendix B), with y = +1 or -1:
# dFL/dx = y (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1). minidet's backward agrees with it, and with finite
# differences.

# %%
x = md.tensor(logits, requires_grad=True)
F.sigmoid_focal_loss(x, md.tensor(targets), alpha=-1, gamma=2.0, reduction="sum").backward()
y_pm = 2 * targets - 1                                 # {0, 1} -> {-1, +1}
p_t = np.where(targets == 1, p, 1 - p)
appendix_b = y_pm * (1 - p_t) ** 2 * (2 * p_t * np.log(p_t) + p_t - 1)
assert_close(x.grad, appendix_b, rtol=1e-10, name="gradient vs Appendix B")
print("backward equals Appendix B's closed form;",
      "gradcheck:", gradcheck(lambda z: F.sigmoid_focal_loss(z, md.tensor(targets), gamma=2.0), [logits.copy()]))

# %% [markdown]
# ### Fig. 8: focal loss against cross-entropy
#
# The loss as a function of p_t, for several gamma (alpha off, as in Fig. 1 of the focal loss paper, Lin et al.,
# which the article's Fig. 8 redraws). gamma = 0 is the cross-entropy. The region p_t > 0.6, "well-classified
# examples", is where the curves separate: there the focal loss is a small fraction of the cross-entropy.

# %%
GAMMAS = (0, 0.5, 1, 2, 5)
p_grid = np.linspace(0.001, 1, 1000)
fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
for gamma, colour in zip(GAMMAS, ("black", "tab:blue", "tab:green", "tab:red", "tab:purple")):
    loss = focal_by_hand(p_grid, np.ones_like(p_grid), gamma, alpha=-1)
    label = "cross-entropy (gamma = 0)" if gamma == 0 else f"focal loss, gamma = {gamma}"
    ax.plot(p_grid, loss, lw=2, color=colour, label=label)
    if gamma:
        ratio_ax.semilogy(p_grid, (1 - p_grid) ** gamma, lw=2, color=colour, label=f"gamma = {gamma}")
ax.axvspan(0.6, 1, color="0.92")
ax.text(0.8, 2.2, "well-classified\nexamples", ha="center", fontsize=10)
ax.set_xlabel("probability of the true class $p_t$")
ax.set_ylabel("loss")
ax.set_ylim(0, 5)
ax.set_xlim(0, 1)
ax.set_title("Fig. 8: focal loss against cross-entropy")
ax.legend(loc="upper right")
ratio_ax.set_xlabel("probability of the true class $p_t$")
ratio_ax.set_ylabel("focal loss / cross-entropy = $(1 - p_t)^\\gamma$")
ratio_ax.set_ylim(1e-6, 1.5)
ratio_ax.set_xlim(0, 1)
ratio_ax.set_title("how much of the cross-entropy each example keeps")
ratio_ax.grid(alpha=0.3, which="both")
ratio_ax.legend()
fig.tight_layout()
save(fig, "09_focal_loss.png")

# %% [markdown]
# ## Why the class bias starts at -4.595
#
# A freshly initialised network outputs logits near its last layer's bias b. With b = 0 every anchor starts at
# p = 0.5 for every class, and each of the ~200,000 background anchors costs about as much as a positive: the
# first iterations are swamped and often diverge. The paper instead starts every probability at a **prior**
# pi = 0.01, the rough rate of foreground:
#
# $$\sigma(b) = \pi \iff b = -\log\frac{1 - \pi}{\pi} = -\log 99 = -4.595.$$

# %%
PI = 0.01
bias = -np.log((1 - PI) / PI)
head = ClassificationHead(in_channels=8, num_anchors=9, num_classes=3)
print(f"b = -log((1 - pi) / pi) = {bias:.4f}; sigmoid(b) = {1 / (1 + np.exp(-bias)):.4f}; "
      f"ClassificationHead's bias: {head.cls_logits.bias.numpy()[0]:.4f}")
assert_close(head.cls_logits.bias.numpy(), np.full(27, bias, dtype=np.float32), rtol=1e-6, name="prior bias")

NUM_NEGATIVE, NUM_POSITIVE = 100_000, 100
for name, p0 in (("bias 0 (p = 0.5)", 0.5), ("bias -4.595 (p = 0.01)", PI)):
    for gamma in (0, 2):
        neg = focal_by_hand(np.array(p0), np.array(0), gamma).item()
        pos = focal_by_hand(np.array(p0), np.array(1), gamma).item()
        print(f"{name:24s} gamma {gamma}: (alpha-weighted) a negative costs {neg:.3g}, a positive {pos:.3g}; "
              f"{NUM_NEGATIVE} negatives {NUM_NEGATIVE * neg:9.3g} vs {NUM_POSITIVE} positives "
              f"{NUM_POSITIVE * pos:6.3g}")

# %% [markdown]
# With the prior and gamma = 2, a background anchor starts at 0.75 x 0.01^2 x -log(0.99) = 7.5e-7 and a positive
# at 0.25 x 0.99^2 x log(100) = 1.13: from the first iteration the positives carry the loss.
#
# ## The share of the loss from easy negatives
#
# Later in training, most negatives are easy but not all. Take an illustrative, simulated image: 100,000 negative
# anchors, mostly confident (p of about 0.01 to 0.05) with a tail of harder ones, and 100 positives of mixed
# quality. Which anchors does each loss listen to?

# %%
count = NUM_NEGATIVE
sim = np.random.default_rng(1)
p_negative = sim.beta(1, 40, count)                   # background: mostly confident, a tail of hard ones
p_positive = sim.beta(3, 2, NUM_POSITIVE)             # objects: mixed quality
easy = p_negative < 0.1                                # p_t > 0.9
print(f"{count} negatives ({easy.mean():.1%} easy: p_t > 0.9), {NUM_POSITIVE} positives")
shares = {}
for gamma in GAMMAS:
    neg = focal_by_hand(p_negative, np.zeros(count), gamma)
    pos = focal_by_hand(p_positive, np.ones(NUM_POSITIVE), gamma)
    total = neg.sum() + pos.sum()
    shares[gamma] = (neg[easy].sum() / total, neg[~easy].sum() / total, pos.sum() / total)
    print(f"gamma {gamma:3}: easy negatives {shares[gamma][0]:6.1%}, hard negatives {shares[gamma][1]:6.1%}, "
          f"positives {shares[gamma][2]:6.1%}")
assert shares[0][0] > 0.5 > shares[2][0]

fig, ax = plt.subplots(figsize=(7, 4.2))
labels = ["cross-entropy" if g == 0 else f"gamma = {g}" for g in GAMMAS]
bottom = np.zeros(len(GAMMAS))
for i, (part, colour) in enumerate((("easy negatives (p_t > 0.9)", "0.75"), ("hard negatives", "tab:orange"),
                                    ("positives", "tab:green"))):
    values = np.array([shares[g][i] for g in GAMMAS])
    ax.bar(labels, values, bottom=bottom, color=colour, ec="black", label=part)
    bottom += values
ax.set_ylabel("share of the total loss")
ax.set_ylim(0, 1)
ax.set_title(f"Who carries the loss (alpha 0.25): {count} negatives, {NUM_POSITIVE} positives")
ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
save(fig, "09_loss_share.png")

# %% [markdown]
# ## Exercises
#
# 1. **Write the focal loss** (`my_focal(logits, targets, alpha, gamma)`, the loss of each element) and pass
#    `from minidet.exercises import check; check("focal_loss", my_focal)`. One case has logits of -100 and +100:
#    a cross-entropy written as log(sigmoid(x)) gives log(0) there; write it with softplus.
# 2. **And its gradient** (`my_focal_grad(...)`, d loss / d logit) against the paper's Appendix B:
#    `check("focal_loss_grad", my_focal_grad)`. Forgetting that (1 - p_t)^gamma depends on the logit is caught.
# 3. **Change gamma and watch.** For an easy example with p_t = 0.9, by what factor does gamma = 2 shrink its loss
#    against cross-entropy? And gamma = 5? Answer: (1 - 0.9)^2 = 1/100 and (0.1)^5 = 1/100,000 (before alpha).
# 4. **Another prior.** Which class bias makes every probability start at 0.1 instead of 0.01? Answer:
#    -log((1 - 0.1) / 0.1) = -2.197.
