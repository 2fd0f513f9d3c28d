"""The autograd engine: ``Tensor``, ``Function`` and the backward pass.

A ``Tensor`` wraps a raw array (NumPy or CuPy). Calling a ``Function`` on
tensors runs its ``forward`` on the raw arrays and, when gradients are wanted,
records itself as the creator of its outputs. ``Tensor.backward`` then visits
those creators in reverse topological order, asking each one's ``backward``
for the gradients of its inputs:

    x ──► Mul ──► y ──► Sum ──► loss        forward:  left to right
    x.grad ◄── Mul.backward ◄── Sum.backward ◄── 1    backward: right to left

The walk is iterative (a chain of any length works) and, unless
``retain_graph=True``, frees each node once it is used, so the activations it
held are released as soon as possible.
"""

import contextlib

import numpy as np

from minidet import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Within this block, ops record no graph (inference, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


class Tensor:
    """An array together with the gradient information autograd needs.

    Attributes:
        data: the raw NumPy or CuPy array.
        grad: after ``backward``, the gradient as a raw array of the same kind,
            shape and dtype as ``data`` (``None`` before). Kept for leaves only.
        requires_grad: whether gradients flow to this tensor.

    Operators (``+``, ``*``, ``@``, indexing, ``.sum()``, ...) are attached by
    ``minidet.functional``, which defines the ops behind them.
    """

    __array_priority__ = 1000  # make `ndarray + Tensor` call Tensor.__radd__

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            raise TypeError("Tensor(data): data is already a Tensor; use it directly or call .detach()")
        if isinstance(data, np.generic):  # NumPy reductions return scalars, not 0-d arrays
            data = np.asarray(data)
        if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
            raise TypeError(f"Tensor(data): expected a NumPy or CuPy array, got {type(data).__name__}; "
                            "use minidet.tensor(...) to convert lists and scalars")
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._ctx = None    # the Function that created this tensor (None for a leaf)
        self._index = 0     # which output of _ctx this tensor is

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        device = ", device='cuda'" if self.device == "cuda" else ""
        return f"tensor({backend.to_numpy(self.data)!r}{device}{grad})"

    def numpy(self):
        """The values as a NumPy array (copied from the GPU if needed)."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}")
        return self.data.reshape(()).item()

    def detach(self):
        """A new leaf tensor sharing this one's data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device):
        """This tensor on ``"cpu"`` or ``"cuda"``; differentiable, a no-op if already there."""
        if device == self.device:
            return self
        return _ToDevice(device)(self)

    def backward(self, gradient=None, retain_graph=False):
        """Compute the gradient of this tensor with respect to every leaf.

        Args:
            gradient: d(something)/d(self), an array of this tensor's shape. May be
                omitted only for a single-element tensor (a loss), where it is 1.
            retain_graph: keep the graph so ``backward`` can run through it again.

        Leaf gradients accumulate in ``leaf.grad`` across calls (set it to
        ``None`` or use ``optimizer.zero_grad()`` between steps).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of the "
                               "ops that made it had requires_grad=True (or they ran under no_grad())")
        xp = backend.get_array_module(self.data)
        if gradient is None:
            if self.size != 1:
                raise RuntimeError(f"backward() on a tensor of shape {self.shape} needs a gradient of that "
                                   "shape; reduce it to a scalar first (e.g. y.sum().backward()) or pass gradient=")
            gradient = xp.ones_like(self.data)
        else:
            gradient = gradient.data if isinstance(gradient, Tensor) else gradient
            backend.check_same_device("backward", [self.data, gradient])
            gradient = xp.asarray(gradient, dtype=self.dtype)
            if gradient.shape != self.shape:
                raise ValueError(f"backward(): gradient has shape {gradient.shape}, the tensor {self.shape}")
        run_backward(self, gradient, retain_graph)


class Function:
    """One differentiable op. Subclasses define ``forward`` and ``backward``.

    ``forward(*arrays)`` receives raw arrays and returns an array (or a tuple of
    arrays); it may save on ``self`` what ``backward`` will need.
    ``backward(*grad_outputs)`` receives one gradient array per output and
    returns one gradient per input (``None`` for an input that needs none).
    Settings that are not arrays (stride, axis, ...) go to ``__init__``.
    """

    def __call__(self, *inputs):
        tensors = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
        arrays = [t.data for t in tensors]
        backend.check_same_device(self.name, arrays)
        outputs = self.forward(*arrays)
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        requires_grad = _grad_enabled and any(t.requires_grad for t in tensors)
        results = tuple(Tensor(out, requires_grad=requires_grad) for out in outputs)
        if requires_grad:
            self.inputs = tensors
            self.needs_input_grad = tuple(t.requires_grad for t in tensors)
            self.output_meta = tuple((r.shape, r.dtype) for r in results)
            for i, r in enumerate(results):
                r._ctx, r._index = self, i
        return results[0] if single else results

    @property
    def name(self):
        return type(self).__name__

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, *grad_outputs):
        raise NotImplementedError

    def _free(self):
        """Drop the inputs and everything ``forward`` saved, releasing the graph behind this node."""
        self.__dict__.clear()
        self.inputs = None


class _ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def forward(self, x):
        self.source = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):
        return backend.to_device(gy, self.source)


def _topological_order(root):
    """The Functions behind ``root``, each listed before the Functions that made its inputs."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:  # iterative depth-first search; a node is appended after all its inputs' creators
        fn, inputs_done = stack.pop()
        if inputs_done:
            order.append(fn)
            continue
        if fn in visited:
            continue
        visited.add(fn)
        if fn.inputs is None:
            raise RuntimeError(
                f"backward through a graph that was already freed (at {fn.name}): a previous backward() "
                "released it; pass retain_graph=True to that first call to run backward twice")
        stack.append((fn, True))
        for t in fn.inputs:
            if t.requires_grad and t._ctx is not None and t._ctx not in visited:
                stack.append((t._ctx, False))
    return order[::-1]


def _gradient_shaped_like_its_input(fn, i, x, gx):
    """``gx``, the gradient ``fn.backward`` gave for its input ``i`` (``x``), as an array; an error unless it has
    that input's shape and dtype."""
    if isinstance(gx, np.generic):
        gx = np.asarray(gx)
    if gx.shape != x.shape or gx.dtype != x.dtype:
        raise RuntimeError(f"{fn.name}.backward returned a gradient of shape {gx.shape} and dtype {gx.dtype} "
                           f"for input {i}, which has shape {x.shape} and dtype {x.dtype}")
    return gx


def run_backward(root, gradient, retain_graph=False):
    """Propagate ``gradient`` (d?/d root) back to every leaf that requires grad."""
    if root._ctx is None:
        root.grad = gradient.copy() if root.grad is None else root.grad + gradient
        return
    order = _topological_order(root._ctx)
    pending = {root._ctx: [None] * len(root._ctx.output_meta)}
    pending[root._ctx][root._index] = gradient
    xp = backend.get_array_module(gradient)
    for fn in order:
        grad_outputs = [g if g is not None else xp.zeros(shape, dtype)  # an output nobody used
                        for g, (shape, dtype) in zip(pending.pop(fn), fn.output_meta)]
        grad_inputs = fn.backward(*grad_outputs)
        if not isinstance(grad_inputs, tuple):
            grad_inputs = (grad_inputs,)
        if len(grad_inputs) != len(fn.inputs):
            raise RuntimeError(f"{fn.name}.backward returned {len(grad_inputs)} gradients "
                               f"for {len(fn.inputs)} inputs")
        for i, (x, gx, needed) in enumerate(zip(fn.inputs, grad_inputs, fn.needs_input_grad)):
            if not needed:
                continue
            if gx is None:
                raise RuntimeError(f"{fn.name}.backward gave no gradient for input {i}, which requires grad")
            gx = _gradient_shaped_like_its_input(fn, i, x, gx)
            if x._ctx is None:  # a leaf: keep its own copy, gradients may be views of others
                x.grad = gx.copy() if x.grad is None else x.grad + gx
            else:
                slots = pending.setdefault(x._ctx, [None] * len(x._ctx.output_meta))
                slots[x._index] = gx if slots[x._index] is None else slots[x._index] + gx
        if not retain_graph:
            fn._free()


def tensor(data, requires_grad=False, dtype=None, device=None):
    """Make a leaf ``Tensor`` from an array, a list or a number.

    The data is always copied (as ``torch.tensor`` does), so updating the
    tensor never changes the array it came from. NumPy and CuPy arrays keep
    their dtype and device unless ``dtype`` or ``device`` say otherwise;
    Python floats become float32 (as in PyTorch).
    """
    if isinstance(data, Tensor):
        data = data.data
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        data = np.asarray(data)
        if dtype is None and data.dtype == np.float64:
            dtype = np.float32
    if device is not None:
        data = backend.to_device(data, device)
    data = data.astype(dtype or data.dtype, copy=True)
    return Tensor(data, requires_grad=requires_grad)
