"""Checks used by the tests and the tutorials: ``gradcheck`` and ``assert_close``."""

import numpy as np

from minidet import backend
from minidet.autograd import Tensor


class GradcheckError(AssertionError):
    pass


def _loss(fn, tensors, upstream):
    """sum(fn(*tensors) * upstream) as a float: the scalar whose gradient backward computes."""
    out = fn(*tensors)
    return float((out.data * upstream).sum())


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, max_elements=2000, seed=0, name=None):
    """Compare ``fn``'s backward with central finite differences, in float64.

    Args:
        fn: takes one Tensor per input and returns a Tensor.
        inputs: float64 arrays (NumPy or CuPy); each is checked.
        eps: the finite-difference step.
        atol, rtol: an element passes when |analytic - numeric| <= atol + rtol * |numeric|.
        max_elements: check at most this many elements of each input, chosen at random
            (None checks every element). Each element costs two calls of ``fn``.
        seed: for the random upstream gradient and the sampling.
        name: what to call ``fn`` in the failure message (default: its ``__name__``).

    The output is multiplied by a random upstream gradient before summing, so a
    backward that forgets to multiply by its incoming gradient fails.
    Returns True, or raises ``GradcheckError`` naming the input, the index and both values.
    """
    name = name or getattr(fn, "__name__", "fn")
    for i, x in enumerate(inputs):
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck({name}): input {i} is {x.dtype}; gradients are checked in float64")
    xp = backend.get_array_module(*inputs)
    rng = np.random.default_rng(seed)
    tensors = [Tensor(x.copy(), requires_grad=True) for x in inputs]
    out = fn(*tensors)
    upstream = xp.asarray(rng.standard_normal(out.shape))
    out.backward(upstream)

    for i, t in enumerate(tensors):
        analytic = backend.to_numpy(t.grad if t.grad is not None else xp.zeros_like(t.data))
        flat = t.data.reshape(-1)  # a view: writing to it perturbs the input
        indices = np.arange(flat.size)
        if max_elements is not None and flat.size > max_elements:
            indices = rng.choice(flat.size, max_elements, replace=False)
        for j in indices:
            original = float(flat[j])
            flat[j] = original + eps
            plus = _loss(fn, tensors, upstream)
            flat[j] = original - eps
            minus = _loss(fn, tensors, upstream)
            flat[j] = original
            numeric = (plus - minus) / (2 * eps)
            a = analytic.reshape(-1)[j]
            if not abs(a - numeric) <= atol + rtol * abs(numeric):
                index = np.unravel_index(j, t.shape)
                raise GradcheckError(
                    f"gradcheck({name}): input {i} (shape {t.shape}), index {tuple(int(k) for k in index)}: "
                    f"numeric {numeric:.8g}, analytic {a:.8g}, difference {a - numeric:.3g}")
    return True


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|: the error relative to the size of the values."""
    actual, expected = (backend.to_numpy(a.data if isinstance(a, Tensor) else a).astype(np.float64)
                        for a in (actual, expected))
    scale = np.abs(expected).max() if expected.size else 0.0
    return float(np.abs(actual - expected).max() / scale) if scale else float(np.abs(actual).max(initial=0.0))


def assert_close(actual, expected, rtol=1e-5, name="value"):
    """Raise AssertionError unless shapes match and ``relative_error(actual, expected) <= rtol``."""
    a_shape = tuple(actual.shape)
    if a_shape != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {a_shape}, expected {tuple(expected.shape)}")
    error = relative_error(actual, expected)
    if not error <= rtol:
        raise AssertionError(f"{name}: relative error {error:.3g} exceeds {rtol:.3g}")
