"""torchvision's ``retinanet_resnet50_fpn`` (v1) weights in minidet's RetinaNet.

The same network has two sets of names. ``convert_torchvision_state_dict`` renames torchvision's state dict to
minidet's; ``load_torchvision_weights`` loads it into a ``RetinaNet(K, backbone="resnet50", preset="torchvision")``
and sets the one number a state dict does not hold, batch norm's eps. minidet never imports torch: the dicts here
hold NumPy arrays (``minidet convert`` reads the ``.pth`` file with torch and calls these functions).

What maps to what (first matching prefix; the rest of the name is kept)::

    torchvision                                  minidet
    backbone.body.                               backbone.                 the ResNet-50 (conv1, bn1, layer1..4)
    backbone.fpn.inner_blocks.{0,1,2}.0.         fpn.lateral{3,4,5}.       1x1 lateral convolutions on C3, C4, C5
    backbone.fpn.layer_blocks.{0,1,2}.0.         fpn.output{3,4,5}.        3x3 output convolutions giving P3, P4, P5
    backbone.fpn.extra_blocks.p6.                fpn.p6.                   3x3 stride 2 on P5
    backbone.fpn.extra_blocks.p7.                fpn.p7.                   3x3 stride 2 on ReLU(P6)
    head.classification_head.                    classification_head.      conv.{0..3}.0, cls_logits (A*K outputs)
    head.regression_head.                        regression_head.          conv.{0..3}.0, bbox_reg (A*4 outputs)

So ``backbone.body.layer2.0.downsample.1.running_var`` becomes ``backbone.layer2.0.downsample.1.running_var`` and
``backbone.fpn.inner_blocks.2.0.weight`` becomes ``fpn.lateral5.weight``. The arrays themselves are unchanged:
both libraries store convolution weights as (out, in, KH, KW), and the heads' channel order (anchor a, class k at
channel a * K + k) and the anchors' order are the same on both sides. torchvision's ``num_batches_tracked``
counters (one per batch norm) are dropped: frozen batch norm never updates its statistics. With 91 classes (the
COCO weights) torchvision's dict has 354 entries, 53 of them counters; minidet's has the other 301.

Batch norm's eps
----------------
A frozen batch norm computes ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``. eps is not in the
state dict, yet it changes the output wherever a channel's ``running_var`` is small. The published COCO weights
(``retinanet_resnet50_fpn_coco-eeacb38b.pth``) date from when torchvision's ``FrozenBatchNorm2d`` used eps = 0;
it has used 1e-5 since a fix (pytorch/vision#2933), so ``retinanet_resnet50_fpn(weights="COCO_V1")`` calls
``overwrite_eps(model, 0.0)`` after loading them, to keep their detections as they were. So eps belongs to the
*weights*, not to the model, and minidet keeps it with them:

- ``load_torchvision_weights(model, state, eps)`` sets every ``FrozenBatchNorm2d``'s eps;
- ``minidet convert WEIGHTS.pth OUT.npz --eps E`` stores it in OUT.npz as a 0-d array named ``frozen_bn_eps``
  (default 0.0, the published weights' value); ``load_torchvision_weights(model, minidet.load(OUT.npz))`` reads
  it from there.

Using the converted weights::

    state = minidet.load("retinanet_coco.npz")               # written by `minidet convert`
    model = RetinaNet(torchvision_num_classes(state), backbone="resnet50", preset="torchvision")
    load_torchvision_weights(model, state)                    # the weights, and eps from the file

The images must then be prepared as torchvision prepares them: RGB in [0, 1], minus the ImageNet mean (0.485,
0.456, 0.406), divided by its std (0.229, 0.224, 0.225); the COCO weights' 91 labels are COCO category ids
(1-90, with gaps; 0 was never a positive in training).
"""

import numpy as np

from minidet.models.retinanet import RetinaNet
from minidet.nn import FrozenBatchNorm2d

