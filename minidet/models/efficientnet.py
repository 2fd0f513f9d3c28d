"""EfficientNet-B0 to B7: the third family of backbones the article names, built for accuracy per weight.

EfficientNet (Tan and Le, 2019) stacks MBConv blocks (MobileNetV2's inverted residuals): each block widens its
input with a 1x1 convolution (the expansion, 6x), filters each channel on its own with a depthwise convolution
(``groups`` = channels: one 3x3 or 5x5 kernel per channel, instead of one per pair of channels), reweights the
channels with squeeze-and-excitation, and projects back down with a 1x1 convolution; the activation is SiLU,
x * sigmoid(x). Where the shape is kept, the block adds its input (a residual), and in training that residual
branch is sometimes dropped for a whole image (stochastic depth), a regulariser.

Shapes, for an input (N, 3, H, W)::

    features.0: 3x3 conv stride 2, 32 ch                    -> H/2
    features.1: 1 block,  16 ch, 3x3                         -> H/2
    features.2: 2 blocks, 24 ch, 3x3, stride 2               -> H/4
    features.3: 2 blocks, 40 ch, 5x5, stride 2               -> H/8     C3
    features.4: 3 blocks, 80 ch, 3x3, stride 2               -> H/16
    features.5: 3 blocks, 112 ch, 5x5                        -> H/16    C4
    features.6: 4 blocks, 192 ch, 5x5, stride 2              -> H/32
    features.7: 1 block,  320 ch, 3x3                        -> H/32    C5

B1 to B7 are B0 grown by *compound scaling*, the idea of the EfficientNet paper: every stage's channels are
multiplied by a width factor and its number of blocks by a depth factor, both fixed per model (``SCALING``), while
the input images grow too (240 px for B1 ... 600 px for B7). ``efficientnet_small`` runs the same rule the other
way, for a laptop CPU.

The layout and names are torchvision's ``efficientnet_b0`` to ``_b7`` (``features.3.1.block.2.fc1.weight``, ...),
so their ``features.*`` weights load as they are (``convert_torchvision_efficientnet``). Their last 1x1 convolution
(``features.8``, to 4x the channels of C5) and the classifier serve ImageNet classification only and are left out.
"""

import math

import numpy as np

from minidet import backend, nn
from minidet import functional as F
from minidet.autograd import Tensor
from minidet.models.resnet import _norm_layer
from minidet.nn import init

