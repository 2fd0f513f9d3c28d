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
# # Step 8: box coding and the smooth L1 loss
#
# A positive anchor (step 7) must learn to move onto its object. The regression subnet does not predict the
# object's corners directly: it predicts four **offsets relative to the anchor**, and the error is measured
# relative to the anchor too, as the article stresses. With centres (cx, cy) and sizes (w, h), a for the anchor
# and g for its ground-truth box:
#
# $$d_x = \frac{g_{cx} - a_{cx}}{a_w}, \quad d_y = \frac{g_{cy} - a_{cy}}{a_h}, \quad
#   d_w = \log\frac{g_w}{a_w}, \quad d_h = \log\frac{g_h}{a_h}.$$
#
# Why this form? Shifts are measured in anchor widths and sizes as log-ratios, so the same offsets mean the same
# *relative* correction for a 32-pixel anchor on P3 and a 512-pixel one on P7: one set of subnet weights serves
# every level. The logarithm also makes growing and shrinking symmetric (x2 is +0.69, /2 is -0.69) and keeps
# the decoded size positive.

# %%

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from tutorial_setup import save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.boxes import decode_boxes, encode_boxes
from minidet.testing import assert_close, gradcheck

# %% [markdown]
# ## Encoding, by hand and by minidet
#
# Two anchors of very different sizes, each with a box that is shifted by a quarter of the anchor's width and
# half as tall again: the offsets come out the same.

# %%
anchors = np.array([[20, 20, 52, 52],                   # a 32-pixel anchor (P3)
                    [100, 100, 356, 356]], dtype=np.float64)   # a 256-pixel anchor (P6)
boxes = np.array([[28, 12, 60, 60],
                  [164, 36, 420, 420]], dtype=np.float64)


def encode_by_hand(box, anchor):
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    gw, gh = box[2] - box[0], box[3] - box[1]
    acx, acy = anchor[0] + aw / 2, anchor[1] + ah / 2
    gcx, gcy = box[0] + gw / 2, box[1] + gh / 2
    return [(gcx - acx) / aw, (gcy - acy) / ah, np.log(gw / aw), np.log(gh / ah)]


deltas_hand = np.array([encode_by_hand(b, a) for b, a in zip(boxes, anchors)])
deltas = encode_boxes(boxes, anchors)                   # (N, 4) dx, dy, dw, dh
assert_close(deltas, deltas_hand, rtol=1e-12, name="encode")
print("offsets (dx, dy, dw, dh), the same for both anchors:")
print(deltas.round(4))
print(f"  dw = log(1) = 0, dh = log(1.5) = {np.log(1.5):.4f}")

# %% [markdown]
# Decoding inverts it (`minidet.boxes.decode_boxes`): cx = a_cx + d_x a_w, w = a_w exp(d_w), and so on. It clamps
# d_w and d_h at log(1000/16) = 4.135 before the exponential, so a wild prediction early in training cannot
# produce a box 10^40 pixels wide.

# %%
decoded = decode_boxes(deltas, anchors)
assert_close(decoded, boxes, rtol=1e-12, name="decode(encode(boxes))")
print("decode(encode(boxes)) gives the boxes back:", decoded[0])
wild = decode_boxes(np.array([[0.0, 0.0, 50.0, 50.0]]), anchors[:1])
print(f"a wild dw = dh = 50 decodes to a box {wild[0, 2] - wild[0, 0]:.0f} pixels wide "
      f"(32 x exp(4.135) = {32 * np.exp(np.log(1000 / 16)):.0f}), not 32 x exp(50)")

# %% [markdown]
# ## The smooth L1 loss
#
# The regression subnet is trained with the **smooth L1** loss on each offset, summed over the positive anchors.
# With d the difference between the predicted and the target offset:
#
# $$\text{smooth}_{L1}(d) = \begin{cases} 0.5\, d^2 / \beta & |d| < \beta \\ |d| - 0.5\, \beta & \text{otherwise}
#   \end{cases}$$
#
# Near zero it is quadratic, so small errors get a gentle gradient that shrinks as they vanish (no jitter around
# the optimum, as plain L1 would give); far away it is linear, so its gradient never exceeds 1 and an outlier
# cannot swamp a batch (as L2's would). At |d| = beta the two pieces meet with the same value and slope. The paper
# uses beta = 0.11; torchvision's preset uses plain L1 (beta = 0).

# %%
BETA = 0.11


def smooth_l1_by_hand(d, beta):
    return np.where(np.abs(d) < beta, 0.5 * d ** 2 / beta, np.abs(d) - 0.5 * beta)


