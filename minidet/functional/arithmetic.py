"""Arithmetic with broadcasting, and matrix multiplication.

Broadcasting in the forward pass means summing in the backward pass: if ``b``
of shape (1, C) was stretched to (N, C), each of its elements was used N times,
so its gradient is the sum of the N gradients (``sum_to``).
"""

import numpy as np

from minidet import backend
from minidet.autograd import Function, Tensor


def sum_to(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, giving ``shape``."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1)
    return grad.sum(axis=tuple(range(lead)) + stretched, keepdims=True).reshape(shape)


def is_array(x):
    return isinstance(x, (Tensor, np.ndarray)) or backend.is_cupy_array(x)


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _is_scalar(x):
    """A Python number, a NumPy scalar or a 0-d array (but not a Tensor)."""
    return not isinstance(x, Tensor) and np.ndim(x) == 0


def as_python_scalar(value):
    """A NumPy scalar as the equal Python number, which takes the array's dtype in arithmetic.

    NumPy 2 keeps a ``np.float64`` scalar's precision, so ``float32_array * np.float64(2)``
    would be float64; a Python float adopts the array's dtype instead.
    """
    return value.item() if hasattr(value, "item") else value


def as_operands(op_name, a, b):
    """Make ``a`` and ``b`` ready for a binary op.

    A scalar takes the dtype of the other operand (``x * 2`` and
    ``x * np.float64(2)`` stay float32 for a float32 ``x``); two arrays must
    already share their dtype, since silent promotion would hide mistakes.
    """
    if _is_scalar(a) and _is_scalar(b):
        raise TypeError(f"{op_name}: at least one operand must be a Tensor or an array")
    if _is_scalar(a):
        a = backend.get_array_module(_raw(b)).asarray(a, dtype=_raw(b).dtype)
    elif _is_scalar(b):
        b = backend.get_array_module(_raw(a)).asarray(b, dtype=_raw(a).dtype)
    da, db = _raw(a).dtype, _raw(b).dtype
    if da != db and "f" in (da.kind, db.kind):
        raise TypeError(f"{op_name}: operand dtypes differ ({da} and {db}); convert one first, "
                        f"e.g. minidet.tensor(array, dtype=numpy.{da})")
    return a, b


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(gy, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(-gy, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        need_a, need_b = self.needs_input_grad
        ga = sum_to(gy * self.b, self.a.shape) if need_a else None
        gb = sum_to(gy * self.a, self.b.shape) if need_b else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        need_a, need_b = self.needs_input_grad
        ga = sum_to(gy / self.b, self.a.shape) if need_a else None
        gb = sum_to(-gy * self.a / (self.b * self.b), self.b.shape) if need_b else None
        return ga, gb


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


class Pow(Function):
    """``x ** exponent`` for a constant (scalar) exponent."""

    def __init__(self, exponent):
        self.exponent = exponent

    def forward(self, x):
        self.x = x
        return x ** self.exponent

    def backward(self, gy):
        if self.exponent == 0:  # x ** 0 is constant; x ** -1 would be inf at x = 0, and 0 * inf is nan
            return gy * 0
        return gy * self.exponent * self.x ** (self.exponent - 1)


class MatMul(Function):
    """``a @ b`` for arrays of two or more dimensions; leading dimensions broadcast."""

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul: both operands need at least 2 dimensions, got shapes {a.shape} and "
                             f"{b.shape}; reshape a vector v to (1, n) or (n, 1) first")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not fit "
                             f"({a.shape[-1]} columns against {b.shape[-2]} rows)")
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        need_a, need_b = self.needs_input_grad
        ga = sum_to(gy @ self.b.swapaxes(-1, -2), self.a.shape) if need_a else None
        gb = sum_to(self.a.swapaxes(-1, -2) @ gy, self.b.shape) if need_b else None
        return ga, gb


def add(a, b):
    return Add()(*as_operands("add", a, b))


def sub(a, b):
    return Sub()(*as_operands("sub", a, b))


def mul(a, b):
    return Mul()(*as_operands("mul", a, b))


def div(a, b):
    return Div()(*as_operands("div", a, b))


def neg(x):
    return Neg()(x)


def pow(x, exponent):
    """``x ** exponent``; the exponent is a Python number."""
    if is_array(exponent) and np.ndim(exponent) > 0:
        raise TypeError("pow: the exponent must be a number, not an array")
    return Pow(as_python_scalar(exponent))(x)


def matmul(a, b):
    """Matrix product of (..., n, k) and (..., k, m) -> (..., n, m)."""
    a, b = as_operands("matmul", a, b)
    return MatMul()(a, b)
