"""The NumPy/CuPy switch: the only module in minidet that imports CuPy.

Every op receives raw arrays and asks ``get_array_module`` which library
they belong to, so one code path serves both the CPU (NumPy) and the GPU
(CuPy). CuPy is optional: without it, everything runs on NumPy.
"""

import numpy as np

try:
    import cupy
    import cupyx
except ImportError:  # the CPU-only install
    cupy = None
    cupyx = None

DEVICES = ("cpu", "cuda")


def cuda_available():
    """True when CuPy is installed and can see a CUDA device."""
    if cupy is None:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:  # a broken driver install counts as "no GPU"
        return False


def is_cupy_array(array):
    return cupy is not None and isinstance(array, cupy.ndarray)


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if any(is_cupy_array(a) for a in arrays):
        return cupy
    return np


def device_of(array):
    """``"cuda"`` for a CuPy array, ``"cpu"`` for anything else."""
    return "cuda" if is_cupy_array(array) else "cpu"


def check_device_name(device):
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    if device == "cuda" and not cuda_available():
        raise RuntimeError(
            "device 'cuda' asked for, but no CUDA GPU is usable: install CuPy with "
            "`pip install minidet[cuda12]` (or [cuda13]) on a machine with an NVIDIA GPU, or use 'cpu'"
        )


def to_device(array, device):
    """Move an array to ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy); no copy if it is already there."""
    check_device_name(device)
    if device == "cpu":
        return to_numpy(array)
    return cupy.asarray(array)


def to_numpy(array):
    """A NumPy array with the same values (copied from the GPU when needed)."""
    if is_cupy_array(array):
        return cupy.asnumpy(array)
    return np.asarray(array)


def check_same_device(op_name, arrays):
    """Raise ``TypeError`` if ``arrays`` mix NumPy and CuPy arrays.

    NumPy would silently try to convert a CuPy array (and fail deep inside), so
    we stop early with a message that names the op and where each input lives.
    """
    devices = [device_of(a) for a in arrays]
    if len(set(devices)) > 1:
        where = ", ".join(f"input {i} on {d}" for i, d in enumerate(devices))
        raise TypeError(
            f"{op_name}: inputs are on different devices ({where}); "
            "move them to one device first, e.g. with tensor.to('cuda') or tensor.to('cpu')"
        )


def index_add(target, index, values):
    """``target[index] += values`` where repeated indices add up (unbuffered), in place."""
    if is_cupy_array(target):
        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


# --- several GPUs: for data-parallel training (minidet/distributed.py) ------------------------------------------------
def use_gpu(index):
    """Make GPU ``index`` (modulo the GPUs this machine has) the one CuPy allocates on and runs on; returns it."""
    index %= cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(index).use()
    return index


def nccl_unique_id():
    """A new NCCL id, to be handed to every worker (by MPI) before they make their communicator."""
    from cupy.cuda import nccl

    return nccl.get_unique_id()


def nccl_communicator(size, unique_id, rank):
    """This worker's end of an NCCL communicator of ``size`` workers, one GPU each."""
    from cupy.cuda import nccl

    return nccl.NcclCommunicator(size, unique_id, rank)


def nccl_sum(communicator, array):
    """Replace the contiguous CuPy ``array`` (float32 or float64) by its sum over the communicator's workers."""
    from cupy.cuda import nccl

    kind = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[array.dtype]
    stream = cupy.cuda.get_current_stream()
    communicator.allReduce(array.data.ptr, array.data.ptr, array.size, kind, nccl.NCCL_SUM, stream.ptr)
    stream.synchronize()
