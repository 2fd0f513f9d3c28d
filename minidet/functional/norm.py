"""Batch normalisation and group normalisation.

Both standardise x over some axes, x_hat = (x - mean) / sqrt(var + eps), then
scale and shift each channel. They differ only in *which* values share a mean:
batch norm pools each channel over the whole batch (N, H, W); group norm pools
each image's channel groups (C/G, H, W) and so does not depend on the batch.
"""

from minidet.autograd import Function, Tensor
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


class BatchNormTraining(Function):
    """Batch norm with the batch's statistics: y = x_hat * weight + bias, x_hat standardised per channel.

    Works on x viewed as (N, C, L), L = H * W: each channel's mean and variance are over N and L. This is
    ``Standardize`` followed by the per-channel scale and shift, in one op: because the scale is constant over the
    very values that share a mean, the gradients of the scale and shift are the two sums that the standardisation's
    backward needs anyway, so one op saves several passes over x.
    """

    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, weight, bias):
        xp = get_array_module(x)
        x3 = x.reshape(x.shape[0], x.shape[1], -1)                              # (N, C, L)
        count = x3.shape[0] * x3.shape[2]
        self.mean = xp.einsum("ncl->c", x3) / count                            # (C,)
        centred = x3 - self.mean[:, None]
        self.var = xp.einsum("ncl,ncl->c", centred, centred) / count           # biased variance
        self.inv_std = 1 / xp.sqrt(self.var + self.eps)
        self.x_hat = centred
        self.x_hat *= self.inv_std[:, None]                                     # in place: centred is not needed
        self.weight = weight
        y = self.x_hat * weight[:, None]
        y += bias[:, None]
        return y.reshape(x.shape)

    def backward(self, gy):
        xp = get_array_module(gy)
        gy3 = gy.reshape(self.x_hat.shape)
        count = gy3.shape[0] * gy3.shape[2]
        gb = xp.einsum("ncl->c", gy3)                                          # dL/dbias
        gw = xp.einsum("ncl,ncl->c", gy3, self.x_hat)                          # dL/dweight
        # dL/dx_hat = gy * weight; through the mean and variance (see Standardize.backward) that gives
        # dL/dx = weight / sqrt(var + eps) * (gy - mean(gy) - x_hat * mean(gy * x_hat)), and the two means are
        # gb / count and gw / count.
        gx = self.x_hat * (gw / count)[:, None]
        xp.subtract(gy3, gx, out=gx)
        gx -= (gb / count)[:, None]
        gx *= (self.weight * self.inv_std)[:, None]
        return gx.reshape(gy.shape), gw, gb


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
    count = x.size // x.shape[1]
    if count < 2:
        raise ValueError(f"batch_norm: training needs more than one value per channel, input has shape {x.shape}")
    xp = get_array_module(x.data if isinstance(x, Tensor) else x)
    weight = xp.ones(x.shape[1], dtype=x.dtype) if weight is None else weight      # no scale: 1, no shift: 0
    bias = xp.zeros(x.shape[1], dtype=x.dtype) if bias is None else bias
    norm = BatchNormTraining(eps)
    y = norm(x, weight, bias)
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * norm.mean
        running_var *= 1 - momentum
        running_var += momentum * norm.var * (count / (count - 1))
    return y


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalisation of (N, C, ...) input: each image's C/G-channel groups share one mean and variance."""
    n, c = input.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels cannot be split into {num_groups} groups")
    grouped = reshape(input, (n, num_groups, -1))
    y = reshape(Standardize((2,), python_number(eps))(grouped), input.shape)
    return _affine(y, weight, bias)
