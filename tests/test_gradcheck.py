"""Every differentiable op against central finite differences, in float64, on every element: each case of the op
table (tests/op_table.py), then the convolution's alternative paths, which must give the same gradients."""

import numpy as np
import pytest
from op_table import CASES, constants_as

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


# --- every op of the table --------------------------------------------------------

@pytest.mark.parametrize("index, case", list(enumerate(CASES)), ids=[case.id for case in CASES])
def test_op_against_finite_differences(xp, index, case):
    inputs, constants = case.inputs(np.random.default_rng(index))
    constants = constants_as(constants, xp.asarray)
    gradcheck(lambda *ts: case.minidet(*ts, *constants), [xp.asarray(a) for a in inputs], name=case.id)


# --- convolution: its paths ----------------------------------------------------------

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


def test_gradcheck_samples_large_inputs():
    calls = []

    def double(x):
        calls.append(1)
        return x * 2

    gradcheck(double, [np.ones(5000)], max_elements=100)
    assert len(calls) == 1 + 2 * 100
