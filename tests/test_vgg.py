"""VGG backbones: C3-C5 shapes and channels, torchvision's names, equality with torchvision's vgg on the same
weights (the small VGG learning to find shapes is in test_retinanet.py)."""

import numpy as np
import pytest
from backbone_checks import assert_same_feature_maps, realistic_batch_norm

import minidet as md
from minidet.models import VGG, convert_torchvision_vgg, vgg11, vgg11_bn, vgg16, vgg16_bn, vgg_small


@pytest.mark.parametrize("build, channels, weights", [
    (vgg16, (256, 512, 512), 14_714_688),          # torchvision's vgg16.features has exactly this many
    (vgg16_bn, (256, 512, 512), 14_723_136),       # and vgg16_bn.features (running statistics not counted)
    (vgg11, (256, 512, 512), 9_220_480),
    (vgg11_bn, (256, 512, 512), 9_225_984),
    (vgg_small, (64, 128, 128), 578_496),
])
def test_c3_c4_c5_have_strides_8_16_32_and_the_advertised_channels(build, channels, weights):
    backbone = build()
    c3, c4, c5 = backbone(md.tensor(np.zeros((2, 3, 96, 64), np.float32)))
    assert backbone.out_channels == channels
    assert [c.shape for c in (c3, c4, c5)] == [(2, channels[0], 12, 8), (2, channels[1], 6, 4), (2, channels[2], 3, 2)]
    assert sum(p.data.size for p in backbone.parameters()) == weights


def test_names_are_torchvisions_and_batch_norm_sits_between_conv_and_relu():
    backbone = vgg16_bn()
    kinds = [type(layer).__name__ for layer in backbone.features]
    assert kinds[:7] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert len(kinds) == 44 and backbone.taps == (23, 33, 43)          # torchvision's indices of pools 3, 4, 5
    names = set(backbone.state_dict())
    assert {"features.0.weight", "features.0.bias", "features.1.running_mean", "features.41.running_var"} <= names
    assert [type(layer).__name__ for layer in vgg16().features][:5] == ["Conv2d", "ReLU", "Conv2d", "ReLU",
                                                                       "MaxPool2d"]
    with pytest.raises(ValueError, match="the config has 4 poolings; C3-C5 need 5"):
        VGG((8, "M", 8, "M", 8, "M", 8, "M"))


def test_the_converter_keeps_the_features_and_refuses_what_is_not_a_vgg():
    state = {"features.0.weight": np.zeros(1), "features.1.num_batches_tracked": np.zeros(1),
             "classifier.0.weight": np.zeros(1)}
    assert list(convert_torchvision_vgg(state)) == ["features.0.weight"]
    with pytest.raises(ValueError, match=r"\['fc.weight'\] are not in a torchvision VGG"):
        convert_torchvision_vgg({"fc.weight": np.zeros(1)})


@pytest.mark.reference
@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "vgg11_bn"])
def test_feature_maps_equal_torchvisions_on_the_same_weights(torchvision, name):
    import torch

    torch.manual_seed(0)
    theirs = realistic_batch_norm(getattr(torchvision.models, name)(weights=None).eval())
    ours = {"vgg16": vgg16, "vgg16_bn": vgg16_bn, "vgg11_bn": vgg11_bn}[name](norm="frozen")
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    ours.load_state_dict(convert_torchvision_vgg(state))
    ours.eval()
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    assert_same_feature_maps(ours, theirs.features, ours.taps, images)
