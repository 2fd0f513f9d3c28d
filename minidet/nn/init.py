"""Parameter initialisation, from one seedable random generator (``minidet.manual_seed``)."""

import math

import numpy as np

_rng = np.random.default_rng()


def manual_seed(seed):
    """Make every later initialisation reproducible."""
    global _rng
    _rng = np.random.default_rng(seed)


def uniform(shape, bound, dtype=np.float32):
    return _rng.uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, std, dtype=np.float32):
    return (_rng.standard_normal(size=shape) * std).astype(dtype)


def conv_default(shape):
    """PyTorch's default for conv weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C/groups * KH * KW."""
    fan_in = math.prod(shape[1:])
    return uniform(shape, 1 / math.sqrt(fan_in))
