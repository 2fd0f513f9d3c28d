"""Batch normalisation and group normalisation.

Both standardise x over some axes, x_hat = (x - mean) / sqrt(var + eps), then
scale and shift each channel. They differ only in *which* values share a mean:
batch norm pools each channel over the whole batch (N, H, W); group norm pools
each image's channel groups (C/G, H, W) and so does not depend on the batch.
"""

from minidet.autograd import Function
from minidet.backend import get_array_module
from minidet.functional.arithmetic import python_number
from minidet.functional.shape import reshape


class Standardize(Function):
    """x_hat = (x - mean) / sqrt(var + eps) over ``axes`` (biased variance)."""

    def __init__(self, axes, eps):
        self.axes, self.eps = axes, eps

    def forward(self, x):
        xp = get_array_module(x)
        self.mean = x.mean(axis=self.axes, keepdims=True)
        centred = x - self.mean
        self.var = (centred * centred).mean(axis=self.axes, keepdims=True)
        self.inv_std = 1 / xp.sqrt(self.var + self.eps)
        self.x_hat = centred * self.inv_std
        return self.x_hat

    def backward(self, gy):
        # The mean and variance depend on every x too. Differentiating through both gives
        # dL/dx = (gy - mean(gy) - x_hat * mean(gy * x_hat)) / sqrt(var + eps).
        mean_gy = gy.mean(axis=self.axes, keepdims=True)
        mean_gy_xhat = (gy * self.x_hat).mean(axis=self.axes, keepdims=True)
        return self.inv_std * (gy - mean_gy - self.x_hat * mean_gy_xhat)


def _affine(y, weight, bias):
    """Scale and shift each channel of y (N, C, ...) by weight (C,) and bias (C,)."""
    shape = (1, -1) + (1,) * (y.ndim - 2)
    if weight is not None:
        y = y * reshape(weight, shape)
    if bias is not None:
        y = y + reshape(bias, shape)
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch normalisation of (N, C) or (N, C, H, W) input, per channel.

    In training, normalise with the batch's own statistics and update the
    running statistics in place: running = (1 - momentum) * running + momentum
    * batch, with the unbiased variance (as PyTorch). In evaluation, normalise
    with the running statistics, which are constants.

    Args:
        running_mean, running_var: raw (C,) arrays (or None in training to skip the update).
        weight, bias: (C,) scale and shift, or None.
    """
    x, eps, momentum = input, python_number(eps), python_number(momentum)
    if x.ndim < 2:
        raise ValueError(f"batch_norm: input must be (N, C, ...), got shape {x.shape}")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if not training:
        xp = get_array_module(running_mean)
        inv_std = 1 / xp.sqrt(running_var + eps)
        y = (x - running_mean.reshape(shape)) * inv_std.reshape(shape)
        return _affine(y, weight, bias)
    axes = (0,) + tuple(range(2, x.ndim))
    count = x.size // x.shape[1]
    if count < 2:
        raise ValueError(f"batch_norm: training needs more than one value per channel, input has shape {x.shape}")
    standardize = Standardize(axes, eps)
    y = standardize(x)
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * standardize.mean.reshape(-1)
        running_var *= 1 - momentum
        running_var += momentum * standardize.var.reshape(-1) * (count / (count - 1))
    return _affine(y, weight, bias)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalisation of (N, C, ...) input: each image's C/G-channel groups share one mean and variance."""
    n, c = input.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels cannot be split into {num_groups} groups")
    grouped = reshape(input, (n, num_groups, -1))
    y = reshape(Standardize((2,), python_number(eps))(grouped), input.shape)
    return _affine(y, weight, bias)
