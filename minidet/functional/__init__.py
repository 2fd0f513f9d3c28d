"""Differentiable ops, with PyTorch's names and argument orders: ``import minidet.functional as F``.

Each op is a ``Function`` subclass (forward and backward on raw arrays) with a
lowercase wrapper that checks its arguments and calls it.
"""

from minidet.autograd import Tensor
from minidet.functional.activation import clamp, exp, log, logsigmoid, relu, sigmoid, silu, softplus
from minidet.functional.arithmetic import add, div, matmul, mul, neg, pow, sub
from minidet.functional.conv import conv2d, interpolate, max_pool2d
from minidet.functional.loss import (
    binary_cross_entropy_with_logits,
    sigmoid_focal_loss,
    sigmoid_focal_loss_with_labels,
    smooth_l1_loss,
)
from minidet.functional.norm import batch_norm, group_norm
from minidet.functional.reduction import max, mean, sum
from minidet.functional.shape import cat, concat, getitem, pad, permute, reshape, stack, transpose

__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "matmul",
    "sum", "mean", "max",
    "reshape", "permute", "transpose", "getitem", "cat", "concat", "stack", "pad",
    "exp", "log", "relu", "sigmoid", "silu", "softplus", "logsigmoid", "clamp",
    "conv2d", "max_pool2d", "interpolate", "batch_norm", "group_norm",
    "binary_cross_entropy_with_logits", "smooth_l1_loss", "sigmoid_focal_loss", "sigmoid_focal_loss_with_labels",
]


def _reshape_method(x, *shape):
    """``x.reshape(2, 3)`` and ``x.reshape((2, 3))`` both work, as in PyTorch."""
    return reshape(x, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)


def _permute_method(x, *dims):
    return permute(x, dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims)


# The operators and methods of Tensor, defined here because the ops are.
Tensor.__add__ = add
Tensor.__radd__ = lambda x, other: add(other, x)
Tensor.__sub__ = sub
Tensor.__rsub__ = lambda x, other: sub(other, x)
Tensor.__mul__ = mul
Tensor.__rmul__ = lambda x, other: mul(other, x)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = lambda x, other: div(other, x)
Tensor.__neg__ = neg
Tensor.__pow__ = pow
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = lambda x, other: matmul(other, x)
Tensor.__getitem__ = getitem
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.reshape = _reshape_method
Tensor.permute = _permute_method
Tensor.transpose = transpose
Tensor.exp = exp
Tensor.log = log
Tensor.relu = relu
Tensor.sigmoid = sigmoid
Tensor.clamp = clamp
