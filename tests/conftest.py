"""Shared fixtures: ``xp`` runs a test once on NumPy and once on CuPy (the latter marked ``gpu``)."""

import numpy as np
import pytest

from minidet import backend


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module a test runs on. The CuPy run skips where no CUDA GPU is usable."""
    if request.param == "numpy":
        return np
    if not backend.cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    return backend.cupy


@pytest.fixture
def rng():
    return np.random.default_rng(0)
