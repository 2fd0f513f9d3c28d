"""The feature pyramid and the two subnets: shapes, the top-down pathway, initialisation, gradients, and the
contract that row m of the subnets' outputs belongs to anchor m of ``minidet.anchors``."""

import math

import numpy as np
import pytest

import minidet as md
import minidet.functional as F
from minidet import nn
from minidet.anchors import cell_anchors
from minidet.models import ClassificationHead, FeaturePyramid, RegressionHead, RetinaNet
from minidet.testing import gradcheck


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def pyramid_inputs(rng, channels=(8, 16, 32), n=2, c3_size=(16, 24), dtype=np.float32):
    """C3, C4, C5 as a backbone gives them: each level half the size of the one before."""
    h, w = c3_size
    return [randn(rng, n, c, h // 2 ** i, w // 2 ** i, dtype=dtype) for i, c in enumerate(channels)]


def randomize(module, rng):
    """Random weights at the scale that keeps activations O(1) (std 1 / sqrt(fan_in)), and random biases and norm
    parameters. The subnets' own init (std 0.01) makes outputs and gradients so small that a wrong gradient
    would still pass a finite-difference check's absolute tolerance."""
    for p in module.parameters():
        fan_in = math.prod(p.shape[1:]) if p.ndim == 4 else 4
        p.data = rng.standard_normal(p.shape).astype(p.dtype) / math.sqrt(fan_in)
    return module


# --- the feature pyramid ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p6_input, p6_in_channels", [("c5", 32), ("p5", 16)])
def test_pyramid_levels_shapes(rng, p6_input, p6_in_channels):
    fpn = FeaturePyramid((8, 16, 32), out_channels=16, p6_input=p6_input)
    levels = fpn([md.tensor(c) for c in pyramid_inputs(rng)])        # C3 16x24, C4 8x12, C5 4x6
    assert [p.shape for p in levels] == [(2, 16, 16, 24), (2, 16, 8, 12), (2, 16, 4, 6), (2, 16, 2, 3),
                                         (2, 16, 1, 2)]              # P7: 2x3 halved and rounded up
    assert fpn.p6.weight.shape == (16, p6_in_channels, 3, 3)


@pytest.mark.parametrize("p6_input", ["c5", "p5"])
def test_p6_is_a_stride_2_convolution_of_its_input_and_p7_of_relu_p6(rng, p6_input):
    fpn = FeaturePyramid((8, 16, 32), out_channels=16, p6_input=p6_input)
    c3, c4, c5 = (md.tensor(c) for c in pyramid_inputs(rng))
    p3, p4, p5, p6, p7 = fpn([c3, c4, c5])
    source = c5 if p6_input == "c5" else p5
    np.testing.assert_allclose(p6.numpy(), F.conv2d(source, fpn.p6.weight, fpn.p6.bias, 2, 1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(p7.numpy(), F.conv2d(F.relu(p6), fpn.p7.weight, fpn.p7.bias, 2, 1).numpy(),
                               rtol=1e-6)


def test_unknown_p6_input_is_refused():
    with pytest.raises(ValueError, match="p6_input must be one of"):
        FeaturePyramid((8, 16, 32), p6_input="c6")


def identity_convs(fpn):
    """Every 1x1 lateral and 3x3 output convolution of a 1-channel pyramid made the identity."""
    for name in ("lateral3", "lateral4", "lateral5"):
        getattr(fpn, name).weight.data[...] = 1
    for name in ("output3", "output4", "output5"):
        conv = getattr(fpn, name)
        conv.weight.data[...] = 0
        conv.weight.data[0, 0, 1, 1] = 1                              # the centre tap
    return fpn


def test_top_down_pathway_adds_each_level_to_the_nearest_upsampled_coarser_one(rng):
    fpn = identity_convs(FeaturePyramid((1, 1, 1), out_channels=1))
    c3, c4, c5 = pyramid_inputs(rng, channels=(1, 1, 1), n=1, c3_size=(8, 12))
    p3, p4, p5 = (p.numpy() for p in fpn([md.tensor(c) for c in (c3, c4, c5)])[:3])

    def upsample(x):                                                 # nearest x2: each pixel a 2x2 block
        return x.repeat(2, axis=2).repeat(2, axis=3)

    np.testing.assert_allclose(p5, c5, rtol=1e-6)
    np.testing.assert_allclose(p4, c4 + upsample(c5), rtol=1e-6)
    np.testing.assert_allclose(p3, c3 + upsample(c4 + upsample(c5)), rtol=1e-6)


def test_information_flows_top_down_only(rng):
    fpn = FeaturePyramid((8, 16, 32), out_channels=16)
    inputs = pyramid_inputs(rng)
    before = [p.numpy() for p in fpn([md.tensor(c) for c in inputs])]
    inputs[0] = inputs[0] + 1                                        # change C3 only
    after = [p.numpy() for p in fpn([md.tensor(c) for c in inputs])]
    assert not np.allclose(before[0], after[0])                      # P3 sees it
    for level in range(1, 5):                                        # P4-P7 do not: no bottom-up path in the pyramid
        np.testing.assert_array_equal(before[level], after[level])


def test_pyramid_init_is_kaiming_uniform_with_a_1_and_zero_bias():
    md.manual_seed(0)
    fpn = FeaturePyramid((512, 1024, 2048), out_channels=256)
    bound = math.sqrt(3 / (256 * 9))                                 # sqrt(3 / fan_in) for a 3x3 conv on 256 channels
    weight = fpn.output3.weight.numpy()
    assert np.abs(weight).max() <= bound and weight.std() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert np.abs(fpn.lateral5.weight.numpy()).max() <= math.sqrt(3 / 2048)
    assert all(np.all(conv.bias.numpy() == 0) for conv in fpn.children())


@pytest.mark.parametrize("p6_input", ["c5", "p5"])
def test_pyramid_gradcheck(rng, p6_input):
    md.manual_seed(0)
    fpn = FeaturePyramid((4, 4, 4), out_channels=4, p6_input=p6_input).to(np.float64)
    inputs = pyramid_inputs(rng, channels=(4, 4, 4), n=1, c3_size=(8, 8), dtype=np.float64)

    def pyramid(c3, c4, c5):                 # every level's output, flattened into one row
        return F.cat([p.reshape(1, -1) for p in fpn([c3, c4, c5])], dim=1)

    gradcheck(pyramid, inputs, name=f"FeaturePyramid(p6_input={p6_input!r})")


# --- the subnets -----------------------------------------------------------------------------------------------------

LEVEL_SIZES = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]              # P3-P7 of a 64 x 96 image


def pyramid_levels(rng, channels=16, n=2, sizes=LEVEL_SIZES, dtype=np.float32):
    return [md.tensor(randn(rng, n, channels, h, w, dtype=dtype)) for h, w in sizes]


def test_classification_subnet_starts_every_anchor_at_the_prior(rng):
    md.manual_seed(0)
    head = ClassificationHead(16, num_anchors=9, num_classes=3)
    logits = head(pyramid_levels(rng))
    cells = sum(h * w for h, w in LEVEL_SIZES)
    assert logits.shape == (2, cells * 9, 3)
    assert head.cls_logits.bias.numpy() == pytest.approx(-math.log(99))          # -4.595
    np.testing.assert_allclose(F.sigmoid(logits).numpy(), 0.01, atol=2e-4)


def test_regression_subnet_shape_and_init(rng):
    md.manual_seed(0)
    head = RegressionHead(16, num_anchors=9)
    deltas = head(pyramid_levels(rng))
    assert deltas.shape == (2, sum(h * w for h, w in LEVEL_SIZES) * 9, 4)
    assert np.all(head.bbox_reg.bias.numpy() == 0)
    weight = RegressionHead(256, num_anchors=9).conv[0][0].weight.numpy()
    assert weight.std() == pytest.approx(0.01, rel=0.01) and weight.mean() == pytest.approx(0, abs=1e-4)


def test_subnet_parameter_names_follow_torchvision():
    cls_names = set(ClassificationHead(32, 9, 91).state_dict())
    assert cls_names == {f"conv.{i}.0.{p}" for i in range(4) for p in ("weight", "bias")} | {
        "cls_logits.weight", "cls_logits.bias"}
    assert ClassificationHead(32, 9, 91).state_dict()["cls_logits.weight"].shape == (9 * 91, 32, 3, 3)
    assert RegressionHead(32, 9).state_dict()["bbox_reg.weight"].shape == (9 * 4, 32, 3, 3)


def test_group_norm_option_puts_group_norm_before_each_relu():
    head = ClassificationHead(64, 9, 2, norm="group")
    for block in head.conv:
        conv, norm, relu = block
        assert conv.bias is None                                     # the norm's shift replaces the bias
        assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 32 and isinstance(relu, nn.ReLU)
    assert len(RegressionHead(64, 9, norm="group").conv[3]) == 3
    with pytest.raises(ValueError, match="unknown head norm 'batch'"):
        RegressionHead(64, 9, norm="batch")


@pytest.mark.parametrize("norm", [None, "group"])
@pytest.mark.parametrize("subnet", ["classification", "regression"])
def test_subnet_gradcheck_on_two_levels(rng, subnet, norm):
    md.manual_seed(0)
    channels = 32 if norm == "group" else 4                          # GroupNorm(32) needs a multiple of 32
    head = (ClassificationHead(channels, num_anchors=2, num_classes=3, num_convs=2, norm=norm) if subnet ==
            "classification" else RegressionHead(channels, num_anchors=2, num_convs=2, norm=norm))
    head = randomize(head.to(np.float64), rng)
    levels = [randn(rng, 2, channels, 4, 4, dtype=np.float64), randn(rng, 2, channels, 2, 2, dtype=np.float64)]
    gradcheck(lambda p3, p4: head([p3, p4]), levels, max_elements=300, name=f"{subnet} subnet, norm={norm}")


class FixedOutput(nn.Module):
    """Stands in for a subnet's last convolution: returns a given (N, A*D, H, W) map for each level's size."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, x):
        return md.tensor(self.maps[tuple(x.shape[-2:])])


@pytest.mark.parametrize("preset", ["paper", "torchvision"])
def test_subnet_channel_a_k_at_cell_y_x_is_the_row_of_anchor_a_at_that_cell(rng, preset):
    """The contract of heads.py with anchors.py, checked with a real model's anchors and its real subnets."""
    md.manual_seed(0)
    model = RetinaNet(num_classes=3, backbone="resnet_small", preset=preset, fpn_channels=16).eval()
    images = md.tensor(randn(rng, 1, 3, 64, 96))
    features = model.fpn(model.backbone(images))
    sizes = [tuple(p.shape[-2:]) for p in features]
    assert sizes == LEVEL_SIZES
    anchors = model.head_outputs(images)[2]
    num_anchors, num_classes = 9, 3
    # Bypass the towers, so the last layer's output is what we put there.
    model.classification_head.conv = nn.Sequential()
    model.regression_head.conv = nn.Sequential()
    for level, (a, k, y, x) in enumerate([(0, 2, 7, 11), (4, 1, 2, 5), (8, 0, 1, 2), (3, 2, 0, 1), (5, 1, 0, 0)]):
        cls_maps = {s: np.zeros((1, num_anchors * num_classes) + s, np.float32) for s in sizes}
        box_maps = {s: np.zeros((1, num_anchors * 4) + s, np.float32) for s in sizes}
        cls_maps[sizes[level]][0, a * num_classes + k, y, x] = 1
        box_maps[sizes[level]][0, a * 4:a * 4 + 4, y, x] = [1, 2, 3, 4]
        model.classification_head.cls_logits = FixedOutput(cls_maps)
        model.regression_head.bbox_reg = FixedOutput(box_maps)
        logits = model.classification_head(features).numpy()[0]    # (M, K)
        deltas = model.regression_head(features).numpy()[0]         # (M, 4)
        row, column = np.unravel_index(np.argmax(logits), logits.shape)
        assert column == k
        np.testing.assert_array_equal(deltas[row], [1, 2, 3, 4])
        assert np.count_nonzero(deltas) == 4
        # The anchor on that row, built independently: cell anchor a of the level, moved to cell (y, x).
        stride = 8 * 2 ** level
        offset = 0.5 if preset == "paper" else 0.0
        if preset == "torchvision":                                   # torchvision: image size // grid size
            stride_y, stride_x = 64 // sizes[level][0], 96 // sizes[level][1]
        else:
            stride_y = stride_x = stride
        centre = np.array([(x + offset) * stride_x, (y + offset) * stride_y] * 2, np.float32)
        expected = cell_anchors(32 * 2 ** level, preset=preset)[a] + centre
        np.testing.assert_allclose(anchors[row], expected, rtol=1e-6)
