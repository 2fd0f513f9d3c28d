"""Shared fixtures: ``xp`` runs a test once on NumPy and once on CuPy (the latter marked ``gpu``); ``torchvision``
gives torchvision's Python code as an oracle, even on a CPU-only torch (see tests/torchvision_cpu.py)."""

import importlib.util
import os

import cupy_on_cpu
import numpy as np
import pytest
import torchvision_cpu

# MINIDET_TEST_CUPY=cpu-harness: "cupy" is the stand-in of tests/cupy_on_cpu.py, so the gpu-marked tests launch
# the kernels on the CPU launch harness. It must be in place before minidet imports cupy.
CUPY_STAND_IN = os.environ.get("MINIDET_TEST_CUPY") == "cpu-harness"
if CUPY_STAND_IN:
    cupy_on_cpu.install()

from minidet import backend  # noqa: E402 (after the stand-in)


def pytest_report_header(config):
    if CUPY_STAND_IN:
        return ("cupy: the stand-in of tests/cupy_on_cpu.py; kernels run on the CPU launch harness, not on a GPU "
                f"(schedule {os.environ.get('MINIDET_HARNESS_SCHEDULE', 'forward')}, poison "
                f"{os.environ.get('MINIDET_HARNESS_POISON', '0xFF')})")
    return None


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


@pytest.fixture(scope="session")
def torchvision():
    """The ``torchvision`` module, imported by ``torchvision_cpu.import_torchvision``: as is where its compiled ops
    load, with a Python ``nms`` in their place on a CPU-only torch. Skips where torch or torchvision is not
    installed; an installed torchvision that cannot be imported even so is an error, not a skip."""
    for name in ("torch", "torchvision"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (the torchvision reference tests need torch and torchvision)")
    return torchvision_cpu.import_torchvision()
