"""Element-wise functions: exp, log, relu, sigmoid, softplus, log-sigmoid, clamp.

The sigmoid family is written so that no intermediate overflows for large
logits (|x| = 100 is routine for a confident detector): every exponential is
``exp(-|x|)``, which lies in (0, 1].
"""

from minidet.autograd import Function
from minidet.backend import get_array_module
from minidet.functional.arithmetic import as_python_scalar


def stable_sigmoid(x):
    """sigmoid(x) = 1 / (1 + exp(-x)) without overflow, and ``exp(-|x|)`` for reuse.

    For x >= 0 use 1 / (1 + e); for x < 0 the equal form e / (1 + e), with
    e = exp(-|x|) in both, so exp never sees a large positive argument.
    """
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1, e) / (1 + e), e


def stable_softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)); exact for large |x|, no overflow."""
    xp = get_array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


class Exp(Function):
    def forward(self, x):
        self.y = get_array_module(x).exp(x)
        return self.y

    def backward(self, gy):
        return gy * self.y


class Log(Function):
    def forward(self, x):
        self.x = x
        return get_array_module(x).log(x)

    def backward(self, gy):
        return gy / self.x


class ReLU(Function):
    def forward(self, x):
        self.positive = x > 0
        return get_array_module(x).maximum(x, 0)    # not x * positive: multiplying by a mask is a slower pass

    def backward(self, gy):
        return gy * self.positive  # the gradient at exactly 0 is taken as 0, as in PyTorch


class Sigmoid(Function):
    def forward(self, x):
        y, self.e = stable_sigmoid(x)
        return y

    def backward(self, gy):
        # sigmoid'(x) = p (1 - p) = e / (1 + e)^2 with e = exp(-|x|): accurate at both ends,
        # where p (1 - p) would lose 1 - p to rounding.
        return gy * self.e / (1 + self.e) ** 2


class SiLU(Function):
    """x * sigmoid(x) (also called swish), EfficientNet's activation: smooth, and negative just below 0."""

    def forward(self, x):
        self.x = x
        self.p, _ = stable_sigmoid(x)
        return x * self.p

    def backward(self, gy):
        # d/dx x p(x) = p + x p (1 - p) = p (1 + x (1 - p))
        return gy * self.p * (1 + self.x * (1 - self.p))


class Softplus(Function):
    def forward(self, x):
        self.x = x
        return stable_softplus(x)

    def backward(self, gy):
        return gy * stable_sigmoid(self.x)[0]


class Clamp(Function):
    def __init__(self, min, max):
        self.min, self.max = min, max

    def forward(self, x):
        xp = get_array_module(x)
        self.inside = xp.ones(x.shape, dtype=bool)
        if self.min is not None:
            self.inside &= x >= self.min
        if self.max is not None:
            self.inside &= x <= self.max
        return xp.clip(x, self.min, self.max).astype(x.dtype, copy=False)

    def backward(self, gy):
        return gy * self.inside  # gradient passes where the value was not clipped (bounds included)


def exp(x):
    return Exp()(x)


def log(x):
    return Log()(x)


def relu(x):
    return ReLU()(x)


def sigmoid(x):
    return Sigmoid()(x)


def silu(x):
    """x * sigmoid(x), as ``torch.nn.functional.silu``."""
    return SiLU()(x)


def softplus(x):
    """log(1 + exp(x)), computed stably."""
    return Softplus()(x)


def logsigmoid(x):
    """log(sigmoid(x)) = -softplus(-x): never log(0), even for x = -100."""
    return -Softplus()(-x)


def clamp(x, min=None, max=None):
    if min is None and max is None:
        raise ValueError("clamp: give min, max or both")
    return Clamp(as_python_scalar(min), as_python_scalar(max))(x)
