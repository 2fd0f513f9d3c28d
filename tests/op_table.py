"""The table of minidet's differentiable ops: every public op of ``minidet.functional``, with its cases.

It drives the op tests:

- ``test_gradcheck.py`` checks every case against central finite differences, in float64 (on NumPy, and on CuPy
  where a GPU is usable);
- ``test_reference_torch.py`` checks every case against PyTorch, in float32: the values and every input's gradient
  for one random upstream gradient;
- ``test_op_table.py`` fails when an op of ``minidet.functional.__all__`` has no row here (or no reason in
  ``EXEMPT``), and when a ``Function`` of ``minidet.functional`` is run by no case.

A case is one setting of one op: the minidet call, the same computation in PyTorch, and the inputs' domain, a
function of a NumPy generator that gives the differentiable inputs (float64) and the constants (targets, index
arrays, running statistics). Domains keep the inputs where the op is differentiable and finite differences can
see it: away from a kink by more than the step (ReLU, clamp, smooth L1), positive for log, distinct values for a
max. What a table cannot say well stays in its own test beside these: ties, logits of +-100, exact zeros,
settings given as NumPy scalars, operators and methods, running statistics, non-contiguous arrays.

Adding an op to ``minidet.functional``: add its rows here, and the three files test it.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import minidet.functional as F

ELEMENTWISE = 1e-5   # relative error allowed against torch for element-wise and shape ops (float32)
HEAVY = 1e-4         # for ops that sum many products: conv2d, matmul, the norms


@dataclass(frozen=True)
class Case:
    op: str                # the op's name in minidet.functional
    label: str             # what sets this case apart from the op's others
    minidet: Callable      # (*inputs, *constants) -> Tensor
    torch: Callable        # (torch, *inputs, *constants) -> torch.Tensor: the same computation in PyTorch
    inputs: Callable       # rng -> (list of differentiable float64 arrays, list of constants)
    rtol: float = ELEMENTWISE

    @property
    def id(self):
        return f"{self.op}[{self.label}]"


# --- domains: rng -> arrays ------------------------------------------------------------------------------------------

def normal(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def positive(rng, *shape, low=0.05, high=5.0):
    return rng.uniform(low, high, shape)


def away_from_zero(rng, *shape):
    """|x| in [0.5, 2], either sign: a divisor, or a base for negative and fractional powers' tests."""
    return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


def away_from(points, x, gap=0.01):
    """``x`` with every element within ``gap`` of one of ``points`` (kinks) moved ``2 * gap`` up."""
    for point in points:
        x = x + 2 * gap * (np.abs(x - point) < gap)
    return x


def distinct(rng, *shape):
    """Values at least 0.1 apart, in random order: a max has no ties, and the finite-difference step cannot swap
    two of them."""
    return rng.permutation(int(np.prod(shape))).reshape(shape) / 10.0 - 1.0


def differentiable(*makers):
    """A domain of differentiable inputs only, each made by ``maker(rng)``."""
    return lambda rng: ([make(rng) for make in makers], [])


# --- the written-out torch side where torch has no function of the same meaning -----------------------------------

