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
# # Step 2: convolution, three ways
#
# Every layer of RetinaNet's backbone, feature pyramid and subnets is a convolution. A convolution slides a small
# kernel over the image and, at each position, takes the dot product of the kernel with the window of input under
# it. The same weights are used at every position, which is why a detector can look for objects everywhere at
# once.
#
# We write it three times: a plain loop that reads like the definition, then *im2col*, which turns the whole
# convolution into one matrix product (the way fast libraries do it), then minidet's `F.conv2d`. All three must
# give the same numbers.
#
# Shape letters, used throughout minidet:
#
# ```
# N  batch            C  input channels     H, W    input height and width
# O  output channels  KH, KW kernel size    SH, SW  stride    PH, PW  zero padding
# OH = (H + 2 PH - KH) // SH + 1            OW = (W + 2 PW - KW) // SW + 1
# ```

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from tutorial_setup import SMALL, save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.testing import assert_close, gradcheck

rng = np.random.default_rng(0)
N, C, H, W = (1, 2, 7, 7) if SMALL else (2, 3, 16, 16)
OC, KH, KW = 4, 3, 3          # OC: the O output channels
STRIDE, PAD = 2, 1
x = rng.standard_normal((N, C, H, W))
w = rng.standard_normal((OC, C, KH, KW))
b = rng.standard_normal(OC)
print(f"input x {x.shape}, weight w {w.shape}, bias b {b.shape}, stride {STRIDE}, padding {PAD}")

# %% [markdown]
# ## 1. The definition, as loops
#
# $y[n, o, i, j] = b[o] + \sum_{c, k, l} w[o, c, k, l] \; x_{\text{padded}}[n, c, i S + k, j S + l]$.
# Six nested loops: correct, obvious, and far too slow for a real network (Python runs every multiply-add).

