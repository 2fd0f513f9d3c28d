"""The hand-written CUDA kernels: where their sources are, how they are compiled, and how they are launched.

The kernels live in ``kernels/*.cu`` at the top of the repository (with their arithmetic in ``kernels/*.cuh``),
installed as the package ``minidet.kernels`` (see setup.py). Each ``.cu`` file is compiled once per process, the
first time one of its kernels is needed, with CuPy's ``RawModule`` (which runs NVRTC, the CUDA compiler that
works at run time) for the GPU at hand.

The launchers below take CuPy arrays and return CuPy arrays, with the same signatures and outputs as the NumPy
references they replace (``minidet.functional.loss.focal_loss_with_labels_reference`` and
``minidet.matching.match_anchors_batch``). Those ops call them when their inputs are CuPy arrays; nothing else in
minidet calls them. This module never imports CuPy itself: it uses ``backend.cupy``.
"""

import functools
import hashlib
import importlib.util
import math
import pathlib

import numpy as np

from minidet import backend

# Threads per block; the kernels are written for exactly this many (their BLOCK_SIZE).
BLOCK_SIZE = 256

# Compiler options, the same for NVRTC here and for nvcc in tests/test_kernels.py (both accept these spellings):
# - no fused multiply-add (--fmad=false), exact division and square root: every operation is rounded as written, as
#   NumPy rounds it, so the IoUs have the same bits as minidet.boxes.box_iou;
# - C++17, and the kernels folder on the include path for the .cuh headers (added in compile_options()).
COMPILE_OPTIONS = ("-std=c++17", "--fmad=false", "--prec-div=true", "--prec-sqrt=true")
# What CuPy appends to the options of every kernel it compiles (cupy/cuda/compiler.py), after ours, so it wins over
# any --ftz=false of ours: float32 values below the smallest normal number, 1.2e-38 ("denormals"), are read and
# written as 0. NumPy keeps them. No IoU of boxes measured in pixels comes near such a value, so the IoUs still
# agree bit for bit; in the focal loss, logits beyond -+87 give denormal terms that the GPU flushes to 0, an
# absolute difference below 1.2e-38. (float64 has no such mode.) The compile test in tests/test_kernels.py passes it
# to nvcc too, to compile what CuPy compiles.
CUPY_APPENDED_OPTIONS = ("-ftz=true",)


# The versions of each kernel a learner can compare (kernels/<file>.cu; each file says what it changes from the
# previous one). The launchers take the newest by default, the one minidet uses; benchmarks/bench_kernels.py
# --version N times the others.
FOCAL_LOSS_VERSIONS = {1: "focal_loss_v1", 2: "focal_loss_v2", 3: "focal_loss"}
MATCHING_VERSIONS = {1: "iou_match_v1", 2: "iou_match"}
FOCAL_LOSS_VERSION = max(FOCAL_LOSS_VERSIONS)
MATCHING_VERSION = max(MATCHING_VERSIONS)


def kernels_dir():
    """The folder with the ``.cu`` and ``.cuh`` files.

    Installed (``pip install .``) or editable (``pip install -e .``): the package ``minidet.kernels``. Running from
    a source checkout with ``PYTHONPATH=.`` and no install, that package cannot be imported (the folder is
    ``kernels/`` at the top, not inside ``minidet/``): then the checkout's ``kernels/``.
    """
    try:
        spec = importlib.util.find_spec("minidet.kernels")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (pathlib.Path(location) / "focal_loss.cu").is_file():
                return pathlib.Path(location)
    checkout = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if (checkout / "focal_loss.cu").is_file():
        return checkout
    raise FileNotFoundError("minidet: the CUDA kernel sources (focal_loss.cu, ...) are neither in the installed "
                            f"package minidet.kernels nor in {checkout}; reinstall minidet (pip install .)")


def compile_options(directory=None):
    """The options ``RawModule`` (NVRTC) gets: ``COMPILE_OPTIONS`` and ``-I`` the kernels folder."""
    return COMPILE_OPTIONS + ("-I" + str(directory or kernels_dir()),)