# (expansion, kernel, stride, input channels, output channels, blocks) of each stage: EfficientNet-B0.
B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
             (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
# Compound scaling: (width, depth) factors of each model, as the paper and torchvision have them.
SCALING = {"b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4), "b4": (1.4, 1.8),
           "b5": (1.6, 2.2), "b6": (1.8, 2.6), "b7": (2.0, 3.1)}
# The stages whose outputs are C3, C4, C5 (features.3, .5 and .7).
TAPS = (3, 5, 7)
# Stochastic depth: block b of B drops its residual branch with probability 0.2 * b / B in training.
STOCHASTIC_DEPTH = 0.2


def scaled_channels(channels, width):
    """``channels`` x ``width``, rounded to the nearest multiple of 8 (at least 8), and up by 8 more if rounding
    lost over 10% (torchvision's and the paper's rule, which keeps the matrix products' sizes multiples of 8)."""
    rounded = max(8, int(channels * width + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * channels * width else rounded


def scaled_stages(width, depth, stages=B0_STAGES):
    """``stages`` with every channel count scaled by ``width`` (``scaled_channels``) and every block count by
    ``depth``, rounded up: compound scaling."""
    return tuple((expansion, kernel, stride, scaled_channels(in_channels, width), scaled_channels(out_channels, width),
                  math.ceil(blocks * depth))
                 for expansion, kernel, stride, in_channels, out_channels, blocks in stages)


def conv_norm_act(in_channels, out_channels, kernel_size, stride=1, groups=1, norm="batch", activation=True):
    """torchvision's ``Conv2dNormActivation``: a convolution without bias, a norm, and SiLU (unless not asked)."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                        groups=groups, bias=False), _norm_layer(norm, out_channels)]
    return nn.Sequential(*layers, nn.SiLU()) if activation else nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Reweight each channel by a gate computed from the whole map: x * sigmoid(fc2(silu(fc1(mean over H, W)))).

    The mean summarises each channel in one number; two 1x1 convolutions (a bottleneck of ``squeeze_channels``)
    turn the C numbers into C gates in (0, 1), so the block can stress the channels that matter for this image.
    """

    def __init__(self, channels, squeeze_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x):
        summary = F.mean(x, dim=(2, 3), keepdim=True)                            # (N, C, 1, 1)
        gate = F.sigmoid(self.fc2(F.silu(self.fc1(summary))))                    # (N, C, 1, 1)
        return x * gate


class StochasticDepth(nn.Module):
    """In training, zero the input for each image with probability ``p`` and scale the rest by 1 / (1 - p), so the
    expected value is unchanged; in evaluation, the identity (torchvision's ``StochasticDepth`` in "row" mode).

    The images to drop are drawn from a generator seeded with (``seed``, the count of draws so far); the count is a
    buffer, saved with the weights, so a resumed run draws what the uninterrupted one would have.
    """

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed
        self.register_buffer("draws", np.zeros(1, np.int64))

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        rng = np.random.default_rng([self.seed, int(self.draws[0])])
        self.draws += 1
        keep = (rng.random(x.shape[0]) >= self.p).astype(x.dtype) / (1 - self.p)           # (N,)
        device = backend.device_of(x.data if isinstance(x, Tensor) else x)
        return x * backend.to_device(keep.reshape(-1, 1, 1, 1), device)


class MBConv(nn.Module):
    """An inverted residual block: expand (1x1), depthwise (k x k), squeeze-and-excitation, project (1x1)."""

    def __init__(self, expansion, kernel_size, stride, in_channels, out_channels, drop_p, seed, norm="batch"):
        super().__init__()
        expanded = in_channels * expansion
        layers = [conv_norm_act(in_channels, expanded, 1, norm=norm)] if expansion != 1 else []
        layers += [conv_norm_act(expanded, expanded, kernel_size, stride, groups=expanded, norm=norm),
                   SqueezeExcitation(expanded, max(1, in_channels // 4)),
                   conv_norm_act(expanded, out_channels, 1, norm=norm, activation=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels
        self.stochastic_depth = StochasticDepth(drop_p, seed)

    def forward(self, x):
        y = self.block(x)
        return x + self.stochastic_depth(y) if self.residual else y


class EfficientNet(nn.Module):
    """An EfficientNet backbone that returns the feature maps C3, C4, C5.

    Args:
        stages: (expansion, kernel, stride, in channels, out channels, blocks) per stage, as ``B0_STAGES``.
        norm: ``"batch"`` or ``"frozen"``.

    Attributes:
        out_channels: the channels of (C3, C4, C5): (40, 112, 320) for B0.
    """

    def __init__(self, stages=B0_STAGES, norm="batch"):
        super().__init__()
        total = sum(stage[-1] for stage in stages)
        layers, index = [conv_norm_act(3, stages[0][3], 3, stride=2, norm=norm)], 0
        for expansion, kernel, stride, in_channels, out_channels, blocks in stages:
            stage = []
            for b in range(blocks):
                stage.append(MBConv(expansion, kernel, stride if b == 0 else 1, in_channels if b == 0 else out_channels,
                                    out_channels, STOCHASTIC_DEPTH * index / total, seed=index, norm=norm))
                index += 1
            layers.append(nn.Sequential(*stage))
        self.features = nn.Sequential(*layers)
        self.out_channels = tuple(stages[tap - 1][4] for tap in TAPS)
        self._init_weights()

    def _init_weights(self):
        # As torchvision's EfficientNet: He (Kaiming) normal weights, std sqrt(2 / fan_out), zero biases.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                o, c, kh, kw = module.weight.shape
                module.weight.data = init.normal((o, c, kh, kw), math.sqrt(2 / (o * kh * kw)))
                if module.bias is not None:
                    module.bias.data = np.zeros(o, dtype=np.float32)

    def forward(self, images):
        x, outputs = images, []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                outputs.append(x)
        return outputs


def efficientnet(variant, norm="batch"):
    """EfficientNet-``variant`` ("b0" to "b7"): B0's stages scaled by the ``SCALING`` factors of that model."""
    if variant not in SCALING:
        raise ValueError(f"efficientnet: unknown variant {variant!r}: use one of {tuple(SCALING)}")
    return EfficientNet(scaled_stages(*SCALING[variant]), norm=norm)


def efficientnet_b0(norm="batch"):
    """EfficientNet-B0: C3, C4, C5 have 40, 112, 320 channels; 3.6 M weights in these stages (torchvision's whole
    classifier has 5.3 M)."""
    return efficientnet("b0", norm=norm)


def efficientnet_small(norm="batch"):
    """An EfficientNet for a laptop CPU: B0 scaled down with width 0.5 and depth 0.5 (10 blocks instead of 16);
    C3, C4, C5 have 24, 56, 160 channels."""
    return EfficientNet(scaled_stages(0.5, 0.5), norm=norm)


def convert_torchvision_efficientnet(state):
    """torchvision's ``efficientnet_b0`` state dict as this module's: ``features.0`` to ``features.7`` unchanged;
    ``features.8`` (the 1x1 convolution to 1280 channels), the classifier and ``num_batches_tracked`` dropped, and
    each block's count of stochastic-depth draws added, at 0."""
    unknown = sorted(name for name in state if not name.startswith(("features.", "classifier.")))
    if unknown:
        raise ValueError(f"convert_torchvision_efficientnet: {unknown[:5]} are not in a torchvision EfficientNet's "
                         "state dict (features.* and classifier.*)")
    converted = {name: value for name, value in state.items()
                 if name.startswith("features.") and not name.startswith("features.8.")
                 and not name.endswith("num_batches_tracked")}
    # Each block's count of stochastic-depth draws (minidet's, see StochasticDepth) starts at 0.
    blocks = {name.split(".block.")[0] for name in converted if ".block." in name}        # "features.3.1", ...
    converted.update((block + ".stochastic_depth.draws", np.zeros(1, np.int64)) for block in sorted(blocks))
    return converted