def torchvision_sigmoid_focal_loss(torch, inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision's ``sigmoid_focal_loss``, written out in torch ops (its compiled part does not load everywhere)."""
    p = torch.sigmoid(inputs)
    ce_loss = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def focal_loss_with_labels_in_torch(torch, logits, labels, weights, alpha, gamma):
    """The focal loss from one label per anchor as torchvision's dense loss of the one-hot targets, weighted per
    anchor, without the ignored anchors (label -2), summed."""
    classes = torch.arange(logits.shape[1])
    targets = (labels[:, None] == classes[None, :]).to(logits.dtype)
    loss = torchvision_sigmoid_focal_loss(torch, logits, targets, alpha, gamma) * weights[:, None]
    return (loss * (labels != -2)[:, None]).sum()


def amax_dims(dim):
    return () if dim is None else dim   # torch.amax reduces every dimension over dim=(), minidet's max over None


# --- the table -------------------------------------------------------------------------------------------------------

def _arithmetic():
    shapes = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1, 4), (2, 3, 1)), ((), (2, 3))]
    for name, (a, b) in itertools.product(["add", "sub", "mul", "div"], shapes):
        yield Case(name, f"{a} and {b}", getattr(F, name), lambda torch, x, y, name=name: getattr(torch, name)(x, y),
                   differentiable(lambda rng, a=a: normal(rng, *a), lambda rng, b=b: away_from_zero(rng, *b)))
    yield Case("neg", "(2, 3)", F.neg, lambda torch, x: torch.neg(x), differentiable(lambda rng: normal(rng, 2, 3)))
    for exponent in [2, 3, 0.5, -1, 1.5, -2.5]:
        if isinstance(exponent, int):   # integer powers also see negative bases
            domain = differentiable(lambda rng: away_from_zero(rng, 3, 4))
        else:
            domain = differentiable(lambda rng: positive(rng, 3, 4, low=0.3, high=2.0))
        yield Case("pow", f"x ** {exponent}", lambda x, e=exponent: F.pow(x, e),
                   lambda torch, x, e=exponent: torch.pow(x, e), domain)
    for a, b in [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (2, 4, 5)),
                 ((2, 3, 4), (4, 1))]:
        yield Case("matmul", f"{a} @ {b}", F.matmul, lambda torch, x, y: torch.matmul(x, y),
                   differentiable(lambda rng, a=a: normal(rng, *a), lambda rng, b=b: normal(rng, *b)), HEAVY)


def _reductions():
    for name, dim, keepdim in itertools.product(["sum", "mean", "max"], [None, 0, 1, -1, (0, 2)], [False, True]):
        if name == "max":
            on_torch = lambda torch, x, dim=dim, keepdim=keepdim: torch.amax(x, dim=amax_dims(dim), keepdim=keepdim)
        else:
            on_torch = lambda torch, x, name=name, dim=dim, keepdim=keepdim: getattr(torch, name)(x, dim=dim,
                                                                                                   keepdim=keepdim)
        yield Case(name, f"dim={dim}, keepdim={keepdim}",
                   lambda x, name=name, dim=dim, keepdim=keepdim: getattr(F, name)(x, dim=dim, keepdim=keepdim),
                   on_torch, differentiable(lambda rng: distinct(rng, 2, 3, 5)))


INDICES = {   # label: index; numpy arrays in it are constants (given to each side as its own array type)
    "slices": (slice(1, None), slice(None, None, 2)),
    "int and ellipsis": (Ellipsis, 1),
    "negative int": -1,
    "new axis": (slice(None), None, slice(1, 3)),
    "repeated rows": np.array([0, 2, 0, 0]),
    "repeated columns": (slice(None), np.array([3, 3, 0, 1, 3])),
    "repeated pairs": (np.array([0, 1, 0, 0]), np.array([2, 1, 2, 2])),
    "2-d index array": np.array([[1, 1], [0, 2]]),
}