def kernel_source(name, directory=None):
    """The text compiled for ``kernels/<name>.cu``.

    It is the file with two additions in front. A ``#line 1 "<path>"`` line, so that compiler messages name the
    real file and its lines. Before it, a comment with a hash of every ``.cuh`` header: CuPy keeps compiled kernels
    in a cache on disk (``~/.cupy/kernel_cache``) keyed by the source text and the options, which do not change
    when only an included header does; the hash makes an edited header give a new key, hence a fresh compile.
    """
    directory = pathlib.Path(directory or kernels_dir())
    path = directory / f"{name}.cu"
    headers = hashlib.sha256()
    for header in sorted(directory.glob("*.cuh")):
        headers.update(header.name.encode() + b"\0" + header.read_bytes())
    return (f"// minidet kernel headers: sha256 {headers.hexdigest()}\n"
            f'#line 1 "{path.as_posix()}"\n' + path.read_text(encoding="utf-8"))


@functools.cache
def load_module(name):
    """The compiled ``kernels/<name>.cu``, a ``cupy.RawModule``: compiled on first use, then cached for the process."""
    directory = kernels_dir()
    return backend.cupy.RawModule(code=kernel_source(name, directory), options=compile_options(directory))


@functools.cache
def get_kernel(module_name, kernel_name):
    """The kernel ``kernel_name`` of ``kernels/<module_name>.cu``, a ``cupy.RawKernel`` (looked up once)."""
    return load_module(module_name).get_function(kernel_name)


@functools.cache
def resident_blocks(module_name, kernel_name, device_id):
    """How many blocks of BLOCK_SIZE threads of this kernel the whole GPU runs at once: the blocks one
    multiprocessor can hold (limited by the registers and shared memory the compiled kernel needs), times the
    number of multiprocessors."""
    cupy = backend.cupy
    kernel = get_kernel(module_name, kernel_name)
    per_multiprocessor = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, BLOCK_SIZE, 0)
    return max(1, per_multiprocessor) * cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def _module_of(versions, version):
    if version not in versions:
        raise ValueError(f"kernel version {version!r}: there are versions {', '.join(map(str, versions))}")
    return versions[version]


def _scalar_type(dtype):
    """The NumPy scalar type a kernel argument of this float dtype needs, and the kernel name's suffix."""
    if dtype == np.float32:
        return np.float32, "float32"
    if dtype == np.float64:
        return np.float64, "float64"
    raise TypeError(f"minidet CUDA kernels take float32 or float64 arrays, got {dtype}")


# --- focal loss ----------------------------------------------------------------------------------------------------

def focal_loss_with_labels(logits, labels, weights, alpha, gamma, version=FOCAL_LOSS_VERSION):
    """The CUDA kernel behind ``focal_loss_with_labels_reference`` (same arguments and results, on CuPy arrays).

    Args:
        logits: (A, K) float32 or float64 CuPy array.
        labels: (A,) integer CuPy array: class 0..K-1, -1 background, -2 ignored (converted to int32).
        weights: (A,) CuPy array, converted to the dtype of ``logits``.
        alpha, gamma: numbers.
        version: which kernel (FOCAL_LOSS_VERSIONS); the newest by default.

    Returns:
        loss: 0-d array, sum over a, k of weights[a] * FL(logits[a, k], labels[a] == k); grad: (A, K), its gradient.
    """
    module = _module_of(FOCAL_LOSS_VERSIONS, version)
    cupy = backend.cupy
    scalar, suffix = _scalar_type(logits.dtype)
    num_anchors, num_classes = logits.shape
    if num_anchors * num_classes >= 2**31:
        raise ValueError(f"focal loss kernel: {num_anchors} x {num_classes} logits; the kernel indexes with 32-bit "
                         "integers and takes fewer than 2^31 (split the batch)")
    loss = cupy.zeros((), dtype=logits.dtype)          # the kernel adds each block's sum to it
    grad = cupy.empty(logits.shape, dtype=logits.dtype)
    if num_anchors * num_classes == 0:
        return loss, grad
    name = f"focal_loss_with_labels_{suffix}"
    kernel = get_kernel(module, name)
    blocks = math.ceil(num_anchors * num_classes / BLOCK_SIZE)          # version 1: a thread per logit
    if version > 1:
        # One wave of blocks: as many as the GPU runs at once (a few hundred), each thread looping over its share
        # of the elements. More blocks would only wait for a free multiprocessor, and a last, partly filled wave
        # would leave some idle at the end.
        blocks = min(blocks, resident_blocks(module, name, cupy.cuda.Device().id))
    kernel((blocks,), (BLOCK_SIZE,),
           (cupy.ascontiguousarray(logits), cupy.ascontiguousarray(labels, dtype=cupy.int32),
            cupy.ascontiguousarray(weights, dtype=logits.dtype), np.int32(num_anchors), np.int32(num_classes),
            scalar(alpha), scalar(gamma), grad, loss))
    return loss, grad


