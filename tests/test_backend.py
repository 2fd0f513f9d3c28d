"""The NumPy/CuPy switch: one module imports CuPy, and mixing devices fails clearly."""

import pathlib
import re

import numpy as np
import pytest

import minidet as md
import minidet.functional as F
from minidet import backend

PACKAGE = pathlib.Path(md.__file__).parent


def test_only_backend_imports_cupy():
    pattern = re.compile(r"^\s*(import|from)\s+cupy", re.MULTILINE)
    importers = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert importers == ["backend.py"]


def test_numpy_arrays_use_numpy():
    assert backend.get_array_module(np.ones(2)) is np
    assert backend.device_of(np.ones(2)) == "cpu"


def test_cuda_unavailable_is_reported_not_crashed():
    if backend.cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA GPU is usable"):
        md.tensor([1.0]).to("cuda")


class FakeCudaArray:
    """Stands in for a CuPy array on machines without one: only the device check looks at it."""


def test_mixing_devices_names_the_op_and_both_devices(monkeypatch):
    monkeypatch.setattr(backend, "is_cupy_array", lambda a: isinstance(a, FakeCudaArray))
    with pytest.raises(TypeError, match=r"conv: inputs are on different devices \(input 0 on cpu, "
                                        r"input 1 on cuda\); move them"):
        backend.check_same_device("conv", [np.ones(1), FakeCudaArray()])


@pytest.mark.gpu
def test_mixing_numpy_and_cupy_in_an_op_raises_type_error():
    if not backend.cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    a = md.tensor(np.ones(3, np.float32))
    b = md.tensor(np.ones(3, np.float32), device="cuda")
    with pytest.raises(TypeError, match="Add: inputs are on different devices"):
        a + b


def test_conv2d_explains_bad_shapes():
    x = md.tensor(np.ones((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"input has 3 channels and weight \(4, 2, 3, 3\)"):
        F.conv2d(x, np.ones((4, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"input must be \(N, C, H, W\)"):
        F.conv2d(md.tensor(np.ones((3, 8, 8), np.float32)), np.ones((4, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        F.conv2d(md.tensor(np.ones((1, 3, 2, 2), np.float32)), np.ones((4, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match=r"conv2d: input, weight and bias must share one dtype"):
        F.conv2d(x, np.ones((4, 3, 3, 3), np.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        F.conv2d(x, np.ones((4, 3, 3, 3), np.float32), np.ones(3, np.float32))


def test_shape_errors_are_explained():
    a = md.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(2, 3\) do not fit"):
        a @ a
    with pytest.raises(ValueError, match="only mode='nearest'"):
        F.interpolate(md.tensor(np.ones((1, 1, 2, 2))), scale_factor=2, mode="bilinear")
    with pytest.raises(ValueError, match="not a whole multiple"):
        F.interpolate(md.tensor(np.ones((1, 1, 2, 2))), size=(3, 4))
    with pytest.raises(ValueError, match="cannot be split into 3 groups"):
        F.group_norm(md.tensor(np.ones((1, 4, 2, 2))), 3)
    with pytest.raises(ValueError, match="more than one value per channel"):
        F.batch_norm(md.tensor(np.ones((1, 4))), None, None, training=True)
    with pytest.raises(TypeError, match="dtype"):
        F.cat([md.tensor(np.ones(2, np.float32)), md.tensor(np.ones(2))])


def test_bad_dimensions_are_explained():
    x = md.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"permute: \(2, 1\) is not a permutation of the 2 dimensions"):
        F.permute(x, (2, 1))
    with pytest.raises(ValueError, match="transpose: dimensions 0 and 5 do not both exist"):
        F.transpose(x, 0, 5)