# %%
def conv2d_loops(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    for n_ in range(n):
        for o_ in range(o):
            for i in range(oh):
                for j in range(ow):
                    window = xp[n_, :, i * stride:i * stride + kh, j * stride:j * stride + kw]   # (C, KH, KW)
                    y[n_, o_, i, j] = (window * w[o_]).sum() + b[o_]
    return y


y_loops = conv2d_loops(x, w, b, STRIDE, PAD)
print("loops:  y", y_loops.shape)

# %% [markdown]
# ## 2. im2col: the convolution as one matrix product
#
# Look at the loop body: for each output position (i, j) it reads a window of C x KH x KW numbers and takes its
# dot product with each of the O kernels. Copy every window into one **column** of a matrix, and all those dot
# products become a single matrix product:
#
# ```
# columns   (N, C*KH*KW, OH*OW)     one column per output position, L = OH*OW of them
# weights   (O, C*KH*KW)            one row per output channel
# y = weights @ columns  ->  (N, O, OH*OW)  ->  reshape (N, O, OH, OW)
# ```
#
# The price is memory: each input value is copied into up to KH x KW columns. The reward is speed: the product
# runs in an optimised BLAS routine instead of Python loops.

# %%
def im2col(x, kh, kw, stride, pad):
    """(N, C, H, W) -> (N, C*KH*KW, OH*OW): one column per output position."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    cols = np.empty((n, c, kh, kw, oh, ow))
    for ki in range(kh):                      # a loop over the KH*KW kernel taps only, not over pixels
        for kj in range(kw):
            cols[:, :, ki, kj] = xp[:, :, ki:ki + stride * oh:stride, kj:kj + stride * ow:stride]   # (N, C, OH, OW)
    return cols.reshape(n, c * kh * kw, oh * ow), (oh, ow)


cols, (OH, OW) = im2col(x, KH, KW, STRIDE, PAD)
y_im2col = (w.reshape(OC, -1) @ cols + b[:, None]).reshape(N, OC, OH, OW)   # (O, CKK) @ (N, CKK, L) -> (N, O, L)
print(f"im2col: columns {cols.shape} = (N, C*KH*KW, OH*OW) = ({N}, {C}*{KH}*{KW}, {OH}*{OW})")
print(f"        weights {w.reshape(OC, -1).shape} = (O, C*KH*KW);  y {y_im2col.shape}")
print(f"        the columns hold {cols.size} numbers for an input of {x.size}: "
      f"{cols.size / x.size:.2f}x larger")
np.testing.assert_allclose(y_im2col, y_loops, rtol=1e-12, atol=1e-12)
print("im2col equals the loops")

# %% [markdown]
# ## 3. minidet's `F.conv2d`
#
# `minidet/functional/conv.py` does im2col without the tap loop: `window_view` builds every window as a strided
# *view* of the padded input, of shape (N, C, KH, KW, OH, OW), which costs no copy; one `reshape` then copies it
# into the columns. Its `backward` is the transposed story: the gradient of the columns is `weights.T @ dL/dy`, and
# *col2im* adds each column back onto the pixels it was read from (for stride 1 there is a faster way to the same
# gradient: section 4).

# %%
y_md = F.conv2d(md.tensor(x), md.tensor(w), md.tensor(b), stride=STRIDE, padding=PAD)
print("minidet: y", y_md.shape, " y[0, 0, 0, :3] =", y_md.numpy()[0, 0, 0, :3].round(4))
assert_close(y_md, y_loops, rtol=1e-12, name="conv2d vs loops")
assert_close(y_md, y_im2col, rtol=1e-12, name="conv2d vs im2col")
print("loops, im2col and F.conv2d agree (relative error < 1e-12)")

# the backward pass, checked by central differences on every element of x, w and b
print("gradcheck conv2d:", gradcheck(lambda x_, w_, b_: F.conv2d(x_, w_, b_, stride=STRIDE, padding=PAD),
                                     [x[:1, :2, :5, :5].copy(), w[:, :2].copy(), b.copy()], name="conv2d"))

# %% [markdown]
# How much faster? Timings on this machine (they vary; the ratio is what matters).

# %%
def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


xt, wt, bt = md.tensor(x), md.tensor(w), md.tensor(b)
t_loops = best_of(lambda: conv2d_loops(x, w, b, STRIDE, PAD))
t_im2col = best_of(lambda: w.reshape(OC, -1) @ im2col(x, KH, KW, STRIDE, PAD)[0])
t_md = best_of(lambda: F.conv2d(xt, wt, bt, stride=STRIDE, padding=PAD))
print(f"loops {t_loops * 1e3:.2f} ms, im2col {t_im2col * 1e3:.3f} ms, F.conv2d {t_md * 1e3:.3f} ms")

# %% [markdown]
# ## 4. The backward: the input's gradient is a convolution too
#
# Each input pixel fed the outputs whose windows covered it, through the weight at its place in each window. For
# stride 1 that reads, with $g = \partial L / \partial y$:
# $\partial L / \partial x_{\text{padded}}[n, c, r, s] = \sum_{o, k, l} w[o, c, k, l] \; g[n, o, r - k, s - l]$,
# which is a convolution of $g$ (zero outside the output) with the kernel **flipped** in both directions and its
# input and output channels swapped. Padding $g$ by KH - 1 - PH gives the gradient of x itself. So one im2col and
# one matrix product give it, where col2im adds KH x KW column-sized slices; `F.conv2d` does it this way for
# stride 1 (and keeps col2im for strides, where this identity would need zeros between g's values, for 1 x 1
# kernels, whose col2im is a single addition, and for a padding as wide as the kernel).

# %%
xt1 = md.tensor(x, requires_grad=True)
y1 = F.conv2d(xt1, md.tensor(w), stride=1, padding=PAD)
g = rng.standard_normal(y1.shape)
y1.backward(g)
w_flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)          # (C, O, KH, KW): flipped, in and out swapped
gx_by_convolution = conv2d_loops(g, w_flipped, np.zeros(C), 1, KH - 1 - PAD)
assert_close(xt1.grad, gx_by_convolution, rtol=1e-12, name="dL/dx vs the flipped-kernel convolution")
print(f"dL/dx {xt1.grad.shape}: F.conv2d's backward equals g convolved with the flipped kernel")

# %% [markdown]
# ## The picture: one window becomes one column
#
# On the left, the padded input of channel 0 with the window of output position (1, 1) outlined; on the right, the
# column matrix of image 0, C*KH*KW rows by OH*OW columns, with that window's column outlined, in one colour scale:
# each value of the window reappears with its colour in the column. Reading the column top to bottom walks the
# window channel by channel, row by row.

# %%
i, j = 1, 1
position = i * OW + j
padded = np.pad(x[0, 0], PAD)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10.8, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
limit = np.abs(cols[0]).max()                              # one colour scale for both: a value keeps its colour
ax0.imshow(padded, cmap="coolwarm", vmin=-limit, vmax=limit)
ax0.add_patch(plt.Rectangle((j * STRIDE - 0.5, i * STRIDE - 0.5), KW, KH, fill=False, ec="black", lw=2.5))
ax0.set_title(f"padded input, channel 0 ({padded.shape[0]}x{padded.shape[1]})\n"
              f"window of output ({i}, {j}), stride {STRIDE}")
ax0.set_xlabel("x")
ax0.set_ylabel("y")
shown = ax1.imshow(cols[0], cmap="coolwarm", aspect="auto", vmin=-limit, vmax=limit)
fig.colorbar(shown, ax=[ax0, ax1], shrink=0.8, label="value (the same scale in both panels)")
ax1.add_patch(plt.Rectangle((position - 0.5, -0.5), 1, C * KH * KW, fill=False, ec="black", lw=2.5))
for c in range(1, C):
    ax1.axhline(c * KH * KW - 0.5, color="white", lw=1)
ax1.set_title(f"columns of image 0: (C*KH*KW, OH*OW) = ({C * KH * KW}, {OH * OW})\n"
              f"column {position} = output ({i}, {j}); white lines separate channels")
ax1.set_xlabel("output position  i * OW + j")
ax1.set_ylabel("c * KH * KW + k * KW + l")
save(fig, "02_im2col.png")

# %% [markdown]
# ## Exercises
#
# 1. **Output size.** Predict the output of a 3x3 kernel with stride 2 and no padding on a 7 x 7 input, then check
#    it with `F.conv2d`. Answer: 3 x 3, from (7 + 2 * 0 - 3) // 2 + 1.
# 2. **A 1x1 convolution is a matrix product over channels.** For x of shape (2, 3, 4, 5) and w of shape (6, 3),
#    compare `F.conv2d(x, w[:, :, None, None])` with `np.einsum("oc,nchw->nohw", w, x)`. Answer: equal to float32
#    rounding (about 5e-7 apart).
# 3. **The size of im2col.** How many numbers does the im2col matrix of a 3x3, stride-1, padding-1 convolution
#    hold for one 64-channel 64 x 64 image, against the image itself? Answer: 64 * 9 rows times 64 * 64 columns,
#    nine times the image: the reason minidet avoids building it where it can.
# 4. **The input's gradient with a stride.** For stride 2, spread g over a zero array of 2 (OH - 1) + 1 rows and
#    columns (g's values on the even ones: g "dilated"), pad it, and convolve it with the flipped kernel of
#    section 4; compare with `x.grad` from `F.conv2d(..., stride=2).backward(g)`. How much padding on each side?
#    Answer: KH - 1 - PH at the top and left, and (H + 2 PH - KH) % 2 more at the bottom (and the same with W at
#    the right): when H + 2 PH - KH is odd, the last window stops a row short of the padded input's end, and that
#    row's gradient is 0. Then the two agree to about 1e-15 in float64. The zeros are why `F.conv2d` keeps col2im
#    for strides: three quarters of this product would multiply zeros.
