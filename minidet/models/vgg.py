"""VGG backbones: one of the classification networks the article names beside ResNet.

VGG (Simonyan and Zisserman, 2014) is the plainest deep network: 3x3 convolutions, each followed by a ReLU (with
batch norm in between in the ``_bn`` variants), in five blocks, each block ending in a 2x2 max pooling that halves
the map. There are no shortcuts, so depth costs more than in a ResNet: VGG-16 has 14.7 M weights in its
convolutions against 11 M in all of ResNet-18, and it is slower.

RetinaNet taps the maps after the third, fourth and fifth pooling, at strides 8, 16 and 32 (as the Keras RetinaNet
does with ``block3_pool``, ``block4_pool`` and ``block5_pool``)::

    block 1: 2 convs  64 ch, pool  -> (N,  64, H/2,  W/2)
    block 2: 2 convs 128 ch, pool  -> (N, 128, H/4,  W/4)
    block 3: 3 convs 256 ch, pool  -> (N, 256, H/8,  W/8)     C3
    block 4: 3 convs 512 ch, pool  -> (N, 512, H/16, W/16)    C4
    block 5: 3 convs 512 ch, pool  -> (N, 512, H/32, W/32)    C5

(VGG-16's blocks; VGG-11 has 1, 1, 2, 2, 2 convolutions per block.)

The layout and the names are torchvision's: every layer sits in one ``Sequential`` called ``features``, numbered
in order (convolution, [batch norm,] ReLU, ..., pooling), so the ``features.*`` weights of torchvision's ``vgg16``
and ``vgg16_bn`` load as they are (``convert_torchvision_vgg``). Their classifier, three fully connected layers on
the 7 x 7 map of a 224 px image, is left out: a detector does not use it.
"""

import math

import numpy as np

from minidet import nn
from minidet.models.resnet import _norm_layer
from minidet.nn import init

# Output channels of each convolution, "M" for a 2 x 2 max pooling (torchvision's configurations "A" and "D").
CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    # VGG-11's shape at an eighth of its widths (a fourth of the last ones), with batch norm: for a laptop CPU.
    "vgg_small": (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"),
}


class VGG(nn.Module):
    """A VGG backbone that returns the feature maps C3, C4, C5.

    Args:
        config: the layers, as in ``CONFIGS``: output channels of each 3x3 convolution, "M" for a max pooling.
        norm: None (no normalisation, as the original VGG), ``"batch"`` or ``"frozen"`` (a batch norm after each
            convolution, as torchvision's ``_bn`` models).

    Attributes:
        out_channels: the channels of (C3, C4, C5).

    ``forward(images)``: (N, 3, H, W) -> [C3 (N, out_channels[0], H/8, W/8), C4 (.., H/16, W/16),
    C5 (.., H/32, W/32)].
    """

    def __init__(self, config, norm=None):
        super().__init__()
        layers, in_channels, channels_at_pool = [], 3, []
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
                channels_at_pool.append(in_channels)
                continue
            layers.append(nn.Conv2d(in_channels, item, 3, padding=1))        # with a bias, as torchvision's
            if norm is not None:
                layers.append(_norm_layer(norm, item))
            layers.append(nn.ReLU())
            in_channels = item
        if len(channels_at_pool) != 5:
            raise ValueError(f"VGG: the config has {len(channels_at_pool)} poolings; C3-C5 need 5")
        self.features = nn.Sequential(*layers)
        pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
        self.taps = tuple(pools[2:])                                           # after pooling 3, 4 and 5
        self.out_channels = tuple(channels_at_pool[2:])
        self._init_weights()

    def _init_weights(self):
        # As torchvision's VGG: He (Kaiming) normal weights with std sqrt(2 / fan_out), zero biases.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                shape = module.weight.shape
                module.weight.data = init.normal(shape, math.sqrt(2 / (shape[0] * shape[2] * shape[3])))
                module.bias.data = np.zeros(shape[0], dtype=np.float32)

    def forward(self, images):
        x, outputs = images, []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs


def vgg11(norm=None):
    """VGG-11 without normalisation (``norm`` is not used); C3, C4, C5 have 256, 512, 512 channels."""
    return VGG(CONFIGS["vgg11"])


def vgg11_bn(norm="batch"):
    """VGG-11 with a batch norm after each convolution (``"batch"`` or ``"frozen"``)."""
    return VGG(CONFIGS["vgg11"], norm=norm)


def vgg16(norm=None):
    """VGG-16 without normalisation (``norm`` is not used); C3, C4, C5 have 256, 512, 512 channels."""
    return VGG(CONFIGS["vgg16"])


def vgg16_bn(norm="batch"):
    """VGG-16 with a batch norm after each convolution (``"batch"`` or ``"frozen"``)."""
    return VGG(CONFIGS["vgg16"], norm=norm)


def vgg_small(norm="batch"):
    """A VGG for a laptop CPU: VGG-11's layout with widths 16, 32, 64, 128, 128 and batch norm; C3, C4, C5 have
    64, 128, 128 channels. About 0.6 M weights, against 9.2 M in VGG-11's convolutions."""
    return VGG(CONFIGS["vgg_small"], norm=norm)


def convert_torchvision_vgg(state):
    """torchvision's ``vgg*`` state dict (name -> array) as this module's: the ``features.*`` entries, unchanged.

    The classifier's ``classifier.*`` entries are dropped, and so are batch norms' ``num_batches_tracked`` counters
    (minidet's batch norm has none). Anything else is refused by name: it is not a torchvision VGG.
    """
    unknown = sorted(name for name in state if not name.startswith(("features.", "classifier.")))
    if unknown:
        raise ValueError(f"convert_torchvision_vgg: {unknown[:5]} are not in a torchvision VGG's state dict "
                         "(features.* and classifier.*)")
    return {name: value for name, value in state.items()
            if name.startswith("features.") and not name.endswith("num_batches_tracked")}
