"""Run the CUDA kernels of ``kernels/*.cu`` on a CPU: the CPU launch harness.

A GPU is not needed to execute a kernel's indexing, loops, shared memory, barriers, warp shuffles and atomics: the
header ``kernels/cpu_harness.h`` gives the host C++ compiler everything CUDA adds to C++ (threadIdx, __shared__,
__syncthreads, the ``*_sync`` warp operations, the atomics), and runs a launch the way a GPU does, one block per
worker thread, the block's threads as fibers that meet at every synchronisation point. It checks what a GPU does
not: mismatched barriers, warp operations that not every lane of their mask reaches, deadlocks (reported with each
thread's file and line instead of hanging), reads of shared memory nobody wrote (it is poisoned before every block),
reads and writes past the end of an argument array (each ends at a no-access guard page: the process stops at once
with the thread, the argument and the source line), argument types against the kernel's C++ signature, the block
size against ``__launch_bounds__`` and the 48 KiB of static shared memory. What it cannot tell is said at the top of
the header: the GPU's math-library rounding, -ftz, the memory model, and speed. Nothing that runs here is a GPU
result.

Use::

    module = cpu_harness.load_module(cuda.kernel_source("focal_loss"), cuda.kernels_dir())
    kernel = module.get_function("focal_loss_with_labels_float32")
    kernel((blocks,), (256,), (logits, labels, weights, np.int32(A), np.int32(K), np.float32(0.25),
                               np.float32(2.0), grad, loss))      # NumPy arrays in place of device arrays

Each launch runs in the order ``schedule`` says ("forward", "reverse" or "random", the last seeded by ``seed``)
with ``poison`` as the byte that fills shared memory; by default they come from the environment variables
MINIDET_HARNESS_SCHEDULE ("random:7" is random with seed 7) and MINIDET_HARNESS_POISON ("0xFF"), else forward and
0xFF. Array arguments are best made with ``device_empty`` (memory that ends at a guard page); any other C-contiguous
NumPy array is copied into such memory for the launch and back afterwards.

Compiling needs g++ with C++20 (GCC 10 or newer) on Linux. The compiled library is kept in a cache folder
(MINIDET_HARNESS_CACHE, else ``~/.cache/minidet/cpu_harness``), keyed by everything that goes into it.
"""

import ctypes
import functools
import hashlib
import math
import mmap
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import weakref

import numpy as np

from minidet import cuda

HEADER = "cpu_harness.h"
# -ffp-contract=off rounds a * b + c twice, as the GPU build's --fmad=false does; -g lets a fault name its source
# line; -fvisibility=hidden keeps each library's names to itself.
GXX_FLAGS = ("-std=c++20", "-O2", "-g", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-ffp-contract=off")
SCHEDULES = ("forward", "reverse", "random")
WORKERS = 4                     # worker threads, each running one block at a time
STACK_BYTES = 64 * 1024         # each GPU thread's stack (a fiber's), above a no-access guard page
GUARD_BYTES = 64 * 1024         # the no-access pages after every device array
MAX_SHARED_BYTES = 48 * 1024    # static __shared__ memory a kernel may declare (a CUDA limit)
MAX_BLOCK = (1024, 1024, 64)    # CUDA's limits on a block's sizes, and on its number of threads:
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)

# The C++ spelling of each NumPy dtype, as CuPy's kernels use it (and cpu_harness.h's type_name gives it).
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.int8): "signed char",
           np.dtype(np.uint8): "unsigned char", np.dtype(np.int16): "short", np.dtype(np.uint16): "unsigned short",
           np.dtype(np.int32): "int", np.dtype(np.uint32): "unsigned int", np.dtype(np.int64): "long long",
           np.dtype(np.uint64): "unsigned long long", np.dtype(np.bool_): "bool"}
# The kernels of a .cu file: extern "C" __global__ void [__launch_bounds__(N)] name(parameters).
KERNEL_PATTERN = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\(([^)]*)\)\s*)?(\w+)\s*'
                            r'\(([^)]*)\)')


class HarnessError(RuntimeError):
    """A launch that a GPU would run wrongly (or not at all): the message says what and where."""


# --- device memory: arrays that end at a guard page -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_PROT_NONE = 0
_guard_pages = {}                # address of a guard page -> its size, for every device array alive


