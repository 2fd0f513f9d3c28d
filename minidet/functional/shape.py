"""Shape ops: reshape, permute/transpose, indexing, cat, stack, pad.

None of these compute anything; they move values around. So each backward
moves the gradient back to where the values came from.
"""

from itertools import accumulate

from minidet.autograd import Function, Tensor
from minidet.backend import get_array_module, index_add


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.input_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return gy.reshape(self.input_shape)


class Permute(Function):
    def __init__(self, dims):
        self.dims = dims

    def forward(self, x):
        n = x.ndim
        if len(self.dims) != n or not all(-n <= d < n for d in self.dims) or len({d % n for d in self.dims}) != n:
            raise ValueError(f"permute: {self.dims} is not a permutation of the {n} dimensions of shape {x.shape}")
        return x.transpose(self.dims)

    def backward(self, gy):
        inverse = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            inverse[d % len(self.dims)] = i
        return gy.transpose(inverse)


def _is_basic(index):
    """True if ``index`` only slices (ints, slices, None, ...): then no element is picked twice."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice)) or p is None or p is Ellipsis for p in parts)


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.shape = x.shape
        return x[self.index]

    def backward(self, gy):
        gx = get_array_module(gy).zeros(self.shape, dtype=gy.dtype)
        if _is_basic(self.index):
            gx[self.index] = gy
        else:  # an index array may pick an element twice: its gradients must add up
            index_add(gx, self.index, gy)
        return gx


class Cat(Function):
    def __init__(self, dim):
        self.dim = dim

    def forward(self, *xs):
        if len({x.dtype for x in xs}) > 1:
            raise TypeError(f"cat: all tensors need one dtype, got {[str(x.dtype) for x in xs]}")
        self.sizes = [x.shape[self.dim] for x in xs]
        return get_array_module(*xs).concatenate(xs, axis=self.dim)

    def backward(self, gy):
        ends = list(accumulate(self.sizes))[:-1]
        return tuple(get_array_module(gy).split(gy, ends, axis=self.dim))


class Pad(Function):
    def __init__(self, pad, value):
        self.pad, self.value = pad, value

    def forward(self, x):
        if len(self.pad) % 2 or len(self.pad) // 2 > x.ndim or min(self.pad, default=0) < 0:
            raise ValueError(f"pad: expected non-negative (before, after) pairs for at most {x.ndim} "
                             f"dimensions, got {self.pad}")
        # PyTorch order: the first pair pads the last dimension, the next pair the one before, ...
        pairs = [tuple(self.pad[i:i + 2]) for i in range(0, len(self.pad), 2)]
        self.widths = [(0, 0)] * (x.ndim - len(pairs)) + pairs[::-1]
        return get_array_module(x).pad(x, self.widths, constant_values=self.value)

    def backward(self, gy):
        return gy[tuple(slice(before, n - after) for (before, after), n in zip(self.widths, gy.shape))]


def reshape(x, shape):
    """The same values in a new shape (one entry may be -1)."""
    return Reshape(tuple(shape))(x)


def permute(x, dims):
    """Reorder the dimensions: output dimension i is input dimension ``dims[i]``."""
    return Permute(tuple(dims))(x)


def transpose(x, dim0, dim1):
    """Swap two dimensions."""
    n = x.ndim
    if not (-n <= dim0 < n and -n <= dim1 < n):
        raise ValueError(f"transpose: dimensions {dim0} and {dim1} do not both exist in shape {tuple(x.shape)}")
    dims = list(range(n))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return Permute(tuple(dims))(x)


def getitem(x, index):
    """``x[index]`` with NumPy indexing rules (integer and boolean index arrays included)."""
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem(index)(x)


def cat(tensors, dim=0):
    """Join tensors along an existing dimension."""
    if not tensors:
        raise ValueError("cat: needs at least one tensor")
    return Cat(dim)(*tensors)


concat = cat


def stack(tensors, dim=0):
    """Join tensors along a new dimension ``dim``."""
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stack: all tensors need the same shape, got {sorted(shapes)}")
    ndim = len(tensors[0].shape) + 1
    dim = dim % ndim
    return cat([reshape(t, t.shape[:dim] + (1,) + t.shape[dim:]) for t in tensors], dim)


def pad(x, pad, value=0.0):
    """Constant padding, PyTorch's order: ``(left, right, top, bottom, ...)`` from the last dimension back."""
    return Pad(tuple(pad), value)(x)
