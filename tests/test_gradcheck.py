"""Every differentiable op against central finite differences, in float64, on every element."""

import itertools

import numpy as np
import pytest

import minidet as md
import minidet.functional as F
from minidet.autograd import Function
from minidet.functional.conv import DepthwiseConv2d
from minidet.testing import GradcheckError, gradcheck


def randn(xp, rng, *shape):
    return xp.asarray(rng.standard_normal(shape))


# --- the checker itself --------------------------------------------------------

def test_gradcheck_catches_a_backward_that_ignores_the_upstream_gradient():
    class Square(Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, gy):
            return 2 * self.x            # forgot "* gy"

    with pytest.raises(GradcheckError, match=r"gradcheck\(square\): input 0 \(shape \(2, 3\)\), index \(0, 0\): "
                                             r"numeric .*, analytic .*"):
        gradcheck(lambda x: Square()(x), [np.ones((2, 3))], name="square")


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(F.exp, [np.ones(2, np.float32)])


# --- arithmetic, reductions, element-wise ---------------------------------------

BROADCAST_SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (2, 3))]


@pytest.mark.parametrize("op", [F.add, F.sub, F.mul, F.div])
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES)
def test_binary_arithmetic(xp, rng, op, shapes):
    a, b = randn(xp, rng, *shapes[0]), randn(xp, rng, *shapes[1])
    if op is F.div:
        b = xp.sign(b) * (xp.abs(b) + 0.5)   # keep away from 0
    gradcheck(op, [a, b])


def test_neg_and_pow(xp, rng):
    gradcheck(F.neg, [randn(xp, rng, 3, 2)])
    gradcheck(lambda x: F.pow(x, 3), [randn(xp, rng, 3, 2)])
    gradcheck(lambda x: x ** 0.5, [xp.abs(randn(xp, rng, 4)) + 0.5])


@pytest.mark.parametrize("shapes", [((3, 4), (4, 2)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2))])
def test_matmul(xp, rng, shapes):
    gradcheck(F.matmul, [randn(xp, rng, *shapes[0]), randn(xp, rng, *shapes[1])])


@pytest.mark.parametrize("reduce", [F.sum, F.mean, F.max])
@pytest.mark.parametrize("dim, keepdim", [(None, False), (1, False), ((0, 2), True), (-1, True)])
def test_reductions(xp, rng, reduce, dim, keepdim):
    gradcheck(lambda x: reduce(x, dim=dim, keepdim=keepdim), [randn(xp, rng, 2, 3, 4)])


@pytest.mark.parametrize("op", [F.exp, F.relu, F.sigmoid, F.silu, F.softplus, F.logsigmoid,
                                lambda x: F.clamp(x, -0.5, 0.7), lambda x: F.clamp(x, min=0.1)])
def test_elementwise(xp, rng, op):
    x = randn(xp, rng, 3, 5) * 3
    x = x + 0.01 * xp.sign(x) + 0.01 * (x == 0)   # no kinks within eps of an element
    gradcheck(op, [x])


def test_log(xp, rng):
    gradcheck(F.log, [xp.abs(randn(xp, rng, 3, 4)) + 0.1])


# --- shape ops ---------------------------------------------------------------

def test_shape_ops(xp, rng):
    x = randn(xp, rng, 2, 3, 4)
    gradcheck(lambda t: F.reshape(t, (4, -1)), [x])
    gradcheck(lambda t: F.permute(t, (2, 0, 1)), [x])
    gradcheck(lambda t: F.transpose(t, 0, 2), [x])
    gradcheck(lambda t: t[1:, ::2, xp.asarray([0, 0, 3])], [x])   # repeated index: gradients add
    gradcheck(lambda t: t[t.data > 0], [x])
    gradcheck(lambda t: F.pad(t, (1, 2, 0, 1), value=3.0), [x])


def test_cat_and_stack(xp, rng):
    a, b, c = randn(xp, rng, 2, 3), randn(xp, rng, 2, 1), randn(xp, rng, 2, 3)
    gradcheck(lambda a, b: F.cat([a, b, a], dim=1), [a, b])
    gradcheck(lambda a, c: F.stack([a, c], dim=1), [a, c])


