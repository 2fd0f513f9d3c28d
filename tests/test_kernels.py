"""The CUDA kernels (kernels/*.cu) against their NumPy references.

1. Compile: every ``.cu`` compiles to PTX for sm_80 and sm_90 with nvcc, from the source text and with the options
   that CuPy's compiler gets from the loader (minidet.cuda), without an error or a warning. Skips where nvcc is
   missing.
2. Arithmetic: the ``.cuh`` functions, built with the host C++ compiler (the CUDA qualifiers defined away) and
   called through ctypes, against NumPy: the IoU and the matching bit for bit, the focal loss within float
   rounding. This proves the maths; it cannot prove the kernels' indexing, shared memory or atomics. Skips where
   g++ is missing.
3. Launch (marked ``gpu``): every version of each kernel through minidet/cuda.py against its NumPy reference on the
   edge cases below, with every output the kernel allocates poisoned (NaN, -999) before the launch. On a machine
   with CuPy and a GPU they run on the GPU; elsewhere they skip, and tests/test_cpu_harness.py runs them again with
   the CuPy stand-in (tests/cupy_on_cpu.py), which launches the same kernels on the CPU launch harness.

Tolerances of the focal loss. The IoU is divisions, subtractions and products of the coordinates, each rounded
once as IEEE says, so any two correct implementations agree exactly. The focal loss goes through exp and log1p,
which no library rounds exactly: the GPU's expf is within 2 units in the last place (ulp) of the exact value and
its log1pf within 1 (CUDA Programming Guide, "Mathematical functions"), glibc's and NumPy's within about 1. The
rest is ~20 correctly rounded operations in which nothing cancels for targets 0 and 1, so the errors only add up,
and (1 - p_t)^gamma multiplies the relative error of 1 - p_t by gamma. We allow 32 ulp of relative error
(``FOCAL_RTOL``: 3.8e-6 in float32, 7.1e-15 in float64); the host build measures at most 7 ulp for gamma = 2 and
13 for gamma = 5. On top of that, an absolute difference up to the smallest normal number (1.2e-38 in float32):
CuPy compiles with -ftz=true, so the GPU flushes the tiny terms that logits beyond -+87 make to 0. The loss summed
over many logits adds the summation order (versions 2 and 3 add per thread, then per block, then with atomics;
NumPy pairwise): 1e-5 relative. Version 1 adds every term to the total with its own atomic, one rounding after
another in the dtype of the loss: n terms, all >= 0, can be off by up to (n - 1) eps of the sum (the bound of
recursive summation), which for 80,000 float32 terms is 1e-2; its test allows that bound (``sum_rtol``).
"""

import ctypes
import itertools
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

import minidet as md
import minidet.functional as F
from minidet import backend, cuda
from minidet.boxes import box_iou
from minidet.functional.loss import focal_loss_terms, focal_loss_with_labels_reference
from minidet.matching import BACKGROUND, IGNORED, match_anchors, match_anchors_batch

KERNELS = pathlib.Path(cuda.kernels_dir())
SOURCES = sorted(p.stem for p in KERNELS.glob("*.cu"))
# The kernels each file must define: the names minidet/cuda.py launches.
FOCAL_ENTRY_POINTS = ["focal_loss_with_labels_float32", "focal_loss_with_labels_float64"]
MATCHING_ENTRY_POINTS = ["match_best_box_float32", "match_best_box_float64", "promote_low_quality_float32",
                         "promote_low_quality_float64"]
ENTRY_POINTS = {**{name: FOCAL_ENTRY_POINTS for name in cuda.FOCAL_LOSS_VERSIONS.values()},
                **{name: MATCHING_ENTRY_POINTS for name in cuda.MATCHING_VERSIONS.values()}}
FOCAL_RTOL = {np.float32: 32 * np.finfo(np.float32).eps, np.float64: 32 * np.finfo(np.float64).eps}
SUM_RTOL = 1e-5


def sum_rtol(version, count, dtype):
    """The relative tolerance of a kernel's summed loss of ``count`` terms (see the module's docstring)."""
    return max(SUM_RTOL, (count - 1) * np.finfo(dtype).eps) if version == 1 else SUM_RTOL


def test_every_kernel_file_is_listed():
    assert SOURCES == sorted(ENTRY_POINTS)


