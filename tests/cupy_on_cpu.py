"""A CuPy stand-in for tests: CuPy's names over NumPy, with kernels launched by the CPU launch harness.

``install()`` puts this module in ``sys.modules`` as ``cupy`` (and a small ``cupyx``) before minidet is imported;
tests/conftest.py does that when MINIDET_TEST_CUPY=cpu-harness. Then ``minidet/cuda.py`` runs unchanged:
``RawModule`` compiles a ``.cu`` file for the harness (minidet.cpu_harness) and ``RawKernel`` launches through it,
and the ``gpu``-marked kernel tests compare the launches with the NumPy references as they would on a GPU.

Arrays are NumPy arrays of the subclass ``ndarray`` below, so ``isinstance(x, cupy.ndarray)`` tells them from
host arrays and NumPy's functions keep them "on the device". ``empty``, ``zeros``, ``full``, ``asarray`` and
``ascontiguousarray`` put them in memory that ends at a guard page (``cpu_harness.device_empty``). Everything else
is NumPy's function, its array results viewed as this ``ndarray``, held to two of CuPy's rules that NumPy does not
have: a function or operator given a host (NumPy) array raises TypeError, as CuPy's do (only ``asarray``,
``array`` and ``from_dlpack`` copy one to the device), and an element or a reduction is a 0-d device array, not
a host scalar. ``lib.stride_tricks.as_strided`` has CuPy's signature (no ``writeable``).

Nothing that runs through this stand-in is a GPU result: it proves the launch (indexing, shared memory, barriers,
shuffles, atomics, the launch configuration), not the GPU's rounding or speed.
"""

import sys
import types

import numpy as np

__all__ = ["install"]

TAKE_HOST_ARRAYS = {"array", "from_dlpack"}   # the functions of CuPy that copy a NumPy array to the device
IS_STAND_IN = True                      # what tests look at to say where they ran
MULTIPROCESSORS = 4                     # the pretend GPU: 4 multiprocessors of 2 resident blocks each, so
BLOCKS_PER_MULTIPROCESSOR = 2           # minidet's "one wave" launches are 8 blocks


class ndarray(np.ndarray):  # noqa: N801 (CuPy's name)
    """An array "on the device"."""

    def get(self):
        return np.array(self)

    def __getitem__(self, index):
        # An element is a 0-d array on the device in CuPy, where NumPy gives a host scalar.
        result = super().__getitem__(index)
        return result if isinstance(result, np.ndarray) else np.asarray(result).view(ndarray)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # Operators and ufuncs: CuPy's rule on host arrays; NumPy's arithmetic; a reduction's scalar as a 0-d array.
        checked = inputs
        inputs = tuple(_host_view(x) for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_host_view(x) for x in kwargs["out"])
        result = _called_as_cupy(ufunc.__name__, getattr(ufunc, method), inputs, kwargs, checked)
        if isinstance(result, np.generic):
            return np.asarray(result).view(ndarray)
        return _on_device(result)

    def __array_function__(self, function, types, args, kwargs):
        return _called_as_cupy(function.__name__, super().__array_function__, (function, types, args, kwargs), {},
                               checked=[*args, *kwargs.values()])


def _host_view(array):
    return array.view(np.ndarray) if isinstance(array, ndarray) else array


_calls_in_progress = 0      # how deep in the stand-in's own NumPy calls we are: only the outermost one is checked


def _called_as_cupy(name, function, args, kwargs, checked=None):
    """``function(*args, **kwargs)``, after the outermost call's arguments (or ``checked``) pass CuPy's rule. NumPy's
    own code inside (zeros_like copies a host array into its result, say) is not held to it."""
    global _calls_in_progress
    if _calls_in_progress == 0:
        _refuse_host_arrays(name, [*args, *kwargs.values()] if checked is None else checked)
    _calls_in_progress += 1
    try:
        return function(*args, **kwargs)
    finally:
        _calls_in_progress -= 1


def _refuse_host_arrays(name, arguments):
    """CuPy's rule: its functions and operators take device arrays and scalars, and raise TypeError for a NumPy
    array (there is no implicit copy to the device), as a list item too."""
    for argument in arguments:
        for value in argument if isinstance(argument, (list, tuple)) else (argument,):
            if isinstance(value, np.ndarray) and not isinstance(value, ndarray) and value.ndim > 0:
                raise TypeError(f"cupy.{name}: an argument is a NumPy (host) array; CuPy takes device arrays, "
                                "so copy it first with cupy.asarray")


