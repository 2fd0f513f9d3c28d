"""Property tests: the shape ops, broadcasting arithmetic and reductions on shapes drawn by hypothesis.

Each property is checked against NumPy, never against minidet itself:

- forward: the op's values equal NumPy's equivalent, element for element;
- backward: for a random upstream gradient ``g``, each input's gradient equals the adjoint of the op computed
  in NumPy by a different route (the inverse permutation for ``permute``, element ids counted back with
  ``np.bincount`` for indexing and broadcasting, slices of ``g`` for ``pad`` and ``cat``, ...);
- round trips: an op followed by its inverse gives back the values, and the gradient ``g`` unchanged;
- ``gradcheck`` in float64 on small shapes, for a few of the ops.

Values are multiples of 1/4 stored as float32 (``dyadic``) and divisors are powers of two: sums, products and
quotients of a few hundred of them are exact in any order, so comparisons can be exact even where minidet and
the reference add things up differently. Only mean and max's gradient, which divide by a count, allow rounding.

Shapes have 1 to 4 dimensions of sizes 1 to 5 (MiniTorch's strategy). A failure prints the drawn example;
``seed`` there makes the values reproducible: ``np.random.default_rng(seed)``.
"""

from math import prod

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minidet.functional as F
from minidet import backend
from minidet.autograd import Tensor
from minidet.testing import gradcheck

# `xp` is a function-scoped fixture: it is the same for every example hypothesis draws, which is what we want.
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GRADCHECK = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- strategies -------------------------------------------------------------------------------------------

def shapes(min_dims=1, max_dims=4, max_side=5):
    """Small shapes: 1 to 4 dimensions (by default) of sizes 1 to 5."""
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


seeds = st.integers(0, 2**32 - 1)


def maybe_negative(draw, dim, ndim):
    """``dim`` or the same dimension counted from the end (``dim - ndim``)."""
    return dim - ndim if draw(st.booleans()) else dim


@st.composite
def shape_and_permutation(draw, max_side=5):
    shape = draw(shapes(max_side=max_side))
    perm = draw(st.permutations(range(len(shape))))
    return shape, tuple(maybe_negative(draw, d, len(shape)) for d in perm)


@st.composite
def shape_and_two_dims(draw):
    shape = draw(shapes())
    dim = st.integers(-len(shape), len(shape) - 1)
    return shape, draw(dim), draw(dim)


@st.composite
def shape_and_reshape_target(draw):
    """A shape and another shape with the same number of elements, maybe with ones and one -1."""
    shape = draw(shapes())
    rest, target = prod(shape), []
    while rest > 1:  # split the size into a random factorisation
        factor = draw(st.sampled_from([d for d in range(2, rest + 1) if rest % d == 0]))
        target.append(factor)
        rest //= factor
    for _ in range(draw(st.integers(0 if target else 1, 2))):
        target.insert(draw(st.integers(0, len(target))), 1)
    target = list(draw(st.permutations(target)))
    if draw(st.booleans()):
        target[draw(st.integers(0, len(target) - 1))] = -1
    return shape, tuple(target)


@st.composite
def basic_index(draw, shape):
    """Ints and slices (any start, stop, step, so possibly empty) for some leading dimensions and, after an
    Ellipsis, some trailing ones; maybe a None (new axis) anywhere. No element can be picked twice."""
    def part(n):
        if draw(st.booleans()):
            return draw(st.integers(-n, n - 1))
        bound = st.none() | st.integers(-n - 1, n + 1)
        return slice(draw(bound), draw(bound), draw(st.sampled_from([None, 1, 2, 3, -1, -2])))

    ndim = len(shape)
    front = draw(st.integers(0, ndim))
    parts = [part(n) for n in shape[:front]]
    if draw(st.booleans()):
        back = draw(st.integers(0, ndim - front))
        parts += [Ellipsis] + [part(n) for n in shape[ndim - back:]]
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), None)
    if len(parts) == 1 and draw(st.booleans()):
        return parts[0]  # x[2] or x[1:], not x[(2,)]
    return tuple(parts)


