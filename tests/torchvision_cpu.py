"""torchvision's Python code on a CPU-only torch, as an oracle for the ``reference`` tests.

Why this exists
---------------
The PyPI wheel of torchvision ships its compiled ops (``torchvision/_C.so``: nms, roi_align, deform_conv2d, ...)
built against the CUDA build of torch. Against the CPU build that CI installs, ``_C.so`` fails to load, and then
``import torchvision`` itself fails: ``torchvision/__init__.py`` imports ``torchvision._meta_registrations``, whose
``@torch.library.register_fake("torchvision::nms")`` needs an operator that only ``_C.so`` would have defined.

minidet is compared with torchvision's *Python* code: ``models.detection`` (RetinaNet, AnchorGenerator, Matcher,
BoxCoder), ``ops.boxes`` and ``ops.sigmoid_focal_loss``. Of the compiled ops, that code calls only one at run
time, ``torchvision::nms`` (through ``ops.nms`` and ``ops.batched_nms``, in RetinaNet's post-processing).

What ``import_torchvision`` does (read from torchvision 0.28's ``__init__.py``, ``extension.py``,
``_meta_registrations.py`` and ``ops/boxes.py``)
----------------------------------------------------------------------------------------------------------
1. ``import torchvision`` as is. Where its compiled ops load (a CUDA torch, or a torchvision built for this
   torch) that module is used unchanged, and nothing below happens.
2. Otherwise, forget the half-imported ``torchvision.*`` modules the failed import left in ``sys.modules``, then:

   a. define the operator ``torchvision::nms`` with the schema torchvision's C++ code gives it, and register
      ``_nms_cpu`` below as its CPU kernel (``torch.library.define`` and ``torch.library.impl``);
   b. put an empty module in ``sys.modules["torchvision._meta_registrations"]``, so the package's
      ``from torchvision import _meta_registrations`` finds it instead of running the real one. That module only
      registers fake (meta) kernels for the compiled ops, used when torch traces a model (torch.compile, export);
      eager runs never need them, and most of them name operators that do not exist here;
   c. ``import torchvision`` again;
   d. replace ``torchvision.extension._has_ops`` by a function that returns True. ``ops.nms`` first calls
      ``extension._assert_has_ops()``, which looks ``_has_ops`` up at call time and raises unless it says the
      compiled ops are loaded. This happens *after* the import, so that the import-time code guarded by
      ``_has_ops()`` (autograd and autocast registrations for roi_align and friends in
      ``_autograd_registrations.py``) still sees False and skips operators that do not exist. Other compiled ops
      (roi_pool, deform_conv2d, ...) then fail with an AttributeError from ``torch.ops.torchvision``; roi_align,
      which imported ``_has_ops`` by name, still sees False and takes its pure-Python path.

Consequences for the tests
--------------------------
With the shim, ``torchvision.ops.nms`` runs ``_nms_cpu`` below, not torchvision's kernel. Comparing minidet's
``nms`` with ``torchvision.ops.nms`` here would compare two pieces of this repository, so no test does that
(minidet's NMS is checked against a brute-force version in tests/test_boxes.py). ``_nms_cpu`` is written
plainly, with torchvision's rule, only so that RetinaNet's post-processing can run.
"""

import sys
import types

# The schema that torchvision's C++ code (csrc/ops/nms.cpp) defines for the operator.
NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

_torchvision = None   # the module, once imported (the import is done once per process)
_shim_in_use = False  # whether that import needed the shim


def import_torchvision():
    """The ``torchvision`` module, importable even where its compiled ops do not load (see the module docstring).

    Raises ``ModuleNotFoundError`` where torch or torchvision is not installed, and ``RuntimeError`` (with the
    first import's error attached) where torchvision cannot be imported even with the shim, e.g. a torchvision
    release whose Python code differs from the one this shim was written for (0.28).
    """
    global _torchvision, _shim_in_use
    if _torchvision is not None:
        return _torchvision
    import torch  # noqa: F401  (ModuleNotFoundError here: torch is not installed)

    try:
        import torchvision
    except ModuleNotFoundError as error:
        if error.name == "torchvision":
            raise                                           # not installed at all
        first_error = error                                 # installed, but one of its imports is missing
    except Exception as error:                              # any other failure of the normal import
        first_error = error
    else:
        _torchvision = torchvision                          # 1. its compiled ops loaded: use it as is
        return _torchvision

    _forget_torchvision_modules()
    _define_nms()                                                            # 2a
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(      # 2b
        "torchvision._meta_registrations", "Left out by tests/torchvision_cpu.py: fake kernels for compiled ops.")
    try:  # 2c
        import torchvision
    except Exception as error:
        _forget_torchvision_modules()
        raise RuntimeError(
            f"torchvision {_installed_version()} cannot be imported, even with tests/torchvision_cpu.py's shim "
            f"({type(error).__name__}: {error}). The normal import had failed with {type(first_error).__name__}: "
            f"{first_error}. The shim was written for torchvision 0.28 (see .ci/run).") from error
    torchvision.extension._has_ops = lambda: True                            # 2d
    _torchvision, _shim_in_use = torchvision, True
    return _torchvision


def shim_in_use():
    """True where ``import_torchvision`` needed the shim: ``torchvision.ops.nms`` then runs ``_nms_cpu`` below."""
    return _shim_in_use


def _forget_torchvision_modules():
    """Drop ``torchvision`` and its submodules from ``sys.modules``, so the next import runs them afresh.

    A failed ``import torchvision`` removes the package itself but keeps the submodules that had finished
    (``torchvision.extension`` among them): they would be reused as they were.
    """
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]


def _define_nms():
    """Define ``torchvision::nms`` (if nothing defined it yet) with ``_nms_cpu`` as its CPU kernel."""
    import torch

    if hasattr(torch.ops.torchvision, "nms"):   # defined already: by _C.so, or by an earlier call
        return
    torch.library.define("torchvision::nms", NMS_SCHEMA)
    torch.library.impl("torchvision::nms", "CPU", _nms_cpu)


def _nms_cpu(dets, scores, iou_threshold):
    """Greedy non-maximum suppression with torchvision's rule; a stand-in for its compiled kernel.

    Args:
        dets: (N, 4) float boxes (x1, y1, x2, y2).
        scores: (N,) their scores.
        iou_threshold: a box is dropped when its IoU with a kept box is greater than this.

    Returns:
        (K,) int64 indices of the kept boxes, highest score first (equal scores: lower index first).

    Like torchvision's CPU kernel, the IoU is ``inter / (area_i + area_j - inter)`` and a nan IoU (two boxes of
    zero area) drops nothing.
    """
    import torch

    x1, y1, x2, y2 = dets.unbind(dim=1)                                   # (N,) each
    areas = (x2 - x1) * (y2 - y1)                                         # (N,)
    order = torch.sort(scores, descending=True, stable=True).indices      # (N,) best first
    keep = []
    while order.numel() > 0:
        best, rest = int(order[0]), order[1:]
        keep.append(best)
        width = (torch.minimum(x2[rest], x2[best]) - torch.maximum(x1[rest], x1[best])).clamp(min=0)   # (R,)
        height = (torch.minimum(y2[rest], y2[best]) - torch.maximum(y1[rest], y1[best])).clamp(min=0)  # (R,)
        inter = width * height                                            # (R,)
        iou = inter / (areas[best] + areas[rest] - inter)                 # (R,)
        order = rest[~(iou > iou_threshold)]                              # keep the rest unless it overlaps too much
    return torch.tensor(keep, dtype=torch.int64, device=dets.device)


def _installed_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchvision")
    except PackageNotFoundError:
        return "(version unknown)"
