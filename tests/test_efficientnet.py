"""EfficientNet-B0: C3-C5 shapes and channels, squeeze-and-excitation and stochastic depth, equality with
torchvision's efficientnet_b0 on the same weights, and a RetinaNet on it that learns."""

import numpy as np
import pytest
from backbone_checks import assert_same_feature_maps, realistic_batch_norm, training_losses

import minidet as md
from minidet.models import convert_torchvision_efficientnet, efficientnet_b0
from minidet.models.efficientnet import TAPS, SqueezeExcitation, StochasticDepth
from minidet.testing import gradcheck


def test_c3_c4_c5_have_strides_8_16_32_and_b0s_channels():
    backbone = efficientnet_b0()
    c3, c4, c5 = backbone(md.tensor(np.zeros((2, 3, 96, 64), np.float32)))
    assert backbone.out_channels == (40, 112, 320)
    assert [c.shape for c in (c3, c4, c5)] == [(2, 40, 12, 8), (2, 112, 6, 4), (2, 320, 3, 2)]
    # torchvision's efficientnet_b0 has 5,288,548 weights: these, plus features.8 (412,160) and the classifier
    assert sum(p.data.size for p in backbone.parameters()) == 3_595_388
    assert backbone.features[3][1].block[2].fc1.weight.shape == (10, 240, 1, 1)   # squeeze to in_channels / 4


def test_squeeze_excitation_is_a_per_channel_gate_with_a_correct_gradient(rng):
    md.manual_seed(0)
    se = SqueezeExcitation(6, 2).to(np.float64)
    x = rng.standard_normal((2, 6, 3, 4))
    gradcheck(lambda x: se(x), [x])
    gate = se(md.tensor(x)).numpy() / x
    np.testing.assert_allclose(gate, gate[:, :, :1, :1] * np.ones((1, 1, 3, 4)), rtol=1e-12)  # one per channel
    assert ((gate > 0) & (gate < 1)).all()


def test_stochastic_depth_drops_whole_images_keeps_the_mean_and_resumes():
    drop = StochasticDepth(0.25, seed=3)
    x = md.tensor(np.ones((4000, 1, 1, 1), np.float32))
    y = drop(x).numpy().reshape(-1)
    assert set(np.unique(y)) == {0, np.float32(1 / 0.75)} and abs(y.mean() - 1) < 0.05
    again = StochasticDepth(0.25, seed=3)
    again.load_state_dict(drop.state_dict())                # one draw counted: the next mask is the next one
    np.testing.assert_array_equal(again(x).numpy(), drop(x).numpy())
    assert drop.eval()(x) is x


@pytest.mark.reference
def test_feature_maps_equal_torchvisions_on_the_same_weights(torchvision):
    import torch

    torch.manual_seed(0)
    theirs = realistic_batch_norm(torchvision.models.efficientnet_b0(weights=None).eval())
    ours = efficientnet_b0(norm="frozen")
    ours.load_state_dict(convert_torchvision_efficientnet({k: v.numpy() for k, v in theirs.state_dict().items()}))
    ours.eval()
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    assert_same_feature_maps(ours, theirs.features, TAPS, images)


def test_retinanet_on_efficientnet_b0_learns_a_few_images():
    losses = training_losses("efficientnet_b0", num_images=4, lr=5e-4, steps=20)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