# (torchvision prefix, minidet prefix): every name of the state dict starts with exactly one of these.
RENAMES = (
    ("backbone.body.", "backbone."),
    ("backbone.fpn.inner_blocks.0.0.", "fpn.lateral3."),
    ("backbone.fpn.inner_blocks.1.0.", "fpn.lateral4."),
    ("backbone.fpn.inner_blocks.2.0.", "fpn.lateral5."),
    ("backbone.fpn.layer_blocks.0.0.", "fpn.output3."),
    ("backbone.fpn.layer_blocks.1.0.", "fpn.output4."),
    ("backbone.fpn.layer_blocks.2.0.", "fpn.output5."),
    ("backbone.fpn.extra_blocks.p6.", "fpn.p6."),
    ("backbone.fpn.extra_blocks.p7.", "fpn.p7."),
    ("head.classification_head.", "classification_head."),
    ("head.regression_head.", "regression_head."),
)
# The classification subnet's last convolution has A * K outputs: its rows give the number of classes.
CLS_LOGITS = {"torchvision": "head.classification_head.cls_logits.weight",
              "minidet": "classification_head.cls_logits.weight"}
NUM_ANCHORS = 9                     # A: 3 sizes x 3 aspect ratios per cell, in both libraries
EPS_KEY = "frozen_bn_eps"           # where `minidet convert` stores batch norm's eps in the .npz
PUBLISHED_EPS = 0.0                 # the eps of torchvision's published v1 COCO weights
SHOWN = 8                           # names listed in an error message, at most, per kind of problem


def torchvision_num_classes(state):
    """K, the number of classes of a RetinaNet state dict: the classification subnet's output rows / A (9).

    Accepts torchvision's names (``head.classification_head.cls_logits.weight``, shape (A*K, 256, 3, 3)) and
    minidet's (``classification_head.cls_logits.weight``). 91 for the COCO weights, whose labels are COCO's
    category ids 1-90 (label 0 and the 10 ids COCO leaves unused were never positives in training).
    """
    for name in CLS_LOGITS.values():
        if name in state:
            rows = np.shape(state[name])[0]
            if rows % NUM_ANCHORS:
                raise ValueError(f"{name} has {rows} output channels, not a multiple of the {NUM_ANCHORS} anchors "
                                 "per cell: not a retinanet_resnet50_fpn state dict")
            return rows // NUM_ANCHORS
    raise ValueError(f"no {CLS_LOGITS['torchvision']} (nor {CLS_LOGITS['minidet']}): not a RetinaNet state dict")