def device_empty(shape, dtype):
    """An uninitialised C-contiguous array whose last byte is followed by GUARD_BYTES of memory that cannot be read
    or written: a kernel that goes past its end stops the process at once (the harness says where)."""
    dtype = np.dtype(dtype)
    count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    nbytes = count * dtype.itemsize
    data_bytes = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    memory = mmap.mmap(-1, data_bytes + GUARD_BYTES)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    if _libc.mprotect(address + data_bytes, GUARD_BYTES, _PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
    _guard_pages[address + data_bytes] = GUARD_BYTES
    weakref.finalize(memory, _guard_pages.pop, address + data_bytes, None)
    # The array ends where the guard starts; it starts nbytes before (aligned: nbytes is a multiple of the
    # itemsize, and so is the page size).
    array = np.frombuffer(memory, dtype=dtype, count=count, offset=data_bytes - nbytes)
    return array.reshape(shape)


def is_device_array(array):
    """True if ``array`` is all of a ``device_empty`` allocation (its end is at a guard page)."""
    return array.flags.c_contiguous and (array.ctypes.data + array.nbytes) in _guard_pages


# --- compiling -----------------------------------------------------------------------------------------------------

def cache_dir():
    return pathlib.Path(os.environ.get("MINIDET_HARNESS_CACHE") or pathlib.Path.home() / ".cache/minidet/cpu_harness")


@functools.cache
def compiler():
    """The path of g++ and its version line; HarnessError if it is missing."""
    gxx = shutil.which("g++")
    if gxx is None:
        raise HarnessError("the CPU launch harness needs g++ (GCC 10 or newer, for C++20): install it, e.g. "
                           "`apt-get install g++`")
    version = subprocess.run([gxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return gxx, version


def kernel_declarations(source):
    """[(name, launch bounds expression or None, [parameter names]), ...] for the kernels of a .cu file's text."""
    kernels = []
    for bounds, name, parameters in KERNEL_PATTERN.findall(source):
        names = [re.search(r"(\w+)\s*$", p.strip()).group(1) for p in parameters.split(",") if p.strip()]
        kernels.append((name, bounds.split(",")[0].strip() or None, names))
    return kernels


def translation_unit(source, name):
    """What g++ compiles: the harness header, the kernel source (its lines named ``name`` in messages, unless it
    names them itself with a #line), and a line per kernel that registers it (with its launch bounds) so the harness
    can look it up by name and check its arguments' types."""
    lines = [f'#include "{HEADER}"', f'#line 1 "{name}"', source, '#line 1 "minidet-cpu-harness-registration"']
    for number, (kernel, bounds, _) in enumerate(kernel_declarations(source)):
        lines.append(f'static const int cuda_cpu_registered_{number} = '
                     f'cuda_cpu::register_kernel("{kernel}", &{kernel}, {bounds or MAX_THREADS_PER_BLOCK});')
    return "\n".join(lines) + "\n"


def build(source, include_dir, name="kernel.cu"):
    """The path of the shared library for this kernel source, compiled on first use and then taken from the cache.
    The key covers the source, every header in ``include_dir``, the harness header, the flags and g++'s version."""
    include_dir = pathlib.Path(include_dir)
    header = pathlib.Path(cuda.kernels_dir()) / HEADER
    gxx, version = compiler()
    unit = translation_unit(source, name)
    key = hashlib.sha256("\0".join([unit, version, " ".join(GXX_FLAGS), header.read_text()]).encode())
    for path in sorted(include_dir.glob("*.cuh")):
        key.update(path.name.encode() + b"\0" + path.read_bytes())
    library = cache_dir() / f"{key.hexdigest()[:24]}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as work:
        unit_path = pathlib.Path(work) / "kernel.cpp"
        unit_path.write_text(unit)
        built = pathlib.Path(work) / "kernel.so"
        result = subprocess.run([gxx, *GXX_FLAGS, f"-I{include_dir}", f"-I{header.parent}", "-o", str(built),
                                 str(unit_path)], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise HarnessError(f"g++ could not compile the kernel for the CPU launch harness:\n{result.stderr}")
        os.replace(built, library)           # atomic: a library in the cache is always complete
    return library


@functools.cache
def load_module(source, include_dir, name="kernel.cu"):
    """The kernels of ``source`` (the text of a .cu file, as ``minidet.cuda.kernel_source`` gives it) compiled for
    the CPU launch harness, headers taken from ``include_dir``: a ``Module``. ``name`` is the file name messages
    give for the source's lines (``kernel_source`` names them itself). Cached per process."""
    return Module(build(source, include_dir, name), kernel_declarations(source))


class Module:
    """A compiled .cu file: ``get_function(name)`` gives one of its kernels."""

    def __init__(self, path, declarations):
        self.path = pathlib.Path(path)
        self.library = ctypes.CDLL(str(path))
        lib = self.library
        lib.cuda_cpu_kernel_name.restype = ctypes.c_char_p
        lib.cuda_cpu_kernel_signature.restype = ctypes.c_char_p
        lib.cuda_cpu_shared_bytes.restype = ctypes.c_long
        lib.cuda_cpu_launch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_ulonglong, ctypes.c_int, ctypes.c_int, ctypes.c_long,
                                        ctypes.c_char_p, ctypes.c_long]
        self.shared_bytes = lib.cuda_cpu_shared_bytes()
        names = {name: parameters for name, _, parameters in declarations}
        self.kernels = {}
        for index in range(lib.cuda_cpu_kernel_count()):
            name = lib.cuda_cpu_kernel_name(index).decode()
            signature = lib.cuda_cpu_kernel_signature(index).decode().split(",")
            self.kernels[name] = Kernel(self, index, name, list(zip(signature, names[name], strict=True)),
                                        lib.cuda_cpu_kernel_max_threads(index))

    def get_function(self, name):
        if name not in self.kernels:
            raise HarnessError(f"no kernel {name!r} in {self.path.name}; it has {', '.join(sorted(self.kernels))}")
        return self.kernels[name]


class _ArgumentArray(ctypes.Structure):     # cuda_cpu::ArgumentArray
    _fields_ = [("begin", ctypes.c_void_p), ("bytes", ctypes.c_size_t), ("guard_bytes", ctypes.c_size_t),
                ("argument", ctypes.c_int)]


def launch_settings(schedule=None, seed=None, poison=None):
    """(schedule, seed, poison): the arguments given, else from MINIDET_HARNESS_SCHEDULE / _POISON, else forward
    and 0xFF."""
    if schedule is None:
        schedule, _, seed_text = os.environ.get("MINIDET_HARNESS_SCHEDULE", "forward").partition(":")
        seed = int(seed_text) if seed is None and seed_text else seed
    if schedule not in SCHEDULES:
        raise HarnessError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)} (random:SEED in "
                           "MINIDET_HARNESS_SCHEDULE)")
    if poison is None:
        poison = int(os.environ.get("MINIDET_HARNESS_POISON", "0xFF"), 0)
    if not 0 <= poison <= 255:
        raise HarnessError(f"poison byte {poison} is not in 0..255")
    return schedule, seed or 0, poison


def _dims(value, what):
    dims = tuple(int(v) for v in (value if isinstance(value, tuple | list) else (value,)))
    if not 1 <= len(dims) <= 3:
        raise HarnessError(f"{what} {value!r}: give 1 to 3 sizes")
    return dims + (1,) * (3 - len(dims))


class Kernel:
    """One kernel of a ``Module``; call it as a ``cupy.RawKernel``: ``kernel(grid, block, args)``."""

    def __init__(self, module, index, name, parameters, max_threads):
        self.module, self.index, self.name = module, index, name
        self.parameters = parameters          # [(C++ type, name), ...]
        self.max_threads = max_threads        # __launch_bounds__, or 1024

    def _check_launch(self, grid, block):
        threads = math.prod(block)
        if min(grid) < 1 or any(g > limit for g, limit in zip(grid, MAX_GRID)):
            raise HarnessError(f"{self.name}: grid {grid}: each size must be at least 1 and at most {MAX_GRID}")
        if min(block) < 1 or any(b > limit for b, limit in zip(block, MAX_BLOCK)) or threads > MAX_THREADS_PER_BLOCK:
            raise HarnessError(f"{self.name}: block {block}: sizes must be 1 to {MAX_BLOCK} and at most "
                               f"{MAX_THREADS_PER_BLOCK} threads in all")
        if threads > self.max_threads:
            raise HarnessError(f"{self.name}: launched with {threads} threads per block, but its __launch_bounds__ "
                               f"allows at most {self.max_threads} (a GPU refuses such a launch)")
        if self.module.shared_bytes > MAX_SHARED_BYTES:
            raise HarnessError(f"{self.module.path.name}: its kernels declare {self.module.shared_bytes} bytes of "
                               f"__shared__ memory together; a kernel may have at most {MAX_SHARED_BYTES} bytes of "
                               "static shared memory (the harness cannot tell which kernel declares which: keep a "
                               "file's kernels under the limit together)")

    def _argument(self, number, value, c_type, name):
        """(ctypes object holding the value, (array, pointer argument) or None) for argument ``number``."""
        where = f"{self.name}: argument {number} ({name})"
        if c_type.endswith("*"):
            pointee = c_type.removeprefix("const ").removesuffix("*")
            if not isinstance(value, np.ndarray):
                raise HarnessError(f"{where} is a {type(value).__name__}; the kernel's parameter is {c_type}: pass an "
                                   "array")
            if C_TYPES.get(value.dtype) != pointee:
                raise HarnessError(f"{where} is an array of {value.dtype}, but the kernel's parameter is {c_type}: "
                                   f"the kernel would read its bytes as {pointee} (convert it, e.g. "
                                   f"ascontiguousarray(x, dtype=...))")
            if not value.flags.c_contiguous:
                raise HarnessError(f"{where} is not C-contiguous: the kernel would read its memory as if it were; "
                                   "pass ascontiguousarray(x)")
            return ctypes.c_void_p(value.ctypes.data), value
        if c_type == "unsupported":
            raise HarnessError(f"{where}: the harness does not know this parameter's C++ type")
        if not isinstance(value, bool | int | float | np.generic):     # a 0-d array is not a scalar either
            raise HarnessError(f"{where} is a {type(value).__name__}; the kernel's parameter is {c_type}: pass a "
                               f"NumPy scalar")
        # A Python scalar goes to the kernel as CuPy passes it: bool as bool, float as double, int as long long.
        given = value if isinstance(value, np.generic) else np.asarray(value, {bool: np.bool_, int: np.int64,
                                                                               float: np.float64}[type(value)])[()]
        if C_TYPES.get(given.dtype) != c_type:
            python = f"a Python {type(value).__name__}, which a launch passes as " if not isinstance(
                value, np.generic) else "a "
            raise HarnessError(
                f"{where} is {python}{C_TYPES.get(given.dtype, given.dtype)} ({given.dtype.itemsize} bytes), but the "
                f"kernel's parameter is {c_type}: on a GPU the kernel would read those bytes as {c_type}, garbage; "
                f"pass numpy.{np.dtype(next(d for d, t in C_TYPES.items() if t == c_type)).name}(...)")
        return ctypes.create_string_buffer(given.tobytes(), given.dtype.itemsize), None

    def __call__(self, grid, block, args, *, schedule=None, seed=None, poison=None, workers=WORKERS):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        self._check_launch(grid, block)
        if len(args) != len(self.parameters):
            raise HarnessError(f"{self.name} takes {len(self.parameters)} arguments "
                               f"({', '.join(n for _, n in self.parameters)}), got {len(args)}")
        schedule, seed, poison = launch_settings(schedule, seed, poison)
        values, arrays, copied_back = [], [], []
        for number, (value, (c_type, name)) in enumerate(zip(args, self.parameters)):
            holder, array = self._argument(number, value, c_type, name)
            if array is not None:
                if not is_device_array(array):          # copied into guarded memory for the launch, and back
                    device = device_empty(array.shape, array.dtype)
                    device[...] = array
                    if not c_type.startswith("const "):
                        copied_back.append((array, device))
                    array = device
                    holder = ctypes.c_void_p(array.ctypes.data)
                arrays.append(_ArgumentArray(array.ctypes.data, array.nbytes, _guard_pages[array.ctypes.data +
                                                                                           array.nbytes], number))
            values.append((holder, array))
        pointers = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(h) for h, _ in values])
        names = (ctypes.c_char_p * max(len(values), 1))(*[n.encode() for _, n in self.parameters])
        array_table = (_ArgumentArray * max(len(arrays), 1))(*arrays)
        error = ctypes.create_string_buffer(16384)
        failed = self.module.library.cuda_cpu_launch(
            self.index, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), pointers, names, array_table,
            len(arrays), SCHEDULES.index(schedule), seed, poison, workers, STACK_BYTES, error, len(error))
        if failed:
            raise HarnessError(error.value.decode())
        for array, device in copied_back:
            array[...] = device