def _shape_ops():
    x = differentiable(lambda rng: normal(rng, 2, 3, 4))
    for shape in [(4, -1), (24,), (2, 12), (3, 2, 2, 2), (1, 24, 1)]:
        yield Case("reshape", str(shape), lambda t, s=shape: F.reshape(t, s),
                   lambda torch, t, s=shape: torch.reshape(t, s), x)
    for dims in [(0, 1, 2), (2, 0, 1), (1, 2, 0), (-1, 0, 1)]:
        yield Case("permute", str(dims), lambda t, d=dims: F.permute(t, d), lambda torch, t, d=dims: t.permute(*d), x)
    for dims in [(0, 2), (1, 2), (-1, -2), (0, 0)]:
        yield Case("transpose", str(dims), lambda t, d=dims: F.transpose(t, *d),
                   lambda torch, t, d=dims: torch.transpose(t, *d), x)
    for label, index in INDICES.items():
        yield Case("getitem", label, lambda t, i: F.getitem(t, i), lambda torch, t, i: t[i],
                   lambda rng, index=index: ([normal(rng, 3, 4, 2)], [index]))
    yield Case("getitem", "boolean mask", lambda t, mask: F.getitem(t, mask), lambda torch, t, mask: t[mask],
               lambda rng: ([normal(rng, 3, 4, 2)], [normal(rng, 3, 4) > 0]))
    for name, dim in [("cat", 0), ("cat", 1), ("cat", -1), ("concat", 1)]:
        def pieces(rng, dim=dim):
            shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
            for shape, size in zip(shapes, (1, 3, 2)):
                shape[dim] = size
            return [normal(rng, *shape) for shape in shapes], []
        yield Case(name, f"dim={dim}", lambda *ts, name=name, dim=dim: getattr(F, name)(list(ts), dim),
                   lambda torch, *ts, name=name, dim=dim: getattr(torch, name)(ts, dim), pieces)
    yield Case("cat", "the same input twice", lambda a, b: F.cat([a, b, a], 1),
               lambda torch, a, b: torch.cat([a, b, a], 1),
               differentiable(lambda rng: normal(rng, 2, 3), lambda rng: normal(rng, 2, 1)))   # its gradients add
    for dim in [0, 1, 2, -1]:
        yield Case("stack", f"dim={dim}", lambda *ts, dim=dim: F.stack(list(ts), dim),
                   lambda torch, *ts, dim=dim: torch.stack(ts, dim),
                   lambda rng: ([normal(rng, 3, 4) for _ in range(3)], []))
    for pad, value in [((1, 2), 0.0), ((1, 0, 2, 1), 0.0), ((0, 1, 1, 1, 2, 0), -1.5), ((2, 2, 0, 0), 3.0)]:
        yield Case("pad", f"{pad}, value={value}", lambda t, p=pad, v=value: F.pad(t, p, v),
                   lambda torch, t, p=pad, v=value: torch.nn.functional.pad(t, p, mode="constant", value=v),
                   differentiable(lambda rng: normal(rng, 2, 3, 5)))


def _elementwise():
    yield Case("exp", "(3, 5)", F.exp, lambda torch, x: torch.exp(x),
               differentiable(lambda rng: normal(rng, 3, 5, scale=2)))
    yield Case("log", "(3, 5)", F.log, lambda torch, x: torch.log(x), differentiable(lambda rng: positive(rng, 3, 5)))
    yield Case("relu", "(4, 5)", F.relu, lambda torch, x: torch.relu(x),
               differentiable(lambda rng: away_from([0.0], normal(rng, 4, 5))))
    functional = {"sigmoid": "sigmoid", "silu": "silu", "softplus": "softplus", "logsigmoid": "logsigmoid"}
    for name, torch_name in functional.items():
        yield Case(name, "(4, 5)", getattr(F, name),
                   lambda torch, x, n=torch_name: getattr(torch.nn.functional, n)(x),
                   differentiable(lambda rng: normal(rng, 4, 5, scale=4)))
    for low, high in [(-0.5, 0.5), (None, 0.25), (-0.25, None), (0.0, None)]:
        kinks = [b for b in (low, high) if b is not None]
        yield Case("clamp", f"min={low}, max={high}", lambda x, lo=low, hi=high: F.clamp(x, lo, hi),
                   lambda torch, x, lo=low, hi=high: torch.clamp(x, lo, hi),
                   differentiable(lambda rng, k=kinks: away_from(k, normal(rng, 4, 5))))