# --- convolution, pooling, upsampling -------------------------------------------

CONV_GRID = list(itertools.product([1, 2], [0, 1], [1, 3], ["one", "depthwise"], [1, 3]))


@pytest.mark.parametrize("stride, padding, kernel, groups, batch", CONV_GRID)
def test_conv2d(xp, rng, stride, padding, kernel, groups, batch):
    channels = 4
    groups = 1 if groups == "one" else channels
    out_channels = 2 * channels if groups > 1 else 3
    x = randn(xp, rng, batch, channels, 5, 7)                            # odd height and width
    w = randn(xp, rng, out_channels, channels // groups, kernel, kernel)
    b = randn(xp, rng, out_channels)
    gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups), [x, w, b])


@pytest.mark.parametrize("stride, padding, kernel", [(1, 1, 3), (2, 1, 3), (1, 2, 5), (2, 2, 5), (1, 0, 3)])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["whole batch", "one image at a time"])
def test_depthwise_conv2d_one_filter_per_channel(xp, rng, monkeypatch, stride, padding, kernel, chunk_bytes):
    # groups = C = O takes the tap-by-tap path (DepthwiseConv2d), not im2col; EfficientNet's blocks use it. It
    # works through the batch a few images at a time: here all three at once, or one by one.
    if chunk_bytes is not None:
        monkeypatch.setattr(DepthwiseConv2d, "CHUNK_BYTES", chunk_bytes)
    x, w, b = randn(xp, rng, 3, 4, 7, 6), randn(xp, rng, 4, 1, kernel, kernel), randn(xp, rng, 4)
    gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding, groups=4), [x, w, b])
    gradcheck(lambda x, w: F.conv2d(x, w, stride=stride, padding=padding, groups=4), [x, w])


def test_conv2d_without_bias_and_with_rectangular_settings(xp, rng):
    x, w = randn(xp, rng, 2, 2, 6, 5), randn(xp, rng, 3, 2, 3, 1)
    gradcheck(lambda x, w: F.conv2d(x, w, stride=(2, 1), padding=(1, 0)), [x, w])