# --- IoU matching --------------------------------------------------------------------------------------------------

def match_anchors_batch(anchors, boxes, counts, high, low, allow_low_quality_matches,
                        version=MATCHING_VERSION, match_zero_iou=False):
    """The CUDA kernels behind ``minidet.matching.match_anchors_batch`` (same results, on CuPy arrays).

    Args:
        anchors: (A, 4) float32 or float64 CuPy array.
        boxes: (B, Gmax, 4), converted to the dtype of ``anchors``; slots at and after counts[b] are never read.
        counts: (B,) integers, 0 <= counts[b] <= Gmax (the caller checks).
        high, low: the thresholds, rounded to the dtype of ``anchors`` as the reference does.
        allow_low_quality_matches: promote each box's best anchors (a second launch).
        version: which kernels (MATCHING_VERSIONS); the newest by default.
        match_zero_iou: also let a box that no anchor overlaps promote its "best" (IoU 0) anchors, as torchvision.
            Without it, such a box's best IoU is set to NaN between the launches, which no IoU equals.

    Returns:
        matches: (B, A) int64; ious: (B, A) in the dtype of ``anchors``.
    """
    cupy = backend.cupy
    scalar, suffix = _scalar_type(anchors.dtype)
    module = _module_of(MATCHING_VERSIONS, version)
    num_anchors = anchors.shape[0]
    num_images, max_boxes = boxes.shape[0], boxes.shape[1]
    if num_anchors >= 2**31 or num_images > 65535:
        raise ValueError(f"matching kernel: {num_anchors} anchors and {num_images} images; it takes fewer than 2^31 "
                         "anchors and at most 65535 images (the grid's second dimension)")
    matches = cupy.empty((num_images, num_anchors), dtype=cupy.int64)
    ious = cupy.empty((num_images, num_anchors), dtype=anchors.dtype)
    if num_anchors == 0 or num_images == 0:
        return matches, ious
    anchors = cupy.ascontiguousarray(anchors)
    boxes = cupy.ascontiguousarray(boxes, dtype=anchors.dtype)
    counts = cupy.ascontiguousarray(counts, dtype=cupy.int32)
    # Each box's best IoU over the anchors, as the bits of the float (int32 or int64); 0 is the bits of 0.0.
    bits = cupy.int32 if anchors.dtype == np.float32 else cupy.int64
    box_best = cupy.zeros((num_images, max(max_boxes, 1)), dtype=bits)
    grid = (math.ceil(num_anchors / BLOCK_SIZE), num_images)
    inputs = (anchors, boxes, counts, np.int32(num_anchors), np.int32(max_boxes))
    get_kernel(module, f"match_best_box_{suffix}")(
        grid, (BLOCK_SIZE,),
        inputs + (scalar(high), scalar(low), np.int32(bool(allow_low_quality_matches)), box_best, matches, ious))
    if allow_low_quality_matches:
        if not match_zero_iou:
            nan_bits = 0x7FC00000 if bits == cupy.int32 else 0x7FF8000000000000       # a quiet NaN's bits
            box_best = cupy.where(box_best == 0, bits(nan_bits), box_best)
        get_kernel(module, f"promote_low_quality_{suffix}")(grid, (BLOCK_SIZE,), inputs + (box_best, matches))
    return matches, ious
