"""Batch normalisation and group normalisation.

Both standardise x over some axes, x_hat = (x - mean) / sqrt(var + eps), then
scale and shift each channel. They differ only in *which* values share a mean:
batch norm pools each channel over the whole batch (N, H, W); group norm pools
each image's channel groups (C/G, H, W) and so does not depend on the batch.
"""

from minidet.autograd import Function, Tensor
from minidet.backend import get_array_module
from minidet.functional.arithmetic import as_python_scalar
from minidet.functional.shape import reshape


class BatchNormTraining(Function):
    """Batch norm with the batch's statistics: y = x_hat * weight + bias, x_hat standardised per channel.

    Works on x viewed as (N, C, L), L = H * W: each channel's mean and variance are over N and L. The standardisation
    and the per-channel scale and shift are one op: because the scale is constant over the very values that share a
    mean, the gradients of the scale and shift are the two sums that the standardisation's backward needs anyway,
    so one op saves several passes over x.

    The standardisation's backward: the mean and variance depend on every x as well, and differentiating through
    both gives, for g = dL/dx_hat, dL/dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sqrt(var + eps), the means
    over the values that share a mean.
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
        # dL/dx_hat = gy * weight, so the standardisation's backward (see above) gives
        # dL/dx = weight / sqrt(var + eps) * (gy - mean(gy) - x_hat * mean(gy * x_hat)), and the two means are
        # gb / count and gw / count.
        gx = self.x_hat * (gw / count)[:, None]
        xp.subtract(gy3, gx, out=gx)
        gx -= (gb / count)[:, None]
        gx *= (self.weight * self.inv_std)[:, None]
        return gx.reshape(gy.shape), gw, gb


class GroupNorm(Function):
    """Group norm in one op: y = x_hat * weight + bias, x_hat standardised over each image's channel groups.

    Works on x viewed as (N, G, C/G, L), L = H * W: each (image, group) has one mean and variance, over its C/G
    channels and L positions. As in ``BatchNormTraining``, the scale, shift and standardisation in one op save
    passes over x; but here the scale differs between the channels of a group, so the standardisation's backward
    takes its two means of dL/dx_hat = gy * weight (not of gy), per (image, group).
    """

    def __init__(self, groups, eps):
        self.groups, self.eps = groups, eps

    def forward(self, x, weight, bias):
        xp = get_array_module(x)
        n, c, g = x.shape[0], x.shape[1], self.groups
        x4 = x.reshape(n, g, c // g, -1)                                         # (N, G, C/G, L)
        # Here and in the backward: sums by NumPy's sum, pairwise over the contiguous (C/G, L) values. A group's
        # gradient sums nearly cancel, and einsum's running float32 sum lost three more digits of them (measured:
        # two data-parallel workers against one process, weights 1.9e-3 apart against 2e-6).
        mean = x4.mean(axis=(2, 3))
        centred = x4 - mean[:, :, None, None]
        var = (centred * centred).mean(axis=(2, 3))                             # biased variance
        self.inv_std = 1 / xp.sqrt(var + self.eps)                              # (N, G)
        self.x_hat = centred
        self.x_hat *= self.inv_std[:, :, None, None]                            # in place: centred is not needed
        self.weight = weight.reshape(g, c // g)
        y = self.x_hat * self.weight[:, :, None]
        y += bias.reshape(g, c // g)[:, :, None]
        return y.reshape(x.shape)

    def backward(self, gy):
        xp = get_array_module(gy)
        gy4 = gy.reshape(self.x_hat.shape)
        gy_xhat = gy4 * self.x_hat
        gb = gy4.sum(axis=(0, 3)).reshape(-1)                                   # dL/dbias, per channel
        gw = gy_xhat.sum(axis=(0, 3)).reshape(-1)                               # dL/dweight
        # The standardisation's backward (see BatchNormTraining) with g = dL/dx_hat = gy * weight, the means over
        # each (image, group).
        g_hat = gy4 * self.weight[:, :, None]
        mean_g = g_hat.mean(axis=(2, 3))
        gy_xhat *= self.weight[:, :, None]                                      # now g_hat * x_hat
        mean_g_xhat = gy_xhat.mean(axis=(2, 3))
        gx = self.x_hat * mean_g_xhat[:, :, None, None]
        xp.subtract(g_hat, gx, out=gx)
        gx -= mean_g[:, :, None, None]
        gx *= self.inv_std[:, :, None, None]
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
    x, eps, momentum = input, as_python_scalar(eps), as_python_scalar(momentum)
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
    xp = get_array_module(input.data if isinstance(input, Tensor) else input)
    weight = xp.ones(c, dtype=input.dtype) if weight is None else weight      # no scale: 1, no shift: 0
    bias = xp.zeros(c, dtype=input.dtype) if bias is None else bias
    return GroupNorm(num_groups, as_python_scalar(eps))(input, weight, bias)
