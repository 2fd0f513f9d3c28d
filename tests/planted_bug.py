"""Run a kernel with one planted bug through the CPU launch harness and compare it with its NumPy reference.

    python tests/planted_bug.py FILE OLD NEW {focal,matching}

FILE is ``kernels/<name>.cu`` or ``minidet/cuda.py``; the line OLD in it (which must occur exactly once) becomes
NEW. A kernel is copied with the rest of kernels/ to a temporary folder and changed there; minidet/cuda.py is
changed in memory (its code, edited, runs again in the module's namespace). Then the focal loss or the matching runs
through minidet/cuda.py and the CuPy stand-in (tests/cupy_on_cpu.py) and is compared with the reference.

Exit 0 and "equal to the reference" when the bug went unnoticed; exit 1 with the harness's message or the
difference from the reference when it was caught; the harness itself ends the process (exit 86) with its message
when the kernel reads or writes past the end of an array. tests/test_planted_bugs.py runs one process per bug.
"""

import pathlib
import shutil
import sys
import tempfile

import cupy_on_cpu

cupy_on_cpu.install()

import numpy as np  # noqa: E402

from minidet import backend, cpu_harness, cuda  # noqa: E402
from minidet.functional.loss import focal_loss_with_labels_reference  # noqa: E402
from minidet.matching import match_anchors_batch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
cupy = backend.cupy


def plant(file, old, new):
    path = ROOT / file
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"planted_bug.py: the line {old!r} occurs {text.count(old)} times in {file}, not once")
    text = text.replace(old, new)
    if file == "minidet/cuda.py":
        exec(compile(text, str(path), "exec"), cuda.__dict__)
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix="planted_bug_"))
    for source in cuda.kernels_dir().iterdir():
        if source.suffix in (".cu", ".cuh", ".h"):
            shutil.copy(source, folder / source.name)
    (folder / path.name).write_text(text)
    cuda.kernels_dir = lambda: folder


def check_focal():
    rng = np.random.default_rng(0)
    for num_anchors, num_classes in [(257, 3), (3000, 20)]:
        logits = (rng.standard_normal((num_anchors, num_classes)) * 4).astype(np.float32)
        labels = rng.integers(-2, num_classes, num_anchors).astype(np.int32)
        weights = rng.uniform(0.5, 1.5, num_anchors).astype(np.float32)
        loss, grad = focal_loss_with_labels_reference(logits, labels, weights, 0.25, 2.0)
        actual_loss, actual_grad = cuda.focal_loss_with_labels(cupy.asarray(logits), cupy.asarray(labels),
                                                               cupy.asarray(weights), 0.25, 2.0)
        if not abs(float(actual_loss) - float(loss)) <= 1e-5 * abs(float(loss)):
            sys.exit(f"{num_anchors} x {num_classes}: the loss is {float(actual_loss)!r}, the NumPy reference "
                     f"{float(loss)!r}")
        if not np.allclose(cupy.asnumpy(actual_grad), grad, rtol=1e-5, atol=1e-7):
            sys.exit(f"{num_anchors} x {num_classes}: the gradient differs from the NumPy reference")


def check_matching():
    # Small anchors and larger boxes: many boxes have no anchor with IoU >= 0.4, so low-quality matches decide
    # their anchors (and a wrong per-box maximum shows).
    rng = np.random.default_rng(1)
    corners = rng.uniform(0, 60, (700, 2))
    anchors = np.concatenate([corners, corners + rng.uniform(1, 12, (700, 2))], 1).astype(np.float32)
    images = []
    for count in (40, 300, 17):                                 # 300 boxes: two tiles of 256
        corners = rng.uniform(0, 60, (count, 2))
        images.append(np.concatenate([corners, corners + rng.uniform(8, 30, (count, 2))], 1).astype(np.float32))
    padded = np.zeros((3, 300, 4), np.float32)
    for i, boxes in enumerate(images):
        padded[i, :len(boxes)] = boxes
    counts = np.array([len(b) for b in images])
    expected, _ = match_anchors_batch(anchors, padded, counts, 0.5, 0.4, True)
    actual, _ = cuda.match_anchors_batch(cupy.asarray(anchors), cupy.asarray(padded), cupy.asarray(counts),
                                         0.5, 0.4, True)
    different = int((cupy.asnumpy(actual) != expected).sum())
    if different:
        sys.exit(f"the matches of {different} of {expected.size} (image, anchor) pairs differ from the NumPy "
                 "reference")


def main():
    file, old, new, what = sys.argv[1:]
    plant(file, old, new)
    try:
        {"focal": check_focal, "matching": check_matching}[what]()
    except cpu_harness.HarnessError as error:
        sys.exit(f"the harness stopped the launch: {error}")
    print("equal to the reference: the bug went unnoticed")


if __name__ == "__main__":
    main()