def int_arrays(n, shape):
    """Integer index arrays into a dimension of size n, negative indices and repeats included."""
    return hnp.arrays(np.int64, shape, elements=st.integers(-n, n - 1))


@st.composite
def integer_array_index(draw, shape):
    """Integer-array (advanced) indices, in the forms detection code uses; indices may repeat."""
    forms = ["one array", "a list", "arrays for several dimensions"] + (["slice, array"] if len(shape) > 1 else [])
    form = draw(st.sampled_from(forms))
    index_shape = draw(shapes(max_dims=2, max_side=6))
    if form == "one array":                       # x[idx], idx of any shape (e.g. anchors picked per image)
        return draw(int_arrays(shape[0], index_shape))
    if form == "a list":                          # x[[0, 0, 2]]
        return draw(st.lists(st.integers(-shape[0], shape[0] - 1), min_size=1, max_size=6))
    if form == "arrays for several dimensions":   # x[rows, cols], the arrays broadcast together
        k = draw(st.integers(1, len(shape)))
        return tuple(draw(int_arrays(n, index_shape)) for n in shape[:k])
    return (slice(None), draw(int_arrays(shape[1], index_shape)))  # x[:, idx]


@st.composite
def boolean_mask_index(draw, shape):
    """Boolean masks: over the whole tensor, over its leading dimensions, or along one dimension."""
    form = draw(st.sampled_from(["whole", "leading", "one dimension"]))
    if form == "whole":
        return draw(hnp.arrays(np.bool_, shape))
    if form == "leading":
        return draw(hnp.arrays(np.bool_, shape[:draw(st.integers(1, len(shape)))]))
    axis = draw(st.integers(0, len(shape) - 1))
    return (slice(None),) * axis + (draw(hnp.arrays(np.bool_, shape[axis])),)


@st.composite
def shapes_to_cat(draw):
    """Shapes that agree except along ``dim`` (counted from the front or the back), and that dim."""
    base = draw(shapes())
    dim = draw(st.integers(0, len(base) - 1))
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    shape_list = [base[:dim] + (n,) + base[dim + 1:] for n in sizes]
    return shape_list, maybe_negative(draw, dim, len(base))


@st.composite
def shape_count_and_stack_dim(draw):
    shape = draw(shapes(max_dims=3))
    return shape, draw(st.integers(1, 4)), draw(st.integers(-len(shape) - 1, len(shape)))


@st.composite
def shape_and_padding(draw, max_side=5):
    """A shape and PyTorch-order padding: (before, after) pairs from the last dimension back."""
    shape = draw(shapes(max_side=max_side))
    pairs = draw(st.integers(1, len(shape)))
    return shape, tuple(draw(st.integers(0, 3)) for _ in range(2 * pairs))


@st.composite
def broadcastable_shapes(draw, max_side=5):
    """Two shapes that broadcast together: each keeps some trailing dimensions of a common shape (maybe
    none: a 0-d tensor) and turns some of them into 1."""
    common = draw(shapes(max_side=max_side))

    def operand():
        tail = common[len(common) - draw(st.integers(0, len(common))):]
        return tuple(1 if draw(st.booleans()) else n for n in tail)

    return operand(), operand()


@st.composite
def shape_and_reduction_dims(draw, max_dims=4, max_side=5):
    """A shape, the ``dim`` argument of a reduction (None, an int, or a tuple in any order, negative
    dims included) and ``keepdim``."""
    shape = draw(shapes(max_dims=max_dims, max_side=max_side))
    ndim = len(shape)
    form = draw(st.sampled_from(["all", "one", "several"]))
    if form == "all":
        dim = None
    elif form == "one":
        dim = draw(st.integers(-ndim, ndim - 1))
    else:
        axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        dim = tuple(maybe_negative(draw, a, ndim) for a in axes)
    return shape, dim, draw(st.booleans())


