"""torchvision's ``retinanet_resnet50_fpn`` weights in minidet: the converter, and the whole network end to end.

The first tests need neither torch nor torchvision: they convert a state dict written from the layout documented
for torchvision 0.28 (``torchvision_layout`` below), so a converter that merely inverts minidet's own names cannot
pass them. The ``reference`` tests then check that layout against torchvision's model, and run one randomly
initialised torchvision RetinaNet and its converted copy in minidet on the same images, stage by stage:

    images -> (torchvision's transform) -> C3-C5 -> P3-P7 -> head outputs, anchors -> losses, detections

Tolerances. Every stage is float32 on both sides. The convolutions add up their terms in different orders (NumPy's
matrix product against torch's convolution kernels), which moves each output by about 1e-7 relative, and 50 layers
compound it: the measured relative error (max |difference| / max |value|) is 0.9e-6 to 1.7e-6 at every stage,
against the 1e-4 allowed. The losses, fed with the same head outputs on both sides, agree to 1e-7 or better.

torchvision's model with ``weights=None`` uses plain ``BatchNorm2d``; in evaluation mode that computes the same as
a frozen batch norm with eps = 1e-5, so minidet loads its weights with eps = 1e-5. One test sets torchvision's eps
to 0 (the published COCO weights' value) and checks that minidet loaded with eps = 0 follows it.
"""

import numpy as np
import pytest

import minidet as md
from minidet.matching import match_anchors
from minidet.models import RetinaNet
from minidet.models.torchvision_weights import (
    EPS_KEY,
    RENAMES,
    convert_torchvision_state_dict,
    load_torchvision_weights,
    torchvision_num_classes,
)
from minidet.nn import FrozenBatchNorm2d
from minidet.testing import assert_close, relative_error

NUM_CLASSES = 5                  # not 4: the two subnets' outputs must not have the same shape
IMAGE_SIZE = (128, 160)          # multiples of 32, not square (P6 is 2 x 3, P7 1 x 2: torchvision's odd strides)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
RTOL = 1e-4                      # network outputs, relative to their largest value
LOSS_RTOL = 1e-5