def _rename(name):
    """torchvision's name -> minidet's, or None where no rule applies."""
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def _torchvision_name(name):
    """minidet's name -> torchvision's (the rules backwards), for error messages."""
    for old, new in RENAMES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def _listing(what, names):
    """``"missing 2 keys: a, b"``, the names cut short after SHOWN of them."""
    shown = ", ".join(names[:SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")
    return f"{what.format(len(names), 's' if len(names) > 1 else '')}: {shown}"


def convert_torchvision_state_dict(state):
    """Rename torchvision's ``retinanet_resnet50_fpn`` (v1) state dict to minidet's (see the module docstring).

    Args:
        state: dict name -> array (NumPy arrays, or anything ``np.asarray`` takes), torchvision's names, e.g. the
            ``.pth`` file's tensors turned into NumPy arrays. ``num_batches_tracked`` entries may be there.

    Returns:
        dict name -> float32 NumPy array with exactly the names and shapes of
        ``RetinaNet(K, backbone="resnet50", preset="torchvision").state_dict()`` (301 arrays), in its order; K is
        ``torchvision_num_classes(state)``. Load it with ``load_torchvision_weights`` (which also sets eps).

    Raises:
        ValueError naming the torchvision keys that are missing, those that are unexpected and the shapes that
        differ, all at once: the dict is not that of ``retinanet_resnet50_fpn`` (v1).
    """
    arrays = {}                                          # minidet name -> array
    unexpected = []                                      # torchvision names no rule maps
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        new = _rename(name)
        if new is None:
            unexpected.append(name)
        else:
            arrays[new] = value
    # The names do not depend on K; shapes do (cls_logits only). Without cls_logits, K = 1 will do: that name is
    # reported missing below.
    has_cls_logits = CLS_LOGITS["torchvision"] in state
    num_classes = torchvision_num_classes(state) if has_cls_logits else 1
    # The model itself is the list of what must be there: its names and shapes (building it takes under a second).
    expected = {name: p.shape for name, p in RetinaNet(num_classes, backbone="resnet50",
                                                       preset="torchvision").state_dict().items()}
    unexpected += [_torchvision_name(name) for name in arrays if name not in expected]
    missing = [_torchvision_name(name) for name in expected if name not in arrays]
    mismatched = [f"{_torchvision_name(name)} {tuple(np.shape(arrays[name]))} instead of {shape}"
                  for name, shape in expected.items() if name in arrays and tuple(np.shape(arrays[name])) != shape]
    problems = []
    if missing:
        problems.append(_listing("missing {} key{}", missing))
    if unexpected:
        problems.append(_listing("unexpected {} key{}", unexpected))
    if mismatched:
        problems.append(_listing("wrong shape for {} key{}", mismatched))
    if problems:
        raise ValueError("not a state dict of torchvision's retinanet_resnet50_fpn (v1; v2 is not supported): "
                         + "; ".join(problems))
    return {name: np.asarray(arrays[name], dtype=np.float32) for name in expected}


def load_torchvision_weights(model, state, eps=None):
    """Load torchvision ``retinanet_resnet50_fpn`` weights into ``model`` and set its frozen batch norms' eps.

    Args:
        model: ``RetinaNet(K, backbone="resnet50", preset="torchvision")`` (its backbone in frozen batch norm, the
            preset's default), K being ``torchvision_num_classes(state)``.
        state: dict name -> array, either torchvision's own state dict (converted here) or one already converted,
            as ``minidet.load`` reads it from a file written by ``minidet convert``.
        eps: batch norm's eps for these weights. None takes the ``frozen_bn_eps`` stored in ``state`` (``minidet
            convert`` writes it), or else 0.0, the value torchvision sets for its published COCO weights. Give
            1e-5 for weights of a model torchvision built without ``overwrite_eps`` (e.g. trained by you from
            an ImageNet backbone), whose ``FrozenBatchNorm2d`` keeps the default eps.

    Returns:
        ``model``, now holding the weights, every ``FrozenBatchNorm2d`` with this eps.
    """
    if getattr(model, "preset", None) != "torchvision":
        raise ValueError("load_torchvision_weights: build the model with preset='torchvision' (P6 from P5, "
                         "torchvision's anchors and post-processing), "
                         f"got preset {getattr(model, 'preset', None)!r}")
    if tuple(model.backbone.out_channels) != (512, 1024, 2048):
        raise ValueError("load_torchvision_weights: build the model with backbone='resnet50'")
    state = dict(state)
    stored_eps = state.pop(EPS_KEY, None)
    if eps is None:
        eps = PUBLISHED_EPS if stored_eps is None else float(stored_eps)
    num_classes = torchvision_num_classes(state)
    if num_classes != model.num_classes:
        raise ValueError(f"load_torchvision_weights: the weights have {num_classes} classes, the model "
                         f"{model.num_classes}; build RetinaNet({num_classes}, ...)")
    if any(_rename(name) is not None for name in state):     # torchvision's names
        state = convert_torchvision_state_dict(state)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    if not frozen:
        raise ValueError("load_torchvision_weights: the model has no FrozenBatchNorm2d to set eps on; build it "
                         "with backbone_norm='frozen' (the torchvision preset's default)")
    model.load_state_dict(state)
    for norm in frozen:
        norm.eps = eps
    return model
