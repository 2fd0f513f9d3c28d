"""EfficientNet: C3-C5 shapes and channels, compound scaling (B1-B7), squeeze-and-excitation and stochastic depth,
equality with torchvision's efficientnet_b0 and _b3 on the same weights, and a RetinaNet on it that learns."""

import numpy as np
import pytest
from backbone_checks import assert_same_feature_maps, realistic_batch_norm, training_losses

import minidet as md
from minidet.models import convert_torchvision_efficientnet, efficientnet, efficientnet_b0, efficientnet_small
from minidet.models.efficientnet import SCALING, TAPS, SqueezeExcitation, StochasticDepth, scaled_channels
from minidet.testing import gradcheck


def test_c3_c4_c5_have_strides_8_16_32_and_b0s_channels():
    backbone = efficientnet_b0()
    c3, c4, c5 = backbone(md.tensor(np.zeros((2, 3, 96, 64), np.float32)))
    assert backbone.out_channels == (40, 112, 320)
    assert [c.shape for c in (c3, c4, c5)] == [(2, 40, 12, 8), (2, 112, 6, 4), (2, 320, 3, 2)]
    # torchvision's efficientnet_b0 has 5,288,548 weights: these, plus features.8 (412,160) and the classifier
    assert sum(p.data.size for p in backbone.parameters()) == 3_595_388
    assert backbone.features[3][1].block[2].fc1.weight.shape == (10, 240, 1, 1)   # squeeze to in_channels / 4


# torchvision's num_params of efficientnet_b0 ... _b7 (its model documentation), whole classifiers.
TORCHVISION_NUM_PARAMS = {"b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232, "b4": 19_341_616,
                          "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960}


def test_compound_scaling_gives_b1_to_b7_with_torchvisions_weight_counts():
    assert [scaled_channels(c, 1.2) for c in (32, 16, 24, 40, 80, 112, 192, 320)] == [40, 24, 32, 48, 96, 136, 232,
                                                                                        384]
    assert scaled_channels(16, 0.5) == 8 and scaled_channels(24, 0.5) == 16    # 12 rounds to 8, lost > 10%: 16
    for variant, expected in TORCHVISION_NUM_PARAMS.items():
        backbone = efficientnet(variant)
        c5 = backbone.out_channels[-1]
        head = c5 * 4 * c5 + 2 * 4 * c5 + 4 * c5 * 1000 + 1000     # features.8 (1x1 conv to 4 x C5, batch norm), fc
        assert sum(p.data.size for p in backbone.parameters()) + head == expected, variant
    assert sum(len(stage) for stage in efficientnet("b7").features[1:]) == 55
    small = efficientnet_small()
    assert small.out_channels == (24, 56, 160) and sum(len(stage) for stage in small.features[1:]) == 10
    with pytest.raises(ValueError, match="unknown variant 'b8'"):
        efficientnet("b8")
    assert set(SCALING) == set(TORCHVISION_NUM_PARAMS)


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
@pytest.mark.parametrize("variant", ["b0", "b3"])
def test_feature_maps_equal_torchvisions_on_the_same_weights(torchvision, variant):
    import torch

    torch.manual_seed(0)
    theirs = realistic_batch_norm(getattr(torchvision.models, f"efficientnet_{variant}")(weights=None).eval())
    ours = efficientnet(variant, norm="frozen")
    ours.load_state_dict(convert_torchvision_efficientnet({k: v.numpy() for k, v in theirs.state_dict().items()}))
    ours.eval()
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    assert_same_feature_maps(ours, theirs.features, TAPS, images)


def test_retinanet_on_efficientnet_b0_learns_a_few_images():
    losses = training_losses("efficientnet_b0", num_images=4, lr=5e-4, steps=20)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