# --- values, tensors and comparisons ----------------------------------------------------------------------

def dyadic(seed, shape, low=-12, high=12):
    """float32 values k/4 (low <= k <= high): sums and products of these are exact in float32."""
    return (np.random.default_rng(seed).integers(low, high + 1, size=shape) / 4).astype(np.float32)


def leaf(xp, array):
    """A leaf tensor that requires grad, holding a copy of the NumPy ``array`` on ``xp``'s device."""
    return Tensor(xp.array(array), requires_grad=True)


def on(xp, index):
    """``index`` with its NumPy arrays moved to ``xp`` (CuPy indexes with CuPy arrays)."""
    if isinstance(index, tuple):
        return tuple(on(xp, part) for part in index)
    return xp.asarray(index) if isinstance(index, np.ndarray) else index


def host(x):
    """The values of a Tensor or raw array, as a NumPy array."""
    return backend.to_numpy(x.data if isinstance(x, Tensor) else x)


def _first_difference(actual, expected, close):
    where = np.argwhere(~close)
    at = tuple(int(i) for i in where[0])
    return (f"{len(where)} of {expected.size} elements differ, the first at index {at}: "
            f"got {actual[at].item()!r}, expected {expected[at].item()!r}")


def assert_equal(actual, expected, what):
    """Same shape, same dtype and exactly the same values; the message says where they first differ."""
    actual, expected = host(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    if not np.array_equal(actual, expected):
        raise AssertionError(f"{what}: {_first_difference(actual, expected, actual == expected)}")


def assert_near(actual, expected, what, rtol=1e-6, atol=1e-6):
    """Like ``assert_equal`` but values may differ by rounding (``np.isclose``)."""
    actual, expected = host(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    close = np.isclose(actual, expected, rtol=rtol, atol=atol)
    if not close.all():
        raise AssertionError(f"{what}: {_first_difference(actual, expected, close)}")


def backward(xp, y, g):
    """Run backward from ``y`` with the upstream gradient ``g`` (a NumPy array)."""
    y.backward(xp.asarray(g))


def scatter_by_ids(ids, g, size):
    """Element ``i`` of the result is the sum of ``g`` over the positions where ``ids`` is ``i``.

    This is the adjoint of any op that copies elements around: label every input element with its flat
    position (``np.arange``), run the op on the labels to learn where each output element came from, then
    send every output gradient back to its source. Computed with ``np.bincount``, which minidet never uses.
    """
    ids = np.broadcast_to(ids, g.shape)
    return np.bincount(ids.ravel(), weights=g.ravel().astype(np.float64), minlength=size).astype(g.dtype)


def element_ids(shape):
    return np.arange(prod(shape)).reshape(shape)


# --- permute and transpose ---------------------------------------------------------------------------------

@PROPERTY
@given(case=shape_and_permutation(), seed=seeds)
def test_permute_forward_matches_numpy_and_backward_applies_the_inverse_permutation(xp, case, seed):
    shape, dims = case
    x_np = dyadic(seed, shape)
    x = leaf(xp, x_np)
    y = F.permute(x, dims)
    assert_equal(y, np.transpose(x_np, dims), f"permute{dims} forward, input shape {shape}")

    g = dyadic(seed + 1, y.shape)
    backward(xp, y, g)
    inverse = np.argsort([d % len(shape) for d in dims])
    assert_equal(x.grad, np.transpose(g, inverse), f"permute{dims} backward (g permuted by the inverse {inverse})")


@PROPERTY
@given(case=shape_and_permutation(), seed=seeds)
def test_permute_then_inverse_permute_is_the_identity_for_values_and_gradients(xp, case, seed):
    shape, dims = case
    x_np = dyadic(seed, shape)
    x = leaf(xp, x_np)
    inverse = tuple(int(i) for i in np.argsort([d % len(shape) for d in dims]))
    y = F.permute(F.permute(x, dims), inverse)
    assert_equal(y, x_np, f"permute{inverse}(permute{dims}(x)) should give x back")

    g = dyadic(seed + 1, shape)
    backward(xp, y, g)
    assert_equal(x.grad, g, f"gradient through permute{dims} and back should be the upstream gradient")


@PROPERTY
@given(case=shape_and_two_dims(), seed=seeds)
def test_transpose_forward_matches_numpy_swapaxes_and_backward_swaps_back(xp, case, seed):
    shape, dim0, dim1 = case
    x_np = dyadic(seed, shape)
    x = leaf(xp, x_np)
    y = F.transpose(x, dim0, dim1)
    assert_equal(y, np.swapaxes(x_np, dim0, dim1), f"transpose({dim0}, {dim1}) forward, input shape {shape}")

    g = dyadic(seed + 1, y.shape)
    backward(xp, y, g)
    assert_equal(x.grad, np.swapaxes(g, dim0, dim1), f"transpose({dim0}, {dim1}) backward")


# --- reshape -------------------------------------------------------------------------------------------

@PROPERTY
@given(case=shape_and_reshape_target(), seed=seeds)
def test_reshape_forward_matches_numpy_and_backward_reshapes_the_gradient_back(xp, case, seed):
    shape, target = case
    x_np = dyadic(seed, shape)
    x = leaf(xp, x_np)
    y = F.reshape(x, target)
    assert_equal(y, x_np.reshape(target), f"reshape {shape} -> {target} forward")

    g = dyadic(seed + 1, y.shape)
    backward(xp, y, g)
    assert_equal(x.grad, g.reshape(shape), f"reshape {shape} -> {target} backward")


@PROPERTY
@given(case=shape_and_reshape_target(), seed=seeds)
def test_reshape_there_and_back_is_the_identity_for_values_and_gradients(xp, case, seed):
    shape, target = case
    x_np = dyadic(seed, shape)
    x = leaf(xp, x_np)
    y = F.reshape(F.reshape(x, target), shape)
    assert_equal(y, x_np, f"reshape {shape} -> {target} -> {shape} should give x back")

    g = dyadic(seed + 1, shape)
    backward(xp, y, g)
    assert_equal(x.grad, g, f"gradient through reshape {shape} -> {target} and back should be the upstream gradient")


# --- indexing ------------------------------------------------------------------------------------------

def check_getitem(xp, shape, index, seed):
    """x[index] equals NumPy's; x.grad is g sent back to the elements it came from (added up for repeats)."""
    x_np = dyadic(seed, shape)
    x = leaf(xp, x_np)
    y = x[on(xp, index)]
    assert_equal(y, x_np[index], f"x[{index!r}] forward, x of shape {shape}")

    g = dyadic(seed + 1, y.shape)
    backward(xp, y, g)
    expected = scatter_by_ids(element_ids(shape)[index], g, prod(shape)).reshape(shape)
    assert_equal(x.grad, expected, f"x[{index!r}] backward, x of shape {shape}")


@PROPERTY
@given(data=st.data(), shape=shapes(), seed=seeds)
def test_getitem_with_ints_and_slices_matches_numpy_forward_and_backward(xp, data, shape, seed):
    check_getitem(xp, shape, data.draw(basic_index(shape), label="index"), seed)


@PROPERTY
@given(data=st.data(), shape=shapes(), seed=seeds)
def test_getitem_with_integer_arrays_adds_up_the_gradient_of_repeated_indices(xp, data, shape, seed):
    check_getitem(xp, shape, data.draw(integer_array_index(shape), label="index"), seed)


@PROPERTY
@given(data=st.data(), shape=shapes(), seed=seeds)
def test_getitem_with_boolean_masks_matches_numpy_forward_and_backward(xp, data, shape, seed):
    check_getitem(xp, shape, data.draw(boolean_mask_index(shape), label="index"), seed)


# --- cat and stack --------------------------------------------------------------------------------------

def along(dim, ndim, start, stop):
    """The index that slices ``start:stop`` along ``dim`` and takes everything else."""
    return (slice(None),) * (dim % ndim) + (slice(start, stop),)


@PROPERTY
@given(case=shapes_to_cat(), seed=seeds)
def test_cat_forward_matches_numpy_and_backward_slices_the_gradient(xp, case, seed):
    shape_list, dim = case
    arrays = [dyadic(seed + i, s) for i, s in enumerate(shape_list)]
    xs = [leaf(xp, a) for a in arrays]
    y = F.cat(xs, dim=dim)
    assert_equal(y, np.concatenate(arrays, axis=dim), f"cat of shapes {shape_list} along dim {dim}, forward")

    g = dyadic(seed + 99, y.shape)
    backward(xp, y, g)
    start = 0
    for i, (x, s) in enumerate(zip(xs, shape_list)):
        stop = start + s[dim]
        assert_equal(x.grad, g[along(dim, len(s), start, stop)],
                     f"cat of shapes {shape_list} along dim {dim}, gradient of input {i} "
                     f"(g[{start}:{stop}] on dim {dim})")
        start = stop


@PROPERTY
@given(case=shapes_to_cat(), seed=seeds)
def test_cat_then_split_by_getitem_gives_back_the_inputs_and_their_gradients(xp, case, seed):
    shape_list, dim = case
    arrays = [dyadic(seed + i, s) for i, s in enumerate(shape_list)]
    gs = [dyadic(seed + 99 + i, s) for i, s in enumerate(shape_list)]
    xs = [leaf(xp, a) for a in arrays]
    y = F.cat(xs, dim=dim)
    loss, start = 0, 0
    for i, (a, g) in enumerate(zip(arrays, gs)):
        stop = start + a.shape[dim]
        piece = y[along(dim, a.ndim, start, stop)]
        assert_equal(piece, a, f"cat of shapes {shape_list} along dim {dim}, piece {i} cut back out")
        loss = loss + F.sum(piece * xp.asarray(g))
        start = stop
    loss.backward()
    for i, (x, g) in enumerate(zip(xs, gs)):
        assert_equal(x.grad, g, f"cat of shapes {shape_list} along dim {dim} and split again, gradient of input {i}")


@PROPERTY
@given(case=shape_count_and_stack_dim(), seed=seeds)
def test_stack_forward_matches_numpy_and_backward_takes_each_slice_of_the_gradient(xp, case, seed):
    shape, count, dim = case
    arrays = [dyadic(seed + i, shape) for i in range(count)]
    xs = [leaf(xp, a) for a in arrays]
    y = F.stack(xs, dim=dim)
    assert_equal(y, np.stack(arrays, axis=dim), f"stack of {count} tensors of shape {shape} on dim {dim}, forward")

    g = dyadic(seed + 99, y.shape)
    backward(xp, y, g)
    for i, x in enumerate(xs):
        assert_equal(x.grad, np.take(g, i, axis=dim),
                     f"stack of {count} tensors of shape {shape} on dim {dim}, gradient of input {i}")


# --- pad -----------------------------------------------------------------------------------------------

@PROPERTY
@given(case=shape_and_padding(), value=st.sampled_from([0.0, -1.5, 2.25]), seed=seeds)
def test_pad_forward_matches_numpy_and_backward_cuts_the_padding_off_the_gradient(xp, case, value, seed):
    shape, padding = case
    x_np = dyadic(seed, shape)
    x = leaf(xp, x_np)
    y = F.pad(x, padding, value=value)
    # PyTorch order, (before, after) from the last dimension back; NumPy wants them from the first.
    pairs = [padding[i:i + 2] for i in range(0, len(padding), 2)]
    widths = [(0, 0)] * (len(shape) - len(pairs)) + pairs[::-1]
    assert_equal(y, np.pad(x_np, widths, constant_values=np.float32(value)),
                 f"pad{padding} value {value} forward, input shape {shape}")

    g = dyadic(seed + 1, y.shape)
    backward(xp, y, g)
    inside = tuple(slice(before, before + n) for (before, _), n in zip(widths, shape))
    assert_equal(x.grad, g[inside], f"pad{padding} backward, input shape {shape}: g without the border")


@pytest.mark.parametrize("shape", [(3,), (2, 3)])
def test_pad_with_no_pairs_is_the_identity(xp, shape):
    x_np = dyadic(0, shape)
    assert_equal(F.pad(leaf(xp, x_np), ()), x_np, f"pad(x, ()) with x of shape {shape}")


# --- broadcasting arithmetic ------------------------------------------------------------------------------

POWERS_OF_TWO = np.array([-4, -2, -1, -0.5, 0.5, 1, 2, 4], np.float32)


def local_derivatives(op, a, b):
    """d(a op b)/da and d(a op b)/db, element by element, in the broadcast shape."""
    a, b = np.broadcast_arrays(a, b)
    if op == "add":
        return np.ones_like(a), np.ones_like(b)
    if op == "sub":
        return np.ones_like(a), -np.ones_like(b)
    if op == "mul":
        return b, a
    return 1 / b, -a / (b * b)


@PROPERTY
@given(case=broadcastable_shapes(), op=st.sampled_from(["add", "sub", "mul", "div"]), seed=seeds)
def test_broadcasting_arithmetic_matches_numpy_and_sums_the_gradient_over_broadcast_dimensions(xp, case, op, seed):
    a_shape, b_shape = case
    a_np = dyadic(seed, a_shape)
    # A divisor that is a power of two keeps a / b and a / b**2 exact.
    b_np = (np.random.default_rng(seed + 1).choice(POWERS_OF_TWO, b_shape) if op == "div"
            else dyadic(seed + 1, b_shape))
    a, b = leaf(xp, a_np), leaf(xp, b_np)
    y = getattr(F, op)(a, b)
    what = f"{op} of shapes {a_shape} and {b_shape}"
    assert_equal(y, getattr(np, {"add": "add", "sub": "subtract", "mul": "multiply", "div": "divide"}[op])(a_np, b_np),
                 f"{what}, forward")

    g = dyadic(seed + 2, y.shape)
    backward(xp, y, g)
    da, db = local_derivatives(op, a_np, b_np)
    # An operand broadcast to the output shape copies each of its elements to several outputs: label its
    # elements, broadcast the labels, and add each output's gradient back to its label.
    for name, x, shape, d in (("a", a, a_shape, da), ("b", b, b_shape, db)):
        expected = scatter_by_ids(element_ids(shape), g * d, prod(shape)).reshape(shape)
        assert_equal(x.grad, expected, f"{what}, gradient of {name} (shape {shape})")


# --- reductions ----------------------------------------------------------------------------------------

def reduced_axes(dim, ndim):
    return set(range(ndim)) if dim is None else {d % ndim for d in (dim if isinstance(dim, tuple) else (dim,))}


def gather_to_input(out, shape, axes, keepdim):
    """For every input position, the element of the reduction's output ``out`` it was reduced into."""
    positions = np.indices(shape)
    if keepdim:
        index = tuple(0 if k in axes else positions[k] for k in range(len(shape)))
    else:
        index = tuple(positions[k] for k in range(len(shape)) if k not in axes)
    return np.broadcast_to(out[index], shape)


@PROPERTY
@given(case=shape_and_reduction_dims(), op=st.sampled_from(["sum", "mean", "max"]), seed=seeds)
def test_reduction_matches_numpy_and_backward_sends_the_gradient_to_what_was_reduced(xp, case, op, seed):
    shape, dim, keepdim = case
    # Values from -1 to 1 in steps of 1/4: max often has ties, which share the gradient equally.
    x_np = dyadic(seed, shape, low=-4, high=4)
    x = leaf(xp, x_np)
    y = getattr(F, op)(x, dim=dim, keepdim=keepdim)
    what = f"{op}(dim={dim}, keepdim={keepdim}) of shape {shape}"
    expected = getattr(np, op)(x_np, axis=dim, keepdims=keepdim)
    if op == "mean":  # minidet multiplies the sum by 1/count, NumPy divides: they may round differently
        assert_near(y, expected, f"{what}, forward")
    else:
        assert_equal(y, expected, f"{what}, forward")

    g = dyadic(seed + 1, y.shape)
    backward(xp, y, g)
    axes = reduced_axes(dim, len(shape))
    g_in = gather_to_input(g, shape, axes, keepdim)
    if op == "sum":
        assert_equal(x.grad, g_in, f"{what}, backward (g copied to every summed element)")
    elif op == "mean":
        count = prod(shape[a] for a in axes)
        assert_near(x.grad, (g_in / count).astype(np.float32), f"{what}, backward (g / {count} to every element)")
    else:
        is_max = x_np == gather_to_input(np.max(x_np, axis=tuple(axes), keepdims=True), shape, axes, True)
        ties = gather_to_input(is_max.sum(axis=tuple(axes), keepdims=True), shape, axes, True)
        assert_near(x.grad, (g_in * is_max / ties).astype(np.float32),
                    f"{what}, backward (g shared equally by the tied maxima, zero elsewhere)")


# --- gradcheck in float64 on small shapes ------------------------------------------------------------------
# Sides of at most 3 keep the element-by-element finite differences quick.

def standard_normal(xp, seed, shape):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape))