def torchvision_layout(num_classes):
    """{name: shape} of torchvision's ``retinanet_resnet50_fpn`` (v1) state dict without ``num_batches_tracked``,
    written from torchvision's published layout, not from minidet's model."""
    layout = {}

    def conv(name, out_channels, in_channels, kernel_size, bias):
        layout[f"{name}.weight"] = (out_channels, in_channels, kernel_size, kernel_size)
        if bias:
            layout[f"{name}.bias"] = (out_channels,)

    def batch_norm(name, channels):
        for entry in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.{entry}"] = (channels,)

    conv("backbone.body.conv1", 64, 3, 7, bias=False)
    batch_norm("backbone.body.bn1", 64)
    in_channels = 64
    for stage, (num_blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(num_blocks):         # Bottlenecks: 1x1 width, 3x3 width, 1x1 4 * width
            prefix = f"backbone.body.layer{stage}.{block}"
            for i, (out_channels, inputs, kernel_size) in enumerate(
                    [(width, in_channels, 1), (width, width, 3), (4 * width, width, 1)], start=1):
                conv(f"{prefix}.conv{i}", out_channels, inputs, kernel_size, bias=False)
                batch_norm(f"{prefix}.bn{i}", out_channels)
            if block == 0:
                conv(f"{prefix}.downsample.0", 4 * width, in_channels, 1, bias=False)
                batch_norm(f"{prefix}.downsample.1", 4 * width)
            in_channels = 4 * width
    for i, channels in enumerate((512, 1024, 2048)):
        conv(f"backbone.fpn.inner_blocks.{i}.0", 256, channels, 1, bias=True)
        conv(f"backbone.fpn.layer_blocks.{i}.0", 256, 256, 3, bias=True)
    conv("backbone.fpn.extra_blocks.p6", 256, 256, 3, bias=True)       # on P5 (256 channels), not C5 (2048)
    conv("backbone.fpn.extra_blocks.p7", 256, 256, 3, bias=True)
    for head, last, outputs in [("classification_head", "cls_logits", 9 * num_classes),
                                ("regression_head", "bbox_reg", 9 * 4)]:
        for i in range(4):
            conv(f"head.{head}.conv.{i}.0", 256, 256, 3, bias=True)
        conv(f"head.{head}.{last}", outputs, 256, 3, bias=True)
    return layout


def numbered_state(layout):
    """A state dict of that layout, array i filled with the value i (so a value shows where it came from), plus
    a ``num_batches_tracked`` counter for every batch norm, as torchvision's BatchNorm2d has."""
    state = {name: np.full(shape, i, np.float32) for i, (name, shape) in enumerate(layout.items())}
    for name in [name for name in layout if name.endswith(".running_var")]:
        state[name.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return state


# --- the converter, without torch ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco_layout():
    return torchvision_layout(91)


def test_documented_layout_converts_to_minidets_names_and_shapes(coco_layout):
    state = numbered_state(coco_layout)
    assert len(state) == 354 and len(coco_layout) == 354 - 53    # torchvision 0.28: 354 keys, 53 num_batches_tracked
    converted = convert_torchvision_state_dict(state)

    model = RetinaNet(91, backbone="resnet50", preset="torchvision")
    expected = model.state_dict()
    assert list(converted) == list(expected), "the names, in the model's order"
    for name, array in converted.items():
        assert array.shape == expected[name].shape and array.dtype == np.float32, name
    # every value went to one place: the 301 distinct fill values all arrive
    assert sorted(int(a.flat[0]) for a in converted.values()) == list(range(len(coco_layout)))
    # a few names spelled out, as the module docstring gives them
    for torchvision_name, minidet_name in [
            ("backbone.body.conv1.weight", "backbone.conv1.weight"),
            ("backbone.body.layer2.0.downsample.1.running_var", "backbone.layer2.0.downsample.1.running_var"),
            ("backbone.fpn.inner_blocks.0.0.weight", "fpn.lateral3.weight"),
            ("backbone.fpn.inner_blocks.2.0.bias", "fpn.lateral5.bias"),
            ("backbone.fpn.layer_blocks.1.0.weight", "fpn.output4.weight"),
            ("backbone.fpn.extra_blocks.p6.weight", "fpn.p6.weight"),
            ("backbone.fpn.extra_blocks.p7.bias", "fpn.p7.bias"),
            ("head.classification_head.conv.3.0.weight", "classification_head.conv.3.0.weight"),
            ("head.classification_head.cls_logits.bias", "classification_head.cls_logits.bias"),
            ("head.regression_head.bbox_reg.weight", "regression_head.bbox_reg.weight")]:
        np.testing.assert_array_equal(converted[minidet_name], state[torchvision_name], err_msg=torchvision_name)

    load_torchvision_weights(model, state)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 53 and all(m.eps == 0.0 for m in frozen), "the published weights' eps by default"
    np.testing.assert_array_equal(model.fpn.lateral5.weight.numpy(), state["backbone.fpn.inner_blocks.2.0.weight"])


def test_num_classes_from_either_naming(coco_layout):
    state = {name: np.zeros(shape, np.float32) for name, shape in coco_layout.items()
             if name.startswith("head.classification_head.cls_logits")}
    assert torchvision_num_classes(state) == 91
    assert torchvision_num_classes({"classification_head.cls_logits.weight": np.zeros((27, 256, 3, 3))}) == 3
    with pytest.raises(ValueError, match="cls_logits.weight has 20 output channels, not a multiple of the 9"):
        torchvision_num_classes({"head.classification_head.cls_logits.weight": np.zeros((20, 256, 3, 3))})


@pytest.mark.parametrize("change, message", [
    ("drop backbone.body.layer3.5.bn2.running_mean",
     r"missing 1 key: backbone\.body\.layer3\.5\.bn2\.running_mean$"),
    ("add backbone.fpn.extra_blocks.p8.weight",
     r"unexpected 1 key: backbone\.fpn\.extra_blocks\.p8\.weight$"),
    ("add roi_heads.box_predictor.cls_score.weight",        # another detector's name: no rule maps it
     r"unexpected 1 key: roi_heads\.box_predictor\.cls_score\.weight$"),
    ("add head.classification_head.conv.0.1.weight",        # v2's GroupNorm in the subnets
     r"\(v1; v2 is not supported\): unexpected 1 key: head\.classification_head\.conv\.0\.1\.weight$"),
    ("resize backbone.fpn.extra_blocks.p6.weight",          # P6 on C5, as v2 and the paper have it
     r"wrong shape for 1 key: backbone\.fpn\.extra_blocks\.p6\.weight \(256, 2048, 3, 3\) instead of "
     r"\(256, 256, 3, 3\)$"),
])
def test_converter_names_what_is_wrong(coco_layout, change, message):
    state = {name: np.zeros(shape, np.float32) for name, shape in coco_layout.items()}
    action, name = change.split()
    if action == "drop":
        del state[name]
    elif action == "add":
        state[name] = np.zeros(3, np.float32)
    else:
        state[name] = np.zeros((256, 2048, 3, 3), np.float32)
    with pytest.raises(ValueError, match="^not a state dict of torchvision's retinanet_resnet50_fpn .*" + message):
        convert_torchvision_state_dict(state)


def test_converter_lists_many_problems_briefly():
    """A state dict of something else entirely: every name is unexpected, but the message stays one short line."""
    state = {f"features.{i}.weight": np.zeros(3, np.float32) for i in range(40)}
    with pytest.raises(ValueError) as error:
        convert_torchvision_state_dict(state)
    message = str(error.value)
    assert "missing 301 keys: backbone.body.conv1.weight, " in message and ", ... (301 in all)" in message
    assert "unexpected 40 keys: features.0.weight, " in message and ", ... (40 in all)" in message
    assert "\n" not in message and len(message) < 1200


def test_load_refuses_a_model_that_cannot_hold_the_weights(coco_layout):
    state = {name: np.zeros(shape, np.float32) for name, shape in coco_layout.items()}
    with pytest.raises(ValueError, match="preset='torchvision'"):
        load_torchvision_weights(RetinaNet(91, backbone="resnet_small"), state)
    with pytest.raises(ValueError, match="backbone='resnet50'"):
        load_torchvision_weights(RetinaNet(91, backbone="resnet_small", preset="torchvision"), state)
    with pytest.raises(ValueError, match=r"the weights have 91 classes, the model 3; build RetinaNet\(91, ...\)"):
        load_torchvision_weights(RetinaNet(3, backbone="resnet50", preset="torchvision"), state)


def test_eps_comes_from_the_argument_then_the_file_then_the_published_value(coco_layout):
    converted = convert_torchvision_state_dict({name: np.zeros(shape, np.float32)
                                                for name, shape in coco_layout.items()})
    model = RetinaNet(91, backbone="resnet50", preset="torchvision")

    def eps_values():
        return {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}

    load_torchvision_weights(model, converted)
    assert eps_values() == {0.0}
    load_torchvision_weights(model, {**converted, EPS_KEY: np.array(1e-5)})
    assert eps_values() == {1e-5}
    load_torchvision_weights(model, {**converted, EPS_KEY: np.array(1e-5)}, eps=1e-3)
    assert eps_values() == {1e-3}


# --- the reference: torchvision's model and its converted copy -------------------------------------------------

def randomise(model, torch):
    """Give torchvision's model weights whose outputs are worth comparing (in place).

    - Every batch norm: running_var spread over 1e-4 ... 1 (so eps matters: in a channel of variance 1e-4 an
      eps of 1e-5 changes the scale by 5%), weight = sqrt(running_var) * U(0.5, 1.5) (so each layer's scale stays
      near 1 and the activations do not explode), random running_mean and bias. torchvision's own init would
      make every batch norm the identity, which hides a wrong mapping of their four arrays.
    - The subnets' towers: He initialisation instead of N(0, 0.01), so their outputs are not all near zero.
    The last layers of the subnets are set by ``calibrate_heads``.
    """
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                variance = 10 ** (torch.rand(c, generator=generator) * 4 - 4)
                module.running_var.copy_(variance)
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                module.weight.copy_(variance.sqrt() * (0.5 + torch.rand(c, generator=generator)))
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
        for head in (model.head.classification_head, model.head.regression_head):
            for block in head.conv:
                conv = block[0]
                conv.weight.normal_(0, (2 / (9 * 256)) ** 0.5, generator=generator)
                conv.bias.normal_(0, 0.1, generator=generator)


def calibrate_heads(model, images, torch):
    """Scale the subnets' last convolutions so the logits have std 2 around class biases near -5.5 (about one
    (anchor, class) pair in ten scores above 0.05: more than the 1000 kept on P3, few enough for a short NMS), and
    the box offsets std 0.5."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        features = list(model.backbone(images).values())
        for head, last, std in [(model.head.classification_head, "cls_logits", 2.0),
                                (model.head.regression_head, "bbox_reg", 0.5)]:
            conv = getattr(head, last)
            conv.weight.normal_(0, 1, generator=generator)
            conv.bias.zero_()
            outputs = torch.cat([conv(head.conv(p)).flatten() for p in features])
            conv.weight.mul_(std / float(outputs.std()))
        bias = model.head.classification_head.cls_logits.bias
        bias.copy_(-5.5 + 0.5 * torch.randn(bias.shape, generator=generator))


def to_numpy(tensors):
    return [t.detach().numpy() for t in tensors]


@pytest.fixture(scope="module")
def pair(torchvision):
    """torchvision's RetinaNet (randomised, eval mode), minidet's with the converted weights (eps 1e-5), two
    images, and both models' outputs at every stage on them."""
    import torch
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    height, width = IMAGE_SIZE
    # min_size = the shorter side and max_size = the longer one: torchvision's transform keeps the size (scale 1)
    tv_model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                      min_size=height, max_size=width).eval()
    images = np.random.default_rng(0).random((2, 3, height, width), dtype=np.float32)   # RGB in [0, 1]
    normalised = (images - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]  # (N, 3, H, W) float32

    randomise(tv_model, torch)
    calibrate_heads(tv_model, torch.from_numpy(normalised), torch)
    tv = {}
    with torch.no_grad():
        image_list, _ = tv_model.transform([torch.from_numpy(image) for image in images])
        x = image_list.tensors
        tv["transformed"], tv["image_sizes"] = x.numpy(), image_list.image_sizes
        tv["C"] = to_numpy(tv_model.backbone.body(x).values())
        features = list(tv_model.backbone(x).values())
        tv["P"] = to_numpy(features)
        head_outputs = tv_model.head(features)
        tv["cls_logits"], tv["bbox_regression"] = to_numpy(head_outputs.values())
        tv["anchors"] = to_numpy(tv_model.anchor_generator(image_list, features))
    state = {name: value.numpy() for name, value in tv_model.state_dict().items()}

    md_model = RetinaNet(NUM_CLASSES, backbone="resnet50", preset="torchvision")
    load_torchvision_weights(md_model, state, eps=1e-5)   # BatchNorm2d in eval mode = frozen batch norm, eps 1e-5
    md_model.eval()
    mine = {}
    with md.no_grad():
        c = md_model.backbone(md.tensor(normalised))
        p = md_model.fpn(c)
        mine["C"], mine["P"] = [t.numpy() for t in c], [t.numpy() for t in p]
        mine["cls_logits"] = md_model.classification_head(p).numpy()
        mine["bbox_regression"] = md_model.regression_head(p).numpy()
        mine["anchors"] = md_model.anchor_generator(IMAGE_SIZE, [t.shape[-2:] for t in p])
    return {"tv_model": tv_model, "md_model": md_model, "state": state, "images": images,
            "normalised": normalised, "tv": tv, "md": mine}


@pytest.mark.reference
def test_documented_layout_is_torchvisions(pair):
    state = pair["state"]
    assert len(state) == 354, "301 arrays and 53 num_batches_tracked counters"
    layout = {name: value.shape for name, value in state.items() if not name.endswith("num_batches_tracked")}
    assert layout == torchvision_layout(NUM_CLASSES)
    assert torchvision_num_classes(state) == NUM_CLASSES


@pytest.mark.reference
def test_transform_leaves_the_normalised_images_bit_identical(pair):
    """So every later stage can be fed the same array: min_size and max_size equal to the image's sides give a
    resize by exactly 1 (bilinear, weights 1 and 0), and sizes that are multiples of 32 need no padding."""
    assert pair["tv"]["image_sizes"] == [IMAGE_SIZE, IMAGE_SIZE]
    np.testing.assert_array_equal(pair["tv"]["transformed"], pair["normalised"])


@pytest.mark.reference
def test_backbone_features_c3_c5(pair):
    for level, (actual, expected) in enumerate(zip(pair["md"]["C"], pair["tv"]["C"]), start=3):
        assert_close(actual, expected, RTOL, name=f"C{level}")


@pytest.mark.reference
def test_feature_pyramid_p3_p7(pair):
    for level, (actual, expected) in enumerate(zip(pair["md"]["P"], pair["tv"]["P"]), start=3):
        assert_close(actual, expected, RTOL, name=f"P{level}")


@pytest.mark.reference
def test_head_outputs(pair):
    """(N, M, K) logits and (N, M, 4) offsets, M = 9 * (16*20 + 8*10 + 4*5 + 2*3 + 1*2) = 3852 anchors."""
    cls_logits, bbox_regression = pair["md"]["cls_logits"], pair["md"]["bbox_regression"]
    assert cls_logits.shape == (2, 3852, NUM_CLASSES) and bbox_regression.shape == (2, 3852, 4)
    assert_close(cls_logits, pair["tv"]["cls_logits"], RTOL, name="cls_logits")
    assert_close(bbox_regression, pair["tv"]["bbox_regression"], RTOL, name="bbox_regression")
    scores = 1 / (1 + np.exp(-cls_logits))
    assert 0.03 < (scores > 0.05).mean() < 0.3, "the calibration gives some, not all, scores above 0.05"


@pytest.mark.reference
def test_anchors_for_the_models_feature_sizes(pair):
    for image, anchors in enumerate(pair["tv"]["anchors"]):
        np.testing.assert_array_equal(pair["md"]["anchors"], anchors, err_msg=f"anchors of image {image}")


LOSS_TARGETS = {
    # image 0: two ordinary boxes and a 14 x 10 one that no anchor overlaps by 0.5 (it gets low-quality matches
    # only); image 1: no boxes, all background
    "one image without boxes": [
        ([[10, 20, 70, 90], [100, 30, 150, 120], [60, 60, 74, 70]], [0, 4, 2]),
        ([], [])],
    # image 1: the whole image (larger than any anchor it overlaps well) and a box with fractional corners
    "boxes in both images": [
        ([[10, 20, 70, 90], [60, 60, 74, 70]], [1, 1]),
        ([[0, 0, 160, 128], [30.5, 40.25, 50.75, 95.5]], [3, 0])],
}


@pytest.mark.reference
@pytest.mark.parametrize("case", LOSS_TARGETS)
def test_losses_on_the_same_head_outputs(pair, case):
    """torchvision's ``compute_loss`` and minidet's, both fed torchvision's head outputs and anchors."""
    import torch

    targets = [{"boxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": np.array(labels, np.int64)}
               for boxes, labels in LOSS_TARGETS[case]]
    tv = pair["tv"]
    expected = pair["tv_model"].compute_loss(
        [{k: torch.from_numpy(v) for k, v in t.items()} for t in targets],
        {"cls_logits": torch.from_numpy(tv["cls_logits"]), "bbox_regression": torch.from_numpy(tv["bbox_regression"])},
        [torch.from_numpy(a) for a in tv["anchors"]])
    actual = pair["md_model"].compute_loss(md.tensor(tv["cls_logits"]), md.tensor(tv["bbox_regression"]),
                                           tv["anchors"][0], targets)
    assert_close(actual["classification"].numpy(), expected["classification"].numpy(), LOSS_RTOL,
                 name="classification loss")
    assert_close(actual["box_regression"].numpy(), expected["bbox_regression"].numpy(), LOSS_RTOL,
                 name="box regression loss")
    # the targets exercise what they should: low-quality matches add positives
    strict = sum(int((match_anchors(tv["anchors"][0], t["boxes"], 0.5, 0.4, False)[0] >= 0).sum())
                 for t in targets if len(t["boxes"]))
    assert actual["num_positive"] > strict > 0


def pair_detections(mine, theirs, name, score_atol=1e-5, box_atol=1e-3):
    """Pair minidet's detections of one image with torchvision's, rank by rank; returns how many pairs are out of
    order.

    Detection i of minidet must have the label, the box (within ``box_atol`` pixels) and the score (within
    ``score_atol``) of torchvision's detection i, or, where the two rank a near tie differently, of another of
    torchvision's detections whose score is within ``score_atol`` of it. The scores of the two sides differ by up
    to about 3e-6 (logits of up to 13 differ by up to 1.2e-5, times p (1 - p) <= 1/4), so two detections whose
    scores are closer than that may come out in either order: for those, and only those, the order is compared as
    a set.
    """
    count = len(theirs["scores"])
    assert len(mine["scores"]) == count, f"{name}: {len(mine['scores'])} detections, torchvision {count}"
    unpaired = list(range(count))
    out_of_order = 0
    for i in range(count):
        candidates = [j for j in unpaired
                      if abs(float(theirs["scores"][j]) - float(mine["scores"][i])) <= score_atol
                      and theirs["labels"][j] == mine["labels"][i]
                      and np.abs(theirs["boxes"][j] - mine["boxes"][i]).max() <= box_atol]
        assert candidates, (
            f"{name}: detection {i} (label {mine['labels'][i]}, score {mine['scores'][i]:.7f}, box "
            f"{mine['boxes'][i]}) is not torchvision's: label {theirs['labels'][i]}, score "
            f"{theirs['scores'][i]:.7f}, box {theirs['boxes'][i]}")
        j = i if i in candidates else candidates[0]
        unpaired.remove(j)
        out_of_order += j != i
    return out_of_order


@pytest.mark.reference
def test_detections(pair):
    """torchvision's own forward (transform, network, post-processing with its NMS) against minidet's ``predict``
    on the normalised images: the same detections, in the same order.

    The settings are the defaults on both sides (score > 0.05, top 1000 per level, NMS 0.5, keep 300). About 1290
    (anchor, class) pairs of P3 score above 0.05, so the top-1000 cut is exercised; NMS leaves 280 and 292
    detections. With these images every detection comes out at the same rank on both sides (measured; the
    smallest gap between two of torchvision's scores is 1.3e-6), but ``pair_detections`` would accept near ties in
    either order, as another BLAS could rank them.
    """
    import torch

    tv_model, md_model = pair["tv_model"], pair["md_model"]
    assert tv_model.score_thresh == md_model.score_thresh == 0.05
    assert (tv_model.topk_candidates, tv_model.nms_thresh, tv_model.detections_per_img) == (
        md_model.topk_candidates, md_model.nms_thresh, md_model.detections_per_img) == (1000, 0.5, 300)
    with torch.no_grad():
        expected = tv_model([torch.from_numpy(image) for image in pair["images"]])
    actual = md_model.predict(pair["normalised"])
    assert len(actual) == len(expected) == 2
    for image, (mine, theirs) in enumerate(zip(actual, expected)):
        theirs = {name: value.numpy() for name, value in theirs.items()}
        assert len(theirs["scores"]) > 100, f"image {image}: enough detections to compare"
        assert mine["labels"].dtype == theirs["labels"].dtype == np.int64
        pair_detections(mine, theirs, f"image {image}")


@pytest.mark.reference
def test_eps_zero_as_for_the_published_weights(pair):
    """torchvision's batch norms with eps 0 (what ``overwrite_eps`` does to the COCO weights), minidet loaded with
    eps 0: the outputs agree again. Loaded with the default 1e-5 instead, they would be far off."""
    import torch

    tv_model, md_model = pair["tv_model"], pair["md_model"]
    norms = [m for m in tv_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.from_numpy(pair["normalised"])
    try:
        for norm in norms:
            norm.eps = 0.0
        with torch.no_grad():
            features = list(tv_model.backbone(x).values())
            expected = to_numpy(tv_model.head(features).values())
        load_torchvision_weights(md_model, pair["state"], eps=0.0)
        with md.no_grad():
            p = md_model.fpn(md_model.backbone(md.tensor(pair["normalised"])))
            actual = [md_model.classification_head(p).numpy(), md_model.regression_head(p).numpy()]
    finally:
        for norm in norms:
            norm.eps = 1e-5
        load_torchvision_weights(md_model, pair["state"], eps=1e-5)
    for level, (a, e) in enumerate(zip(p, features), start=3):
        assert_close(a.numpy(), e.numpy(), RTOL, name=f"P{level}, eps 0")
    assert_close(actual[0], expected[0], RTOL, name="cls_logits, eps 0")
    assert_close(actual[1], expected[1], RTOL, name="bbox_regression, eps 0")
    # the eps-1e-5 outputs (the fixture's) against torchvision's eps-0 ones: the wrong eps is not within RTOL
    assert relative_error(pair["md"]["cls_logits"], expected[0]) > 100 * RTOL


@pytest.mark.reference
@pytest.mark.slow
def test_training_losses_and_every_gradient_in_float64(pair):
    """A training step's losses and the gradient of every weight, minidet against torchvision, both in float64 from
    the same weights and images: equal up to the order of float64 sums.

    torchvision's side runs its training forward's steps (backbone, head, anchors, ``compute_loss``) with the
    model in evaluation mode, where its batch norms compute what minidet's frozen ones do. Their weights and biases
    are trainable there and buffers in minidet, so the gradients compared are those of minidet's parameters: every
    convolution of the backbone, the pyramid and the subnets. (Measured: 1e-14 relative or better.)
    """
    import copy

    import torch
    from torchvision.models.detection.image_list import ImageList

    tv_model = copy.deepcopy(pair["tv_model"]).double()          # float32 weights, exactly, now in float64
    md_model = load_torchvision_weights(RetinaNet(NUM_CLASSES, backbone="resnet50", preset="torchvision"),
                                        pair["state"], eps=1e-5).to(np.float64)
    x = pair["normalised"].astype(np.float64)
    targets = [{"boxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": np.array(labels, np.int64)}
               for boxes, labels in LOSS_TARGETS["boxes in both images"]]

    images = torch.from_numpy(x)
    features = list(tv_model.backbone(images).values())
    anchors = tv_model.anchor_generator(ImageList(images, [IMAGE_SIZE] * len(x)), features)
    expected = tv_model.compute_loss([{k: torch.from_numpy(v) for k, v in t.items()} for t in targets],
                                     tv_model.head(features), anchors)
    (expected["classification"] + expected["bbox_regression"]).backward()
    actual = md_model(x, targets)
    actual["loss"].backward()

    assert_close(actual["classification"].numpy(), expected["classification"].detach().numpy(), 1e-12,
                 name="classification loss")
    assert_close(actual["box_regression"].numpy(), expected["bbox_regression"].detach().numpy(), 1e-12,
                 name="box regression loss")
    their_gradients = {}
    for name, parameter in tv_model.named_parameters():      # torchvision's names -> minidet's (the converter's rule)
        old, new = next((old, new) for old, new in RENAMES if name.startswith(old))
        their_gradients[new + name[len(old):]] = parameter.grad.numpy()
    ours = dict(md_model.named_parameters())
    assert len(ours) == 53 + 16 + 10 + 10, "53 convolutions in the backbone; 8 in the pyramid, 5 in each subnet, biased"
    for name, parameter in ours.items():
        assert_close(parameter.grad, their_gradients[name], 1e-10, name=f"gradient of {name}")
