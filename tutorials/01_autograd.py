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
# # Step 1: automatic differentiation
#
# RetinaNet learns by gradient descent: after each batch, every weight moves a little against the gradient of the
# loss. A detector has millions of weights and its loss is a long chain of operations (convolutions, additions,
# a focal loss), so nobody writes those gradients by hand. An *autograd engine* does it: it records each operation
# as it runs, then walks the record backwards, applying the chain rule one operation at a time.
#
# Two ideas are enough:
#
# - a **Tensor** holds an array, and remembers which operation made it;
# - a **Function** knows its forward computation and, given the gradient of its output, the gradients of its
#   inputs.
#
# We build both by hand in about thirty lines, then meet minidet's, and check them against each other and against
# finite differences.

# %%

import matplotlib.pyplot as plt
import numpy as np
from tutorial_setup import save  # shared by the steps: tutorials/tutorial_setup.py

import minidet as md
import minidet.functional as F
from minidet.testing import assert_close, gradcheck

# %% [markdown]
# ## A Tensor and a Function by hand
#
# `Function.__call__` runs `forward` on the raw arrays and stamps the output with its creator. `backward` on the
# final tensor visits the creators from the last to the first; each receives the gradient of its output and
# passes the gradients of its inputs further back. A tensor used twice receives two gradients, which add up (the
# multivariable chain rule), so the walk must finish a tensor's consumers before the tensor itself: it goes in
# reverse *topological* order.

# %%
class HandTensor:
    def __init__(self, data, creator=None):
        self.data, self.grad, self.creator = np.asarray(data, dtype=np.float64), None, creator

    def backward(self):
        order, seen = [], set()
        def visit(t):                                    # depth-first: a tensor after everything it depends on
            if id(t) not in seen and t.creator is not None:
                seen.add(id(t))
                for parent in t.creator.inputs:
                    visit(parent)
                order.append(t)
        visit(self)
        self.grad = np.ones_like(self.data)
        for t in reversed(order):                        # from the loss back towards the inputs
            for parent, g in zip(t.creator.inputs, t.creator.backward(t.grad)):
                parent.grad = g if parent.grad is None else parent.grad + g


class HandFunction:
    def __call__(self, *inputs):
        self.inputs = inputs
        return HandTensor(self.forward(*[x.data for x in inputs]), creator=self)


class HandMul(HandFunction):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):                              # d(ab)/da = b, d(ab)/db = a, times the upstream gradient
        return gy * self.b, gy * self.a


class HandSum(HandFunction):
    def forward(self, a):
        self.shape = a.shape
        return a.sum()

    def backward(self, gy):                              # every element contributed once: broadcast gy back
        return (np.full(self.shape, gy),)


# %% [markdown]
# Try it on $L = \sum_i x_i \, y_i \, x_i = \sum_i x_i^2 y_i$. The tensor `x` is used twice, so its gradient is
# the sum of two contributions, and the answer we expect is $\partial L / \partial x = 2 x y$,
# $\partial L / \partial y = x^2$.

# %%
x_values = np.array([1.0, -2.0, 3.0])
y_values = np.array([0.5, 4.0, -1.0])
x, y = HandTensor(x_values), HandTensor(y_values)
loss = HandSum()(HandMul()(HandMul()(x, y), x))
loss.backward()
print("L          =", loss.data)
print("dL/dx hand =", x.grad, "  expected 2xy =", 2 * x_values * y_values)
print("dL/dy hand =", y.grad, "  expected x^2 =", x_values ** 2)
assert np.allclose(x.grad, 2 * x_values * y_values) and np.allclose(y.grad, x_values ** 2)

# %% [markdown]
# ## minidet's engine
#
# minidet's `Tensor` and `Function` (in `minidet/autograd.py`) are the same two ideas with what a real engine
# needs besides: the walk is iterative (a recursive one overflows Python's stack on a deep network), the graph is
# freed as the walk goes, gradients flow only where `requires_grad=True`, and every op (in `minidet.functional`)
# is a `Function` subclass with a lowercase wrapper, `F.mul`, `F.sum`, ... The operators `*` and `.sum()` call them.

# %%
xm = md.tensor(x_values, requires_grad=True)
ym = md.tensor(y_values, requires_grad=True)
loss_md = (xm * ym * xm).sum()
loss_md.backward()
print("L      =", loss_md.item())
print("dL/dx  =", xm.grad)
print("dL/dy  =", ym.grad)
assert_close(xm.grad, x.grad, rtol=1e-12, name="dL/dx")
assert_close(ym.grad, y.grad, rtol=1e-12, name="dL/dy")
print("the hand-made engine and minidet agree")