@GRADCHECK
@given(case=shape_and_permutation(max_side=3), seed=seeds)
def test_gradcheck_permute(xp, case, seed):
    shape, dims = case
    gradcheck(lambda x: F.permute(x, dims), [standard_normal(xp, seed, shape)], seed=seed, name=f"permute{dims}")


@GRADCHECK
@given(data=st.data(), shape=shapes(max_dims=3, max_side=3), seed=seeds)
def test_gradcheck_getitem_with_repeated_integer_indices(xp, data, shape, seed):
    index = on(xp, data.draw(integer_array_index(shape), label="index"))
    gradcheck(lambda x: x[index], [standard_normal(xp, seed, shape)], seed=seed, name="getitem")


@GRADCHECK
@given(case=shape_and_padding(max_side=3), seed=seeds)
def test_gradcheck_pad(xp, case, seed):
    shape, padding = case
    gradcheck(lambda x: F.pad(x, padding, value=1.0), [standard_normal(xp, seed, shape)], seed=seed,
              name=f"pad{padding}")


@GRADCHECK
@given(case=broadcastable_shapes(max_side=3), op=st.sampled_from(["mul", "div"]), seed=seeds)
def test_gradcheck_broadcasting_mul_and_div(xp, case, op, seed):
    a_shape, b_shape = case
    a = standard_normal(xp, seed, a_shape)
    b = standard_normal(xp, seed + 1, b_shape)
    b = xp.sign(b) * (xp.abs(b) + 0.5)  # away from 0 for div
    gradcheck(getattr(F, op), [a, b], seed=seed, name=f"{op} of shapes {a_shape} and {b_shape}")


@GRADCHECK
@given(case=shape_and_reduction_dims(max_dims=3, max_side=3), op=st.sampled_from(["mean", "max"]), seed=seeds)
def test_gradcheck_mean_and_max(xp, case, op, seed):
    shape, dim, keepdim = case
    # Distinct values at least 0.1 apart: max has no ties, so it is differentiable (and eps=1e-6 cannot swap two).
    x = xp.asarray(np.random.default_rng(seed).permutation(prod(shape)).reshape(shape) / 10.0)
    gradcheck(lambda t: getattr(F, op)(t, dim=dim, keepdim=keepdim), [x], seed=seed,
              name=f"{op}(dim={dim}, keepdim={keepdim})")