# --- 1. compile with nvcc ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", SOURCES)
def test_kernel_compiles_to_ptx_without_warnings(name, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    source = tmp_path / f"{name}.cu"
    source.write_text(cuda.kernel_source(name))   # the text the loader compiles, #line and all
    ptx = tmp_path / f"{name}.ptx"
    options = [*cuda.compile_options(), *cuda.CUPY_APPENDED_OPTIONS]          # what CuPy's NVRTC gets
    result = subprocess.run([nvcc, "-ptx", f"-arch={arch}", *options, "-o", str(ptx), str(source)],
                            capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"nvcc {name}.cu for {arch}:\n{output}"
    text = ptx.read_text()
    entries = re.findall(r"\.visible \.entry (\w+)\(", text)
    assert sorted(entries) == sorted(ENTRY_POINTS[name])
    if name in cuda.MATCHING_VERSIONS.values():
        # --fmad=false: no multiply-add fused into one rounding anywhere in the IoU arithmetic.
        assert "fma." not in text


# --- 2. the .cuh arithmetic on the host, through ctypes -----------------------------------------------------------

WRAPPER = r"""
#include "focal_loss.cuh"
#include "iou_match.cuh"
using namespace minidet;

template <typename T>
void iou_matrix(const T* a, long n, const T* b, long m, T* out) {
    for (long i = 0; i < n; ++i) {
        const Box<T> anchor = make_box(a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]);
        for (long j = 0; j < m; ++j) {
            out[i * m + j] = box_iou(anchor, make_box(b[4 * j], b[4 * j + 1], b[4 * j + 2], b[4 * j + 3]));
        }
    }
}

// The matching of one image, done one anchor at a time with the .cuh functions in the order the kernels use them:
// pass 1 (best box, label, IoU, each box's best IoU), then pass 2 (IoUs recomputed, ties with a box's best
// promoted). box_best: G values of scratch.
template <typename T>
void match_image(const T* anchors, long A, const T* boxes, long G, T high, T low, int low_quality,
                 long long* matches, T* ious, T* box_best) {
    for (long j = 0; j < G; ++j) box_best[j] = T(0);
    for (long i = 0; i < A; ++i) {
        const Box<T> anchor = make_box(anchors[4 * i], anchors[4 * i + 1], anchors[4 * i + 2], anchors[4 * i + 3]);
        BestBox<T> best = no_box_yet<T>();
        for (long j = 0; j < G; ++j) {
            const T iou = box_iou(anchor, make_box(boxes[4 * j], boxes[4 * j + 1], boxes[4 * j + 2], boxes[4 * j + 3]));
            keep_best(best, iou, (int)j);
            if (iou > box_best[j]) box_best[j] = iou;
        }
        matches[i] = match_label(best, high, low);
        ious[i] = match_iou(best);
    }
    if (!low_quality) return;
    for (long i = 0; i < A; ++i) {
        const Box<T> anchor = make_box(anchors[4 * i], anchors[4 * i + 1], anchors[4 * i + 2], anchors[4 * i + 3]);
        BestBox<T> best = no_box_yet<T>();
        bool is_best_of_a_box = false;
        for (long j = 0; j < G; ++j) {
            const T iou = box_iou(anchor, make_box(boxes[4 * j], boxes[4 * j + 1], boxes[4 * j + 2], boxes[4 * j + 3]));
            keep_best(best, iou, (int)j);
            if (iou == box_best[j]) is_best_of_a_box = true;
        }
        if (is_best_of_a_box) matches[i] = best.box;
    }
}

template <typename T>
void focal_terms(const T* x, const T* t, long n, T alpha, T gamma, T* loss, T* grad) {
    for (long i = 0; i < n; ++i) {
        const FocalLossTerm<T> term = focal_loss_term(x[i], t[i], alpha, gamma);
        loss[i] = term.loss;
        grad[i] = term.grad;
    }
}

template <typename T>
void focal_of_labels(const T* x, const int* labels, const T* weights, long A, long K, T alpha, T gamma,
                     T* loss, T* grad) {
    for (long a = 0; a < A; ++a) {
        for (long k = 0; k < K; ++k) {
            const FocalLossTerm<T> term = focal_loss_term_of_label(x[a * K + k], labels[a], (int)k, weights[a],
                                                                   alpha, gamma);
            loss[a * K + k] = term.loss;
            grad[a * K + k] = term.grad;
        }
    }
}

#define EXPORT(T, NAME)                                                                                        \
    extern "C" void iou_matrix_##NAME(const T* a, long n, const T* b, long m, T* out) {                        \
        iou_matrix(a, n, b, m, out);                                                                           \
    }                                                                                                          \
    extern "C" void match_image_##NAME(const T* anchors, long A, const T* boxes, long G, T high, T low,        \
                                       int low_quality, long long* matches, T* ious, T* box_best) {            \
        match_image(anchors, A, boxes, G, high, low, low_quality, matches, ious, box_best);                    \
    }                                                                                                          \
    extern "C" void focal_terms_##NAME(const T* x, const T* t, long n, T alpha, T gamma, T* loss, T* grad) {   \
        focal_terms(x, t, n, alpha, gamma, loss, grad);                                                        \
    }                                                                                                          \
    extern "C" void focal_of_labels_##NAME(const T* x, const int* labels, const T* weights, long A, long K,    \
                                           T alpha, T gamma, T* loss, T* grad) {                               \
        focal_of_labels(x, labels, weights, A, K, alpha, gamma, loss, grad);                                   \
    }
EXPORT(float, float32)
EXPORT(double, float64)

// The first `steps` positions of a thread that starts at element `first` and steps by `stride`.
extern "C" void element_index_walk(unsigned int first, unsigned int stride, int num_classes, int steps,
                                   unsigned int* i, unsigned int* anchor, int* k) {
    ElementCursor at(first, stride, num_classes);
    for (int s = 0; s < steps; ++s, at.advance(stride)) {
        i[s] = at.i;
        anchor[s] = at.anchor;
        k[s] = at.k;
    }
}

extern "C" int label_code_background() { return BACKGROUND; }
extern "C" int label_code_ignored() { return IGNORED; }
"""

# g++ rounding as the GPU build: no contraction into FMAs (GCC's default for C++ allows it), and the CUDA qualifiers
# defined away so the .cuh files are plain C++.
GXX_FLAGS = ["-x", "c++", "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC",
             "-D__host__=", "-D__device__=", "-D__forceinline__=inline"]


class HostKernels:
    """The .cuh functions, compiled for the CPU, called on NumPy arrays."""

    def __init__(self, library):
        self.lib = library

    def _function(self, name, dtype):
        return getattr(self.lib, f"{name}_{np.dtype(dtype).name}")

    @staticmethod
    def _pointer(array):
        return ctypes.c_void_p(array.ctypes.data)

    @staticmethod
    def _scalar(dtype, value):
        return (ctypes.c_float if dtype == np.float32 else ctypes.c_double)(value)

    def iou(self, boxes1, boxes2):
        boxes1, boxes2 = np.ascontiguousarray(boxes1), np.ascontiguousarray(boxes2, dtype=boxes1.dtype)
        out = np.empty((len(boxes1), len(boxes2)), dtype=boxes1.dtype)
        self._function("iou_matrix", boxes1.dtype)(self._pointer(boxes1), ctypes.c_long(len(boxes1)),
                                                   self._pointer(boxes2), ctypes.c_long(len(boxes2)),
                                                   self._pointer(out))
        return out

    def match(self, anchors, boxes, high=0.5, low=0.4, allow_low_quality_matches=False):
        dtype = anchors.dtype
        anchors, boxes = np.ascontiguousarray(anchors), np.ascontiguousarray(boxes, dtype=dtype)
        matches = np.full(len(anchors), -999, dtype=np.int64)
        ious = np.full(len(anchors), np.nan, dtype=dtype)
        scratch = np.empty(max(len(boxes), 1), dtype=dtype)
        self._function("match_image", dtype)(
            self._pointer(anchors), ctypes.c_long(len(anchors)), self._pointer(boxes), ctypes.c_long(len(boxes)),
            self._scalar(dtype, high), self._scalar(dtype, low), ctypes.c_int(allow_low_quality_matches),
            self._pointer(matches), self._pointer(ious), self._pointer(scratch))
        return matches, ious

    def focal_terms(self, x, t, alpha, gamma):
        x, t = np.ascontiguousarray(x), np.ascontiguousarray(t, dtype=x.dtype)
        loss, grad = np.empty_like(x), np.empty_like(x)
        self._function("focal_terms", x.dtype)(self._pointer(x), self._pointer(t), ctypes.c_long(x.size),
                                               self._scalar(x.dtype, alpha), self._scalar(x.dtype, gamma),
                                               self._pointer(loss), self._pointer(grad))
        return loss, grad

    def focal_of_labels(self, logits, labels, weights, alpha, gamma):
        logits = np.ascontiguousarray(logits)
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        weights = np.ascontiguousarray(weights, dtype=logits.dtype)
        loss, grad = np.empty_like(logits), np.empty_like(logits)
        self._function("focal_of_labels", logits.dtype)(
            self._pointer(logits), self._pointer(labels), self._pointer(weights), ctypes.c_long(logits.shape[0]),
            ctypes.c_long(logits.shape[1]), self._scalar(logits.dtype, alpha), self._scalar(logits.dtype, gamma),
            self._pointer(loss), self._pointer(grad))
        return loss, grad


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    folder = tmp_path_factory.mktemp("host_kernels")
    (folder / "wrapper.cpp").write_text(WRAPPER)
    library = folder / "host_kernels.so"
    result = subprocess.run([gxx, *GXX_FLAGS, f"-I{KERNELS}", "-o", str(library), str(folder / "wrapper.cpp")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"g++ could not build the .cuh files:\n{result.stderr}"
    return HostKernels(ctypes.CDLL(str(library)))


def same_bits(actual, expected):
    """Equal bit for bit, except that 0 and -0 count as equal (NumPy's maximum is not consistent about which it
    returns for equal zeros; the sign of a zero IoU changes no decision)."""
    actual, expected = np.asarray(actual) + 0, np.asarray(expected) + 0      # -0 + 0 = +0
    integer = np.int32 if actual.dtype == np.float32 else np.int64
    return actual.dtype == expected.dtype and np.array_equal(actual.view(integer), expected.view(integer))


def random_boxes(rng, n, dtype, zero_size=0.1):
    """(n, 4) boxes with real-valued corners, some of zero width or height."""
    corners = rng.uniform(-50, 150, (n, 2))
    sizes = rng.uniform(0, 80, (n, 2)) * (rng.random((n, 2)) > zero_size)
    return np.concatenate([corners, corners + sizes], axis=1).astype(dtype)


def grid_boxes(rng, n, dtype):
    """(n, 4) boxes on a one-pixel grid, sizes 0 to 6: ties, zero-area and one-pixel boxes, IoUs of exactly 0.4 and
    0.5 are all common."""
    corners = rng.integers(0, 9, (n, 2))
    return np.concatenate([corners, corners + rng.integers(0, 7, (n, 2))], axis=1).astype(dtype)


def spans(*intervals, dtype=np.float32):
    """Boxes from x1 to x2 and from y = 0 to 10: the IoU of two is a ratio of lengths."""
    return np.array([[x1, 0, x2, 10] for x1, x2 in intervals], dtype=dtype).reshape(-1, 4)


EDGE_BOXES = [
    [0, 0, 10, 10], [0, 0, 10, 10],            # identical
    [10, 0, 20, 10], [0, 10, 10, 20],          # touching the first along an edge: IoU 0
    [2, 2, 3, 3], [9, 9, 10, 10],              # one pixel, inside
    [5, 5, 5, 8], [3, 3, 3, 3],                # zero area
    [0, 0, 5, 10], [0, 0, 4, 10],              # IoU exactly 0.5 and 0.4 with the first
    [0, 0, 20, 10], [0, 0, 25, 10],            # 0.5 and 0.4 the other way round
    [-5, -5, 5, 5], [-0.0, -0.0, 10, 10],      # negative corners, signed zeros
    [1e6, 1e6, 1e6 + 1, 1e6 + 1], [0, 0, 1e-30, 1e-30],   # far away; tiny (its float32 area underflows to 0)
    [0, 0, 3e38, 3e38], [0, 0, np.inf, 10],    # areas that overflow, infinite corners
    [np.nan, 0, 10, 10], [0, 0, np.nan, np.nan],
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_iou_is_bit_for_bit_numpys_on_random_boxes(host, dtype):
    rng = np.random.default_rng(0)
    for boxes1, boxes2 in [(random_boxes(rng, 300, dtype), random_boxes(rng, 200, dtype)),
                           (grid_boxes(rng, 300, dtype), grid_boxes(rng, 200, dtype))]:
        assert same_bits(host.iou(boxes1, boxes2), box_iou(boxes1, boxes2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_iou_is_bit_for_bit_numpys_on_edge_cases(host, dtype):
    boxes = np.array(EDGE_BOXES, dtype=dtype)
    with np.errstate(all="ignore"):          # inf - inf and nan in NumPy's arithmetic; the kernel has no warnings
        expected = box_iou(boxes, boxes)
    actual = host.iou(boxes, boxes)
    assert same_bits(actual, expected)
    assert actual[0, 8] == dtype(0.5) and actual[0, 9] == dtype(0.4) and actual[0, 2] == 0
    assert not np.isnan(actual).any()      # nan or inf corners give IoU 0, as in NumPy


def test_the_label_codes_are_minidets(host):
    assert host.lib.label_code_background() == BACKGROUND == F.loss.BACKGROUND
    assert host.lib.label_code_ignored() == IGNORED == F.loss.IGNORED


@pytest.mark.parametrize("allow_low_quality_matches", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matching_decisions_equal_match_anchors_exactly(host, dtype, allow_low_quality_matches):
    rng = np.random.default_rng(1)
    cases = [(grid_boxes(rng, 400, dtype), grid_boxes(rng, g, dtype)) for g in (0, 1, 3, 17)]
    cases += [(random_boxes(rng, 400, dtype), random_boxes(rng, g, dtype, zero_size=0.02)) for g in (1, 5, 40)]
    cases += [(np.array(EDGE_BOXES, dtype), np.array(EDGE_BOXES, dtype)),
              (np.array(EDGE_BOXES, dtype), np.array(EDGE_BOXES[:12], dtype))]
    # IoU 0.5 and 0.4 exactly, and a box whose two best anchors tie (a3 and a4 overlap box 1 by 5 of 15).
    cases += [(spans((0, 5), (0, 4), (0, 3), (15, 25), (25, 35), (0, 10), (0, 10), dtype=dtype),
               spans((0, 10), (20, 30), dtype=dtype))]
    for thresholds in [(0.5, 0.4), (0.5, 0.5), (0.6, 0.25), (1.0, 0.0)]:
        for anchors, boxes in cases:
            with np.errstate(all="ignore"):     # inf - inf and nan in the edge boxes
                # The kernels' own rule is torchvision's (match_zero_iou); the launcher masks zero-IoU boxes out.
                expected = match_anchors(anchors, boxes, *thresholds, allow_low_quality_matches, match_zero_iou=True)
            actual = host.match(anchors, boxes, *thresholds, allow_low_quality_matches)
            np.testing.assert_array_equal(actual[0], expected[0], f"matches, {thresholds}, {len(boxes)} boxes")
            assert same_bits(actual[1], expected[1])


FOCAL_LOGITS = np.concatenate([np.random.default_rng(2).standard_normal(20000) * 4,
                               np.random.default_rng(3).uniform(-110, 110, 20000),
                               [0, -0.0, 100, -100, 88, -88, 87.3, -87.3, 103, -103, 1e-3, -1e-3, 30, -30, 17, -17]])


def assert_focal_close(actual, expected, dtype, what):
    """|actual - expected| <= FOCAL_RTOL * |expected| + the smallest normal number, element by element (nan where
    the other is nan). The absolute part lets the GPU flush values below the normal range to 0 (see minidet.cuda,
    CUPY_APPENDED_OPTIONS)."""
    assert np.shape(actual) == np.shape(expected), f"{what}: shapes {np.shape(actual)} and {np.shape(expected)}"
    shape = np.shape(expected)
    actual, expected = np.asarray(actual, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    allowed = FOCAL_RTOL[dtype] * np.abs(expected) + np.finfo(dtype).tiny
    with np.errstate(invalid="ignore"):
        ratio = np.where(np.isnan(actual) & np.isnan(expected), 0, np.abs(actual - expected) / allowed)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)                       # one nan, the other not
    worst = int(np.argmax(ratio)) if ratio.size else 0
    assert not ratio.size or ratio[worst] <= 1, (
        f"{what}: element {np.unravel_index(worst, shape)}: {actual[worst]!r} against {expected[worst]!r}, "
        f"relative error {abs(actual[worst] - expected[worst]) / abs(expected[worst] or 1):.3g}, "
        f"allowed {FOCAL_RTOL[dtype]:.3g} (+ {np.finfo(dtype).tiny:.3g})")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 1.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_loss_term_equals_numpy_within_float_rounding(host, dtype, alpha, gamma):
    x = FOCAL_LOGITS.astype(dtype)
    for target in (0, 1):
        t = np.full_like(x, target)
        with np.errstate(all="ignore"):   # gamma < 1 and 1 - p_t = 0: 0 ** (gamma - 1) = inf, as in the reference
            expected = focal_loss_terms(x, t, alpha, gamma)
        actual = host.focal_terms(x, t, alpha, gamma)
        assert np.isfinite(actual[0]).all(), "the loss is finite for every logit, +-100 included"
        assert_focal_close(actual[0], expected[0], dtype, f"loss, target {target}")
        assert_focal_close(actual[1], expected[1], dtype, f"gradient, target {target}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_loss_term_with_soft_targets(host, dtype):
    # With a target strictly between 0 and 1, p - t cancels near p = t: compare the gradient to the size of the
    # terms it is made of (about 1 here), not to its own, possibly tiny, value.
    rng = np.random.default_rng(4)
    x, t = (rng.standard_normal(5000) * 4).astype(dtype), rng.random(5000).astype(dtype)
    expected = focal_loss_terms(x, t, 0.25, 2.0)
    actual = host.focal_terms(x, t, 0.25, 2.0)
    assert_focal_close(actual[0], expected[0], dtype, "loss")
    np.testing.assert_allclose(actual[1], expected[1], rtol=0, atol=FOCAL_RTOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_loss_of_labels_equals_the_reference(host, dtype):
    rng = np.random.default_rng(5)
    num_anchors, num_classes = 300, 7
    logits = (rng.standard_normal((num_anchors, num_classes)) * 5).astype(dtype)
    logits[:4] = [[100] * num_classes, [-100] * num_classes, [100, -100] * 3 + [0], [-100, 100] * 3 + [0]]
    labels = rng.integers(IGNORED, num_classes, num_anchors).astype(np.int32)    # -2, -1 and every class
    labels[:4] = [0, 1, IGNORED, BACKGROUND]
    weights = rng.uniform(0.1, 2, num_anchors).astype(dtype)
    loss, grad = focal_loss_with_labels_reference(logits, labels, weights, 0.25, 2.0)
    terms, actual_grad = host.focal_of_labels(logits, labels, weights, 0.25, 2.0)
    assert_focal_close(actual_grad, grad, dtype, "gradient")
    assert float(terms.sum(dtype=np.float64)) == pytest.approx(float(loss), rel=SUM_RTOL)
    ignored = labels == IGNORED
    assert (terms[ignored] == 0).all() and (actual_grad[ignored] == 0).all()


def test_element_cursor_steps_through_anchors_and_classes_without_dividing(host):
    steps = 200
    for num_classes in (1, 3, 20, 80, 85, 1000):
        for stride in (1, 7, 256, 1000, 168_960, 1_081_344):
            for first in (0, 5, 255, stride - 1):
                i, anchor, k = np.empty(steps, np.uint32), np.empty(steps, np.uint32), np.empty(steps, np.int32)
                pointers = [ctypes.c_void_p(a.ctypes.data) for a in (i, anchor, k)]
                host.lib.element_index_walk(ctypes.c_uint(first), ctypes.c_uint(stride), ctypes.c_int(num_classes),
                                            ctypes.c_int(steps), *pointers)
                expected = first + stride * np.arange(steps, dtype=np.int64)
                np.testing.assert_array_equal(i, expected, f"K {num_classes}, stride {stride}, first {first}")
                np.testing.assert_array_equal(anchor, expected // num_classes)
                np.testing.assert_array_equal(k, expected % num_classes)


# --- the loader, without a GPU ------------------------------------------------------------------------------------

def test_the_source_names_its_file_and_changes_with_a_header(tmp_path):
    for path in KERNELS.iterdir():
        if path.suffix in (".cu", ".cuh"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    source = cuda.kernel_source("iou_match", tmp_path)
    lines = source.splitlines()
    assert lines[1] == f'#line 1 "{(tmp_path / "iou_match.cu").as_posix()}"'
    assert "\n".join(lines[2:]) == (tmp_path / "iou_match.cu").read_text().rstrip("\n")
    # CuPy's disk cache is keyed by the source text: editing a header must change it.
    with open(tmp_path / "common.cuh", "a") as header:
        header.write("// edited\n")
    assert cuda.kernel_source("iou_match", tmp_path) != source
    assert cuda.compile_options(tmp_path)[-1] == f"-I{tmp_path}"
    assert "--fmad=false" in cuda.compile_options()


def test_the_kernels_folder_holds_the_sources():
    assert {p.name for p in KERNELS.iterdir()} >= {"focal_loss.cu", "focal_loss.cuh", "iou_match.cu",
                                                   "iou_match.cuh", "common.cuh", "block_sum.cuh", "float_bits.cuh",
                                                   "cpu_harness.h"}


def test_an_unknown_kernel_version_is_a_clear_error():
    with pytest.raises(ValueError, match="kernel version 4: there are versions 1, 2, 3"):
        cuda.focal_loss_with_labels(None, None, None, 0.25, 2.0, version=4)


# --- 3. launches on a GPU -----------------------------------------------------------------------------------------

@pytest.fixture
def cp():
    if not backend.cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    return backend.cupy


@pytest.fixture
def poisoned(cp, monkeypatch):
    """Every ``cupy.empty`` returns memory filled with NaN (floats) or -999 (integers): an output element the kernel
    forgot to write cannot pass as a plausible value."""
    real_empty = cp.empty

    def empty(shape, dtype=float, order="C"):
        array = real_empty(shape, dtype, order)
        array.fill(np.nan if np.dtype(dtype).kind == "f" else -999)
        return array

    monkeypatch.setattr(cp, "empty", empty)
    assert np.isnan(float(cp.empty(3, dtype=np.float32)[0]))


def padded_batch(images, dtype, garbage_seed=0):
    """(B, Gmax, 4) boxes padded with garbage that would change the results if it were read, and (B,) counts."""
    rng = np.random.default_rng(garbage_seed)
    max_boxes = max([len(b) for b in images] + [1])
    padded = np.empty((len(images), max_boxes, 4), dtype=dtype)
    garbage = np.array([[np.nan] * 4, [-1e9, -1e9, 1e9, 1e9], [np.inf] * 4, [0, 0, 10, 10]], dtype=dtype)
    for i, boxes in enumerate(images):
        padded[i] = garbage[rng.integers(0, len(garbage), max_boxes)]
        padded[i, :len(boxes)] = boxes
    return padded, np.array([len(b) for b in images], dtype=np.int64)


def matching_cases(dtype):
    """(name, anchors, [boxes of each image]): matching's edge cases: one anchor, no boxes, the EDGE_BOXES (zero
    area, tiny, far away, IoUs exactly 0.4 and 0.5), tied best anchors, anchor counts around the block size, and
    more boxes than a shared-memory tile holds."""
    rng = np.random.default_rng(6)
    edge = np.array(EDGE_BOXES, dtype)
    cases = [
        ("one anchor, one image", grid_boxes(rng, 1, dtype), [grid_boxes(rng, 3, dtype)]),
        ("no boxes anywhere", grid_boxes(rng, 300, dtype), [np.zeros((0, 4), dtype)] * 3),
        ("edge boxes", edge, [edge[:12], np.zeros((0, 4), dtype), edge[::-1]]),
        ("exact 0.4 and 0.5, tied best anchors",
         spans((0, 5), (0, 4), (0, 3), (15, 25), (25, 35), (0, 10), (0, 10), (40, 50), dtype=dtype),
         [spans((0, 10), (20, 30), dtype=dtype), spans((100, 110), dtype=dtype)]),
    ]
    for num_anchors in (255, 256, 257, 513):      # around the block size of 256
        cases.append((f"{num_anchors} grid anchors", grid_boxes(rng, num_anchors, dtype),
                      [grid_boxes(rng, g, dtype) for g in (0, 1, 5, 17, 40)]))
    anchors = random_boxes(rng, 3000, dtype, zero_size=0.01)
    anchors[1000:1010] = anchors[999]             # duplicated anchors: ties for a box's best anchor
    cases.append(("random, many images", anchors, [random_boxes(rng, g, dtype, 0.01) for g in (50, 3, 0, 50, 11, 1,
                                                                                                 29, 50, 7)]))
    # More boxes than a shared-memory tile holds (256): 257 and 600 boxes take two and three tiles.
    cases.append(("boxes in several tiles", grid_boxes(rng, 700, dtype),
                  [grid_boxes(rng, 257, dtype), random_boxes(rng, 600, dtype, 0.01), grid_boxes(rng, 256, dtype)]))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("version", sorted(cuda.MATCHING_VERSIONS))
@pytest.mark.parametrize("allow_low_quality_matches", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matching_kernel_equals_the_reference_exactly(cp, poisoned, dtype, allow_low_quality_matches, version):
    # match_zero_iou only changes anything with low-quality matches ("exact 0.4 and 0.5" has a box far from all).
    zero_iou_rules = (False, True) if allow_low_quality_matches else (False,)
    for name, anchors, images in matching_cases(dtype):
        padded, counts = padded_batch(images, dtype)
        for thresholds, zero_iou in itertools.product([(0.5, 0.4), (0.6, 0.25), (1.0, 0.0)], zero_iou_rules):
            with np.errstate(all="ignore"):
                expected = match_anchors_batch(anchors, padded, counts, *thresholds, allow_low_quality_matches,
                                               match_zero_iou=zero_iou)
            actual = cuda.match_anchors_batch(cp.asarray(anchors), cp.asarray(padded), cp.asarray(counts),
                                              *thresholds, allow_low_quality_matches, version, match_zero_iou=zero_iou)
            assert isinstance(actual[0], cp.ndarray) and actual[0].dtype == np.int64 and actual[1].dtype == dtype
            np.testing.assert_array_equal(cp.asnumpy(actual[0]), expected[0], f"{name}, {thresholds}, {zero_iou}")
            assert same_bits(cp.asnumpy(actual[1]), expected[1]), f"{name}, {thresholds}: IoUs"
        # Other garbage in the padding, the same answer.
        other, _ = padded_batch(images, dtype, garbage_seed=1)
        first = cuda.match_anchors_batch(cp.asarray(anchors), cp.asarray(padded), cp.asarray(counts), 0.5, 0.4,
                                         allow_low_quality_matches, version)
        again = cuda.match_anchors_batch(cp.asarray(anchors), cp.asarray(other), cp.asarray(counts), 0.5, 0.4,
                                         allow_low_quality_matches, version)
        np.testing.assert_array_equal(cp.asnumpy(again[0]), cp.asnumpy(first[0]), name)


@pytest.mark.gpu
def test_match_anchors_on_one_image_uses_the_kernel(cp, poisoned, monkeypatch):
    rng = np.random.default_rng(7)
    anchors, boxes = grid_boxes(rng, 500, np.float32), grid_boxes(rng, 9, np.float32)
    launches = []
    real = cuda.match_anchors_batch
    monkeypatch.setattr(cuda, "match_anchors_batch",
                        lambda *args, **kwargs: launches.append(1) or real(*args, **kwargs))
    for allow in (False, True):
        actual = match_anchors(cp.asarray(anchors), cp.asarray(boxes), allow_low_quality_matches=allow)
        expected = match_anchors(anchors, boxes, allow_low_quality_matches=allow)
        np.testing.assert_array_equal(cp.asnumpy(actual[0]), expected[0])
        assert same_bits(cp.asnumpy(actual[1]), expected[1])
    assert len(launches) == 2


# Sizes around a block of 256 threads, and enough elements (12001 x 83) that every thread of a full wave of blocks
# goes through several rounds of its loop, with a stride that is not a multiple of K.
FOCAL_SHAPES = [(1, 1), (1, 80), (255, 1), (256, 1), (257, 1), (3, 85), (1000, 80), (7, 40000), (12001, 83)]


@pytest.mark.gpu
@pytest.mark.parametrize("version", sorted(cuda.FOCAL_LOSS_VERSIONS))
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.0), (0.25, 1.5), (0.5, 5.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_focal_kernel_equals_the_reference(cp, poisoned, dtype, alpha, gamma, version):
    rng = np.random.default_rng(8)
    for num_anchors, num_classes in FOCAL_SHAPES:
        logits = (rng.standard_normal((num_anchors, num_classes)) * 5).astype(dtype)
        extremes = rng.random(logits.shape) < 0.05
        logits[extremes] = rng.choice([-100.0, 100.0], extremes.sum())
        labels = rng.integers(IGNORED, num_classes, num_anchors).astype(np.int32)
        weights = rng.uniform(0.1, 2, num_anchors).astype(dtype)
        loss, grad = focal_loss_with_labels_reference(logits, labels, weights, alpha, gamma)
        actual_loss, actual_grad = cuda.focal_loss_with_labels(cp.asarray(logits), cp.asarray(labels),
                                                               cp.asarray(weights), alpha, gamma, version)
        assert actual_loss.shape == () and actual_loss.dtype == dtype and actual_grad.dtype == dtype
        what = f"{num_anchors} x {num_classes}"
        assert_focal_close(cp.asnumpy(actual_grad), grad, dtype, f"gradient, {what}")
        assert float(actual_loss) == pytest.approx(float(loss), rel=sum_rtol(version, logits.size, dtype)), what


@pytest.mark.gpu
def test_the_focal_op_and_compute_loss_on_cupy_equal_the_numpy_path(cp):
    from minidet.models import RetinaNet

    rng = np.random.default_rng(9)
    num_images, num_anchors, num_classes = 3, 600, 5
    corners = rng.uniform(0, 200, (num_anchors, 2))
    anchors = np.concatenate([corners, corners + rng.uniform(4, 60, (num_anchors, 2))], 1).astype(np.float32)
    targets = []
    for count in (4, 0, 7):
        boxes = anchors[rng.choice(num_anchors, count, replace=False)] + rng.uniform(-3, 3, (count, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        targets.append({"boxes": boxes.astype(np.float32), "labels": rng.integers(0, num_classes, count)})
    logits = (rng.standard_normal((num_images, num_anchors, num_classes)) * 3).astype(np.float32)
    deltas = rng.standard_normal((num_images, num_anchors, 4)).astype(np.float32)
    for preset in ("paper", "torchvision"):
        results = {}
        for device in ("cpu", "cuda"):
            md.manual_seed(0)
            model = RetinaNet(num_classes, backbone="resnet_small", preset=preset, fpn_channels=16)
            x = md.tensor(logits, requires_grad=True, device=device)
            d = md.tensor(deltas, requires_grad=True, device=device)
            losses = model.compute_loss(x, d, backend.to_device(anchors, device), targets)
            (losses["classification"] + losses["box_regression"]).backward()
            results[device] = losses, backend.to_numpy(x.grad), backend.to_numpy(d.grad)
        (cpu, cpu_x, cpu_d), (gpu, gpu_x, gpu_d) = results["cpu"], results["cuda"]
        for key in ("num_positive", "num_ignored", "num_negative"):
            assert gpu[key] == cpu[key], key
        assert gpu["classification"].item() == pytest.approx(cpu["classification"].item(), rel=SUM_RTOL)
        assert gpu["box_regression"].item() == pytest.approx(cpu["box_regression"].item(), rel=SUM_RTOL)
        assert_focal_close(gpu_x, cpu_x, np.float32, f"{preset}: gradient of the logits")
        np.testing.assert_allclose(gpu_d, cpu_d, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_each_kernel_file_is_compiled_once_per_process(cp):
    cuda.load_module.cache_clear()
    cuda.get_kernel.cache_clear()
    logits, labels = cp.zeros((10, 3), np.float32), cp.full(10, BACKGROUND, np.int32)
    for _ in range(3):
        F.sigmoid_focal_loss_with_labels(logits, labels)
        match_anchors(cp.asarray(spans((0, 10))), cp.asarray(spans((0, 5))), allow_low_quality_matches=True)
    info = cuda.load_module.cache_info()
    assert info.misses == 2 and info.currsize == 2