def _convolution():
    def conv_case(label, x_shape, w_shape, bias, rtol=HEAVY, **settings):
        def domain(rng):
            arrays = [normal(rng, *x_shape), normal(rng, *w_shape, scale=0.5)]
            return arrays + ([normal(rng, w_shape[0])] if bias else []), []
        return Case("conv2d", label, lambda *ts: F.conv2d(*ts, **settings),
                    lambda torch, *ts: torch.nn.functional.conv2d(*ts, **settings), domain, rtol)

    for stride, padding, kernel, groups, batch, bias in itertools.product([1, 2], [0, 1], [1, 3], [1, 4], [1, 3],
                                                                          [True, False]):
        yield conv_case(f"stride {stride}, padding {padding}, {kernel}x{kernel}, groups {groups}, batch {batch}"
                        + (", bias" if bias else ""), (batch, 4, 7, 5), (8, 4 // groups, kernel, kernel), bias,
                        stride=stride, padding=padding, groups=groups)
    for stride, kernel in [(1, 3), (2, 3), (1, 5), (2, 5)]:   # groups = C = O: the depthwise path
        yield conv_case(f"depthwise {kernel}x{kernel}, stride {stride}", (3, 6, 9, 8), (6, 1, kernel, kernel), True,
                        stride=stride, padding=kernel // 2, groups=6)
    for kernel, stride, padding, groups in [((3, 1), (2, 1), (1, 0), 2), ((1, 3), (1, 2), (0, 1), 1),
                                            ((3, 3), 3, 1, 2),     # stride past the overlap: pixels without gradient
                                            ((5, 5), 1, 2, 1), ((3, 2), 1, (2, 1), 1)]:
        yield conv_case(f"kernel {kernel}, stride {stride}, padding {padding}, groups {groups}", (2, 4, 9, 6),
                        (6, 4 // groups, *kernel), True, stride=stride, padding=padding, groups=groups)
    yield conv_case("kernel (3, 1), stride (2, 1), padding (1, 0), no bias", (2, 2, 6, 5), (3, 2, 3, 1), False,
                    stride=(2, 1), padding=(1, 0))
    # Stride 1 with a padding as wide as the kernel: the input's gradient by col2im, not by the flipped kernel.
    yield conv_case("kernel (3, 1), stride 1, padding (1, 1)", (2, 4, 7, 5), (6, 4, 3, 1), True, padding=(1, 1))
    for kernel, stride, padding in [(2, None, 0), (2, 2, 1), (2, 1, 1), (3, None, 0), (3, 2, 1), (3, 1, 1), (3, 2, 0),
                                    (3, 1, 0)]:
        yield Case("max_pool2d", f"kernel {kernel}, stride {stride}, padding {padding}",
                   lambda t, k=kernel, s=stride, p=padding: F.max_pool2d(t, k, s, p),
                   lambda torch, t, k=kernel, s=stride, p=padding: torch.nn.functional.max_pool2d(t, k, s, p),
                   differentiable(lambda rng: distinct(rng, 2, 3, 7, 5)))
    for kwargs in [dict(scale_factor=2), dict(scale_factor=(2, 3)), dict(scale_factor=1), dict(size=(14, 10)),
                   dict(size=(21, 5)), dict(size=35)]:
        yield Case("interpolate", str(kwargs), lambda t, kw=kwargs: F.interpolate(t, mode="nearest", **kw),
                   lambda torch, t, kw=kwargs: torch.nn.functional.interpolate(t, mode="nearest", **kw),
                   differentiable(lambda rng: normal(rng, 2, 3, 7, 5)))


def _normalisation():
    for shape, affine in itertools.product([(4, 3, 5, 6), (1, 3, 7, 5), (6, 3), (2, 3, 5)], [True, False]):
        c = shape[1]
        yield Case("batch_norm", f"training, {shape}" + (", affine" if affine else ""),
                   lambda x, *wb: F.batch_norm(x, None, None, *wb, training=True, eps=1e-3),
                   lambda torch, x, *wb: torch.nn.functional.batch_norm(x, None, None, *wb, training=True, eps=1e-3),
                   differentiable(lambda rng, s=shape: normal(rng, *s, scale=2) + 0.5,
                                  *([lambda rng, c=c: normal(rng, c)] * (2 if affine else 0))), HEAVY)
    for shape in [(4, 3, 5, 6), (6, 3)]:
        yield Case("batch_norm", f"eval, {shape}",
                   lambda x, w, b, mean, var: F.batch_norm(x, mean, var, w, b, training=False),
                   lambda torch, x, w, b, mean, var: torch.nn.functional.batch_norm(x, mean, var, w, b,
                                                                                    training=False),
                   lambda rng, s=shape: ([normal(rng, *s), normal(rng, 3), normal(rng, 3)],
                                         [normal(rng, 3), positive(rng, 3, low=0.5, high=2.0)]), HEAVY)
    for groups, affine, shape in itertools.product([1, 2, 6], [True, False], [(2, 6, 5, 3), (3, 6, 4)]):
        yield Case("group_norm", f"{groups} groups, {shape}" + (", affine" if affine else ""),
                   lambda x, *wb, g=groups: F.group_norm(x, g, *wb),
                   lambda torch, x, *wb, g=groups: torch.nn.functional.group_norm(x, g, *wb),
                   differentiable(lambda rng, s=shape: normal(rng, *s, scale=3) - 1,
                                  *([lambda rng: normal(rng, 6)] * (2 if affine else 0))), HEAVY)


def _losses():
    for reduction, weighted in itertools.product(["none", "mean", "sum"], [False, True]):
        def domain(rng, weighted=weighted):      # the logits and the targets differentiable, the weight constant
            weight = [rng.uniform(0.1, 2.0, 4)] if weighted else []
            return [normal(rng, 6, 4, scale=3), rng.uniform(0, 1, (6, 4))], weight
        yield Case("binary_cross_entropy_with_logits", reduction + (", weighted" if weighted else ""),
                   lambda x, t, *w, r=reduction: F.binary_cross_entropy_with_logits(x, t, *w, reduction=r),
                   lambda torch, x, t, *w, r=reduction: torch.nn.functional.binary_cross_entropy_with_logits(
                       x, t, *w, reduction=r), domain)
    for beta, reduction in itertools.product([0.11, 1.0, 0.0], ["none", "mean", "sum"]):
        def domain(rng, beta=beta):
            x = normal(rng, 5, 4)
            gap = away_from([beta, -beta], rng.uniform(-3, 3, (5, 4)) * (beta or 1.0))   # some in the quadratic part
            return [x, x - away_from([0.0], gap)], []
        yield Case("smooth_l1_loss", f"beta={beta}, {reduction}",
                   lambda x, t, b=beta, r=reduction: F.smooth_l1_loss(x, t, reduction=r, beta=b),
                   lambda torch, x, t, b=beta, r=reduction: torch.nn.functional.smooth_l1_loss(x, t, reduction=r,
                                                                                               beta=b), domain)
    for (alpha, gamma), reduction, soft in itertools.product(
            [(0.25, 2.0), (-1, 2.0), (0.25, 0.0), (-1, 0.0), (0.5, 1.0), (0.9, 1.5), (0.25, 5.0), (0.0, 2.0),
             (1.0, 2.0)], ["none", "mean", "sum"], [False, True]):
        def domain(rng, soft=soft):
            targets = rng.uniform(0, 1, (8, 3)) if soft else (rng.uniform(0, 1, (8, 3)) < 0.3).astype(float)
            return [normal(rng, 8, 3, scale=3)], [targets]
        yield Case("sigmoid_focal_loss", f"alpha={alpha}, gamma={gamma}, {reduction}" + (", soft" if soft else ""),
                   lambda x, t, a=alpha, g=gamma, r=reduction: F.sigmoid_focal_loss(x, t, a, g, r),
                   lambda torch, x, t, a=alpha, g=gamma, r=reduction: torchvision_sigmoid_focal_loss(torch, x, t, a,
                                                                                                     g, r), domain)
    for alpha, gamma in [(0.25, 2.0), (-1, 0.0), (0.25, 1.5)]:
        def domain(rng):
            labels = rng.integers(-2, 4, 12)             # 0..3 a class, -1 background, -2 ignored
            return [normal(rng, 12, 4, scale=3)], [labels, rng.uniform(0.1, 2.0, 12)]
        yield Case("sigmoid_focal_loss_with_labels", f"alpha={alpha}, gamma={gamma}",
                   lambda x, labels, w, a=alpha, g=gamma: F.sigmoid_focal_loss_with_labels(x, labels, w, a, g),
                   lambda torch, x, labels, w, a=alpha, g=gamma: focal_loss_with_labels_in_torch(torch, x, labels, w,
                                                                                                 a, g), domain)


CASES = [*_arithmetic(), *_reductions(), *_shape_ops(), *_elementwise(), *_convolution(), *_normalisation(),
         *_losses()]

# Public ops of minidet.functional without a row, and why. Keep this empty unless an op cannot be tested so.
EXEMPT = {}


def constants_as(constants, array):
    """The constants with every NumPy array in them (also inside index tuples) converted by ``array``."""
    def convert(value):
        if isinstance(value, tuple):
            return tuple(convert(v) for v in value)
        return array(value) if isinstance(value, np.ndarray) else value
    return [convert(c) for c in constants]
