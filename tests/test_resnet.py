"""ResNet backbones: output shapes, torchvision's parameter names and layout, frozen vs trained norm, init."""

import math

import numpy as np
import pytest

import minidet as md
from minidet import nn
from minidet.models import resnet18, resnet34, resnet50, resnet_small
from minidet.models.resnet import Bottleneck


def image(n=1, h=64, w=96, seed=0):
    return md.tensor(np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32))


@pytest.mark.parametrize("build, channels", [(resnet18, (128, 256, 512)), (resnet34, (128, 256, 512)),
                                             (resnet50, (512, 1024, 2048)), (resnet_small, (32, 64, 128))])
def test_c3_c4_c5_have_strides_8_16_32_and_the_advertised_channels(build, channels):
    md.manual_seed(0)
    backbone = build()
    c3, c4, c5 = backbone(image(n=2, h=64, w=96))
    assert backbone.out_channels == channels
    assert c3.shape == (2, channels[0], 8, 12)
    assert c4.shape == (2, channels[1], 4, 6)
    assert c5.shape == (2, channels[2], 2, 3)


def test_blocks_per_stage():
    def blocks(backbone):
        return [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)]

    assert blocks(resnet18()) == [2, 2, 2, 2]
    assert blocks(resnet34()) == [3, 4, 6, 3]
    assert blocks(resnet50()) == [3, 4, 6, 3]
    assert blocks(resnet_small()) == [1, 1, 1, 1]


# Names and shapes of torchvision's resnet50 (the ``backbone.body.`` part of retinanet_resnet50_fpn's state dict).
TORCHVISION_RESNET50 = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.weight": (64,), "bn1.bias": (64,), "bn1.running_mean": (64,), "bn1.running_var": (64,),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.bn3.running_var": (256,),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.weight": (256,),
    "layer1.2.conv1.weight": (64, 256, 1, 1),
    "layer2.0.conv1.weight": (128, 256, 1, 1),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "layer2.0.downsample.1.running_mean": (512,),
    "layer3.5.conv3.weight": (1024, 256, 1, 1),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "layer4.2.bn3.bias": (2048,),
}


@pytest.mark.parametrize("norm", ["batch", "frozen"])
def test_resnet50_state_dict_uses_torchvisions_names_and_shapes(norm):
    state = resnet50(norm=norm).state_dict()
    for name, shape in TORCHVISION_RESNET50.items():
        assert state[name].shape == shape, name
    # torchvision's body has 265 entries besides its 53 ``num_batches_tracked`` counters: 53 convolutions (no
    # bias) and 53 norms with 4 arrays each. Nothing more, nothing less: no bias, no fc layer.
    assert len(state) == 53 + 53 * 4
    assert not any(name.endswith("num_batches_tracked") or name.startswith("fc") for name in state)
    assert "layer1.1.downsample.0.weight" not in state          # only the first block of a stage projects


def test_bottleneck_is_v1_5_the_stride_is_on_the_3x3_convolution():
    backbone = resnet50()
    for stage in (2, 3, 4):
        first = getattr(backbone, f"layer{stage}")[0]
        assert isinstance(first, Bottleneck)
        assert (first.conv1.stride, first.conv2.stride, first.conv3.stride) == (1, 2, 1)
        assert first.downsample[0].stride == 2
    assert backbone.layer1[0].conv2.stride == 1


def test_resnet18_projects_only_where_the_shape_changes():
    state = resnet18().state_dict()
    assert "layer1.0.downsample.0.weight" not in state           # 64 -> 64 channels, stride 1: identity
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)


def test_frozen_norm_has_no_trainable_parameters_and_ignores_the_training_mode():
    md.manual_seed(0)
    backbone = resnet_small(norm="frozen")
    assert all(name.endswith("conv1.weight") or name.endswith("conv2.weight") or ".downsample.0." in name
               for name, _ in backbone.named_parameters())
    assert isinstance(backbone.bn1, nn.FrozenBatchNorm2d)
    x = image()
    before = backbone.state_dict()
    train_out = backbone.train()(x)[2].numpy()
    eval_out = backbone.eval()(x)[2].numpy()
    np.testing.assert_array_equal(train_out, eval_out)
    assert all(np.array_equal(before[k], v) for k, v in backbone.state_dict().items())


def test_batch_norm_trains_and_updates_its_statistics():
    backbone = resnet_small(norm="batch")
    assert isinstance(backbone.bn1, nn.BatchNorm2d)
    assert {"bn1.weight", "bn1.bias"} <= {name for name, _ in backbone.named_parameters()}
    backbone(image(n=2))
    assert np.abs(backbone.bn1.running_mean).max() > 0


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        resnet18(norm="group")


def test_kaiming_normal_fan_out_initialisation():
    md.manual_seed(0)
    backbone = resnet50()
    weight = backbone.layer4[0].conv2.weight.numpy()            # (512, 512, 3, 3): fan_out = 512 * 9
    assert weight.mean() == pytest.approx(0, abs=1e-3)
    assert weight.std() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.01)
    assert np.all(backbone.layer4[0].bn2.weight.numpy() == 1) and np.all(backbone.layer4[0].bn2.bias.numpy() == 0)