# %% [markdown]
# ## Checking a gradient: central differences
#
# How do we know a `backward` is right? Nudge one input element by $\pm\varepsilon$ and watch the loss:
#
# $$\frac{\partial L}{\partial x_j} \approx \frac{L(x + \varepsilon e_j) - L(x - \varepsilon e_j)}{2\varepsilon}.$$
#
# The error of this *central* difference shrinks like $\varepsilon^2$, so in float64 with $\varepsilon = 10^{-6}$
# it agrees with the true derivative to about eight digits. Too small an $\varepsilon$ and rounding takes over:
# the figure below shows both effects for $\frac{d}{dx}\sin x$ at $x = 1$.

# %%
epsilons = np.logspace(-12, -1, 45)
central = np.abs((np.sin(1 + epsilons) - np.sin(1 - epsilons)) / (2 * epsilons) - np.cos(1))
forward = np.abs((np.sin(1 + epsilons) - np.sin(1)) / epsilons - np.cos(1))
fig, ax = plt.subplots(figsize=(6, 4))
ax.loglog(epsilons, forward, label=r"forward difference $(f(x+\varepsilon) - f(x)) / \varepsilon$")
ax.loglog(epsilons, central, label=r"central difference $(f(x+\varepsilon) - f(x-\varepsilon)) / 2\varepsilon$")
ax.axvline(1e-6, color="grey", ls=":", label=r"$\varepsilon = 10^{-6}$ (gradcheck's default)")
ax.set_xlabel(r"step $\varepsilon$")
ax.set_ylabel("absolute error of the derivative")
ax.set_title(r"Finite differences of $\sin$ at $x = 1$ (float64)")
ax.legend(fontsize=8)
save(fig, "01_finite_differences.png")

# %% [markdown]
# `minidet.testing.gradcheck` does this for every element of every input (in float64; in an input of more than
# 2000 elements, for 2000 drawn at random: `max_elements`), and multiplies the output
# by a random upstream gradient first, so a `backward` that forgets to multiply by its incoming gradient fails.
# It raises an error naming the input, the index and both values; here it returns `True`.

# %%
rng = np.random.default_rng(0)
a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
print("gradcheck x * y * x :", gradcheck(lambda p, q: p * q * p, [a, b], name="x*y*x"))
print("gradcheck sigmoid   :", gradcheck(F.sigmoid, [a]))

# %% [markdown]
# The same check on our hand-made `HandMul`: wrap it so it takes minidet tensors, by computing the numeric
# derivative ourselves.

# %%
def hand_loss(xv):
    return HandSum()(HandMul()(HandMul()(HandTensor(xv), HandTensor(y_values)), HandTensor(xv))).data


eps = 1e-6
numeric = np.array([(hand_loss(x_values + eps * e) - hand_loss(x_values - eps * e)) / (2 * eps)
                    for e in np.eye(3)])
print("dL/dx numeric =", numeric.round(8))
np.testing.assert_allclose(numeric, x.grad, rtol=1e-8)
print("hand backward matches central differences")

# %% [markdown]
# ## Exercises
#
# 1. **A new op.** Write `class Cube(minidet.autograd.Function)` whose `forward(self, x)` keeps `x` and returns
#    `x ** 3`, and whose `backward(self, g)` returns `3 * x ** 2 * g`. Check it:
#    `gradcheck(lambda t: Cube()(t), [np.random.randn(5)])` returns True. Now make the backward return
#    `2 * x ** 2 * g`: gradcheck raises `GradcheckError`, naming the input, the element and both values
#    (with `np.random.default_rng(0).standard_normal(5)`: index (0,), numeric 0.00596, analytic 0.00398).
# 2. **Forward against central differences.** For sin at x = 1 with step 1e-3, compute both differences and their
#    errors against cos(1). Answer: about 4.2e-4 for the forward difference, 9.0e-8 for the central one: the
#    error of the first shrinks like the step, of the second like its square (the figure's two slopes).
# 3. **Forgetting the upstream gradient.** Make `Cube.backward` return `3 * x ** 2` (without `g`). Why does
#    gradcheck still catch it? Answer: it multiplies the output by a random upstream gradient before summing, so
#    `g` is not 1.