def test_conv2d_strided_windows_from_phases_and_in_place_give_the_same_bits(rng):
    # A strided convolution gathers its windows from the input's phases when a run of the batch's values is shorter
    # than a cache line (few images), and from the input itself otherwise: one image at a time uses the first, the
    # whole batch of 16 float32 images the second. Same sums, same order: the same bits.
    from minidet.functional.conv import CACHE_LINE_BYTES

    x = rng.standard_normal((16, 3, 9, 11)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((16, 5, 5, 6)).astype(np.float32)
    assert 16 * x.itemsize >= CACHE_LINE_BYTES > x.itemsize

    def run(images, upstream):
        xt, wt = md.tensor(images, requires_grad=True), md.tensor(w, requires_grad=True)
        y = F.conv2d(xt, wt, stride=2, padding=1)
        y.backward(upstream)
        return y.numpy(), xt.grad, wt.grad

    whole = run(x, gy)
    singles = [run(x[i:i + 1], gy[i:i + 1]) for i in range(16)]
    np.testing.assert_array_equal(whole[0], np.concatenate([s[0] for s in singles]))
    np.testing.assert_array_equal(whole[1], np.concatenate([s[1] for s in singles]))
    np.testing.assert_allclose(whole[2], sum(s[2] for s in singles), rtol=1e-5, atol=1e-5)   # summed in another order


def test_conv2d_gradcheck_with_a_batch_large_enough_to_skip_the_phases(rng):
    x, w = rng.standard_normal((8, 2, 5, 7)), rng.standard_normal((3, 2, 3, 3))   # 8 float64 images: 64 bytes
    gradcheck(lambda x, w: F.conv2d(x, w, stride=2, padding=1), [x, w])


@pytest.mark.parametrize("kernel, padding, groups", [((3, 3), (1, 1), 1), ((3, 3), (0, 0), 2), ((3, 2), (2, 1), 1),
                                                     ((5, 5), (2, 2), 3), ((1, 3), (0, 1), 1)])
def test_conv2d_input_gradient_by_flipped_kernel_equals_col2im(rng, kernel, padding, groups):
    # A stride-1 convolution computes dL/dx as a convolution of dL/dy with the flipped kernel; col2im, the
    # textbook way, is kept for strides and 1 x 1 kernels. Both must give the same gradient on every setting where
    # the first applies: padding from 0 to KH - 1, rectangular kernels, groups.
    from minidet.functional.conv import Conv2d

    x = rng.standard_normal((3, 6, 7, 8))
    w = rng.standard_normal((6, 6 // groups, *kernel))
    conv = Conv2d((1, 1), padding, groups)
    conv.needs_input_grad = (True, True)
    y = conv.forward(x, w)
    gy = rng.standard_normal(y.shape)
    assert conv._flipping_pays()
    gy_mat = gy.transpose(1, 2, 3, 0).reshape(groups, 6 // groups, -1)
    np.testing.assert_allclose(conv._input_gradient_by_flipped_kernel(gy), conv._col2im(gy_mat, *y.shape[2:]),
                               rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("kernel, stride, padding", [(2, None, 0), (3, 2, 1), (3, 1, 0)])
def test_max_pool2d(xp, rng, kernel, stride, padding):
    x = xp.asarray(rng.permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6) * 0.1)   # distinct values: no ties
    gradcheck(lambda x: F.max_pool2d(x, kernel, stride, padding), [x])


@pytest.mark.parametrize("kwargs", [{"scale_factor": 2}, {"scale_factor": (1, 3)}, {"size": (6, 9)}])
def test_interpolate_nearest(xp, rng, kwargs):
    gradcheck(lambda x: F.interpolate(x, **kwargs), [randn(xp, rng, 2, 3, 3, 3)])


# --- normalisation -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 3, 5), (1, 2, 3, 3)])
def test_batch_norm_training(xp, rng, shape):
    c = shape[1]
    gradcheck(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
              [randn(xp, rng, *shape), randn(xp, rng, c), randn(xp, rng, c)])


def test_batch_norm_eval(xp, rng):
    mean, var = randn(xp, rng, 3), xp.abs(randn(xp, rng, 3)) + 0.5
    gradcheck(lambda x, w, b: F.batch_norm(x, mean, var, w, b, training=False),
              [randn(xp, rng, 2, 3, 4, 4), randn(xp, rng, 3), randn(xp, rng, 3)])


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm(xp, rng, groups):
    gradcheck(lambda x, w, b: F.group_norm(x, groups, w, b),
              [randn(xp, rng, 3, 4, 3, 5), randn(xp, rng, 4), randn(xp, rng, 4)])


# --- losses ------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_binary_cross_entropy_with_logits(xp, rng, reduction):
    target = xp.asarray(rng.random((4, 3)))
    weight = xp.asarray(rng.random((1, 3)))
    gradcheck(lambda x: F.binary_cross_entropy_with_logits(x, target, weight, reduction),
              [randn(xp, rng, 4, 3) * 3])


@pytest.mark.parametrize("beta", [0.0, 0.11, 1.0])
def test_smooth_l1_loss(xp, rng, beta):
    x, t = randn(xp, rng, 5, 4), randn(xp, rng, 5, 4)
    kink = xp.abs(xp.abs(x - t) - beta) < 1e-3     # finite differences straddle the joint: move away
    x = x + 0.01 * kink
    gradcheck(lambda x, t: F.smooth_l1_loss(x, t, "sum", beta), [x, t])


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 2.0), (0.5, 0.0), (0.25, 1.5), (0.25, 5.0)])
@pytest.mark.parametrize("soft", [False, True])
def test_sigmoid_focal_loss(xp, rng, alpha, gamma, soft):
    targets = rng.random((6, 4)) if soft else (rng.random((6, 4)) < 0.3).astype(float)
    gradcheck(lambda x: F.sigmoid_focal_loss(x, xp.asarray(targets), alpha, gamma, "mean"),
              [randn(xp, rng, 6, 4) * 3])


def test_gradcheck_samples_large_inputs():
    calls = []

    def double(x):
        calls.append(1)
        return x * 2

    gradcheck(double, [np.ones(5000)], max_elements=100)
    assert len(calls) == 1 + 2 * 100