def _harness():
    # Imported when first needed: minidet (which imports cupy) must not be imported before install().
    from minidet import cpu_harness
    return cpu_harness


def _device(array):
    """A device copy of ``array``, in guarded memory."""
    array = np.asarray(array)
    device = _harness().device_empty(array.shape, array.dtype)
    device[...] = array
    return device.view(ndarray)


def empty(shape, dtype=float, order="C"):
    return _harness().device_empty(shape if isinstance(shape, tuple) else (shape,), dtype).view(ndarray)


def zeros(shape, dtype=float, order="C"):
    array = empty(shape, dtype)
    array[...] = 0
    return array


def full(shape, fill_value, dtype=None, order="C"):
    array = empty(shape, dtype if dtype is not None else np.asarray(fill_value).dtype)
    array[...] = fill_value
    return array


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype):
        return a
    return _device(np.asarray(a, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a
    return _device(np.ascontiguousarray(a, dtype=dtype))


def asnumpy(a):
    return np.array(a)


def _as_strided(x, shape=None, strides=None):   # CuPy's signature: no ``subok``, no ``writeable``
    return np.lib.stride_tricks.as_strided(x, shape, strides, subok=True)


lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(as_strided=_as_strided))


def _on_device(result):
    if isinstance(result, np.ndarray) and not isinstance(result, ndarray):
        return result.view(ndarray)
    if isinstance(result, tuple):
        return tuple(_on_device(r) for r in result)
    return result


def __getattr__(name):
    """Any other name: NumPy's, with array results "on the device"."""
    value = getattr(np, name)
    if callable(value) and not isinstance(value, type):
        def on_device(*args, **kwargs):
            return _on_device(_called_as_cupy(name, value, args, kwargs, None if name not in TAKE_HOST_ARRAYS else []))
        return on_device
    return value


# --- cupy.RawModule, cupy.RawKernel -------------------------------------------------------------------------------

class RawKernel:
    def __init__(self, kernel):
        self._kernel = kernel
        self.kernel = types.SimpleNamespace(ptr=id(kernel))   # what occupancy queries take

    def __call__(self, grid, block, args, shared_mem=0):
        if shared_mem:
            raise _harness().HarnessError("dynamic shared memory is not supported by the CPU launch harness")
        for number, value in enumerate(args):
            if isinstance(value, np.ndarray) and not isinstance(value, ndarray):
                raise TypeError(f"argument {number} of {self._kernel.name} is a host (NumPy) array; a kernel takes "
                                "device arrays (cupy.asarray)")
        self._kernel(grid, block, args)


class RawModule:
    def __init__(self, code=None, options=(), path=None):
        if code is None:
            raise _harness().HarnessError("the stand-in compiles CUDA source only (RawModule(code=...))")
        include = [option[2:] for option in options if option.startswith("-I")]
        self._module = _harness().load_module(code, include[-1] if include else ".")

    def get_function(self, name):
        return RawKernel(self._module.get_function(name))


# --- cupy.cuda -----------------------------------------------------------------------------------------------------

class Device:
    def __init__(self, device=0):
        self.id = device
        self.attributes = {"MultiProcessorCount": MULTIPROCESSORS}
        self.compute_capability = "cpu-harness"


cuda = types.SimpleNamespace(
    is_available=lambda: True,
    Device=Device,
    driver=types.SimpleNamespace(
        occupancyMaxActiveBlocksPerMultiprocessor=lambda function, block_size, shared: BLOCKS_PER_MULTIPROCESSOR),
)


def _scatter_add(target, index, values):
    np.add.at(target, index, values)


cupyx = types.ModuleType("cupyx")
cupyx.scatter_add = _scatter_add


def install():
    """Make ``import cupy`` (and ``import cupyx``) give this stand-in. Call before minidet is imported."""
    if "minidet.backend" in sys.modules:
        raise RuntimeError("install the CuPy stand-in before minidet is imported")
    sys.modules["cupy"] = sys.modules[__name__]
    sys.modules["cupyx"] = cupyx