rng = np.random.default_rng(0)
predicted = deltas + rng.normal(0, 0.1, deltas.shape)   # a subnet's prediction, a little off
loss_md = F.smooth_l1_loss(md.tensor(predicted), md.tensor(deltas), reduction="sum", beta=BETA)
loss_hand = smooth_l1_by_hand(predicted - deltas, BETA).sum()
assert_close(np.array(loss_md.item()), np.array(loss_hand), rtol=1e-12, name="smooth L1")
print(f"smooth L1 (beta {BETA}) of the prediction: minidet {loss_md.item():.6f}, by hand {loss_hand:.6f}")
print("gradcheck smooth_l1_loss:",
      gradcheck(lambda p: F.smooth_l1_loss(p, md.tensor(deltas), reduction="none", beta=BETA), [predicted.copy()],
                name="smooth_l1_loss"))

# %% [markdown]
# ### The picture
#
# Left: a 32-pixel anchor, its box and the offsets that relate them. Middle: the smooth L1 loss for the paper's
# beta and for beta = 1, against L1 and L2. Right: their slopes.

# %%
fig, (ax, loss_ax, slope_ax) = plt.subplots(1, 3, figsize=(15, 4.6))
(ax1, ay1, ax2, ay2), (gx1, gy1, gx2, gy2) = anchors[0], boxes[0]
ax.add_patch(Rectangle((ax1, ay1), ax2 - ax1, ay2 - ay1, fill=False, ec="tab:blue", lw=2, ls="--", label="anchor"))
ax.add_patch(Rectangle((gx1, gy1), gx2 - gx1, gy2 - gy1, fill=False, ec="black", lw=2.5, label="ground-truth box"))
acx, acy, gcx, gcy = (ax1 + ax2) / 2, (ay1 + ay2) / 2, (gx1 + gx2) / 2, (gy1 + gy2) / 2
ax.plot([acx], [acy], "o", color="tab:blue")
ax.plot([gcx], [gcy], "o", color="black")
ax.annotate("", (gcx, gcy), (acx, acy), arrowprops={"arrowstyle": "-|>", "color": "tab:red", "lw": 1.5})
dx, dy, dw, dh = deltas[0]
ax.text(10, 70, f"dx = (gcx - acx) / aw = {dx:.3f}\ndy = (gcy - acy) / ah = {dy:.3f}\n"
        f"dw = log(gw / aw) = {dw:.3f}\ndh = log(gh / ah) = {dh:.3f}", fontsize=9, va="top", family="monospace")
ax.set_xlim(5, 70)
ax.set_ylim(95, -3)
ax.set_aspect("equal")
ax.legend(loc="upper left", fontsize=8, ncol=2)           # above the boxes; the offsets' text is below them
ax.set_title("the offsets of a box relative to its anchor")
d = np.linspace(-1.5, 1.5, 601)
for beta, colour in ((BETA, "tab:red"), (1.0, "tab:orange")):
    loss_ax.plot(d, smooth_l1_by_hand(d, beta), color=colour, label=f"smooth L1, beta {beta}")
    slope_ax.plot(d, np.clip(d / beta, -1, 1), color=colour, label=f"smooth L1, beta {beta}")
loss_ax.plot(d, np.abs(d), "k:", label="L1 |d|")
loss_ax.plot(d, 0.5 * d ** 2, "k--", label="L2 0.5 d^2")
slope_ax.plot(d, np.sign(d), "k:", label="L1")
slope_ax.plot(d, d, "k--", label="L2")
loss_ax.set_ylim(0, 1.6)
slope_ax.set_ylim(-1.6, 1.6)
for a, ylabel, title in ((loss_ax, "loss", "smooth L1 against L1 and L2"),
                         (slope_ax, "d loss / d d", "their slopes: bounded by 1 for smooth L1")):
    a.set_xlabel("d = predicted offset - target offset")
    a.set_ylabel(ylabel)
    a.set_title(title)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
fig.tight_layout()
save(fig, "08_box_coding.png")

# %% [markdown]
# ## Exercises
#
# 1. **Write the encoder** (`my_encode(boxes, anchors) -> (N, 4)` offsets dx, dy, dw, dh) and pass
#    `from minidet.exercises import check; check("encode", my_encode)`.
# 2. **Write smooth L1** (`my_smooth_l1(input, target, beta)`, the loss of each element) and pass
#    `check("smooth_l1", my_smooth_l1)`; one case sits exactly at |d| = beta.
# 3. **Round trip.** For random boxes and anchors, is `decode_boxes(encode_boxes(b, a), a)` equal to `b`? Answer:
#    yes, to float32 rounding, as long as no dw or dh exceeds the decoder's clamp, log(1000 / 16) = 4.135.
