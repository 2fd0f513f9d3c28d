"""Reductions: sum, mean, max over all or some dimensions."""

from math import prod

from numpy.lib.array_utils import normalize_axis_tuple

from minidet.autograd import Function
from minidet.backend import get_array_module


def _axes(dim, ndim):
    return tuple(range(ndim)) if dim is None else normalize_axis_tuple(dim, ndim)


def _expand(gy, axes, keepdim):
    """Give ``gy`` back the reduced axes (as size 1) so it broadcasts against the input."""
    if keepdim:
        return gy
    return get_array_module(gy).expand_dims(gy, axes)


class Sum(Function):
    def __init__(self, dim, keepdim):
        self.dim, self.keepdim = dim, keepdim

    def forward(self, x):
        self.shape, self.axes = x.shape, _axes(self.dim, x.ndim)
        return x.sum(axis=self.axes, keepdims=self.keepdim)

    def backward(self, gy):
        # Every input element added once into its output element: copy the gradient back out.
        return get_array_module(gy).broadcast_to(_expand(gy, self.axes, self.keepdim), self.shape)


class Max(Function):
    def __init__(self, dim, keepdim):
        self.dim, self.keepdim = dim, keepdim

    def forward(self, x):
        self.axes = _axes(self.dim, x.ndim)
        y = x.max(axis=self.axes, keepdims=True)
        self.is_max = x == y
        return y if self.keepdim else y.squeeze(self.axes)

    def backward(self, gy):
        # Tied maxima share the gradient equally (as torch.amax does).
        share = self.is_max / self.is_max.sum(axis=self.axes, keepdims=True)
        return (_expand(gy, self.axes, self.keepdim) * share).astype(gy.dtype, copy=False)


def sum(x, dim=None, keepdim=False):
    """Sum over ``dim`` (an int, a tuple of ints, or None for all)."""
    return Sum(dim, keepdim)(x)


def mean(x, dim=None, keepdim=False):
    count = prod(x.shape[a] for a in _axes(dim, x.ndim))
    return Sum(dim, keepdim)(x) * (1.0 / count)


def max(x, dim=None, keepdim=False):
    """The largest values over ``dim`` (values only, like ``torch.amax``)."""
    return Max(dim, keepdim)(x)
