"""ResNet backbones: the bottom-up pathway that feeds RetinaNet's feature pyramid.

A ResNet is a stem followed by four stages of residual blocks. Each stage after the first halves the height and
width and widens the channels, so its output, C_l, has stride 2^l: RetinaNet takes C3, C4 and C5 (strides 8, 16,
32) and builds the pyramid P3-P7 from them.

Shapes, for an input (N, 3, H, W) and E the block's expansion (1 for BasicBlock, 4 for Bottleneck)::

    stem: conv1 7x7 stride 2, bn1, ReLU, max pool 3x3 stride 2  -> (N, w0, H/4, W/4)
    layer1 (stride 1)                                           -> (N, w0 E, H/4, W/4)     C2 (not used)
    layer2 (stride 2)                                           -> (N, w1 E, H/8, W/8)     C3
    layer3 (stride 2)                                           -> (N, w2 E, H/16, W/16)   C4
    layer4 (stride 2)                                           -> (N, w3 E, H/32, W/32)   C5

with widths (w0, w1, w2, w3) = (64, 128, 256, 512) in the standard ResNets. H and W are rounded up at each
stride-2 step; for H and W multiples of 32 every division is exact.

The layout is torchvision's ("ResNet v1.5": in a Bottleneck the stride sits on the 3x3 convolution ``conv2``) and
so are the parameter names (``conv1.weight``, ``bn1.running_mean``, ``layer2.0.conv2.weight``,
``layer2.0.downsample.0.weight``, ``layer2.0.downsample.1.weight``, ...): torchvision's ``backbone.body.*`` weights
load here after removing that prefix. torchvision's classifier (``avgpool``, ``fc``) is left out: a detector does
not use it.
"""

import math

from minidet import functional as F
from minidet import nn
from minidet.nn import init

NORMS = {"batch": nn.BatchNorm2d, "frozen": nn.FrozenBatchNorm2d}


def _norm_layer(norm, channels):
    """BatchNorm2d (``"batch"``, trained) or FrozenBatchNorm2d (``"frozen"``, fixed: for pretrained weights)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: use one of {tuple(NORMS)}")
    return NORMS[norm](channels)


def _conv(in_channels, out_channels, kernel_size, stride=1):
    """A convolution without bias (the norm layer after it has one), padded to keep H / stride x W / stride."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut: y = ReLU(F(x) + shortcut(x)) (ResNet-18 and -34).

    Input (N, in_channels, H, W); output (N, channels, H / stride, W / stride). The shortcut is the identity,
    or a 1x1 convolution and a norm (``downsample``) where the shape changes.
    """

    expansion = 1

    def __init__(self, in_channels, channels, stride=1, norm="batch"):
        super().__init__()
        self.conv1 = _conv(in_channels, channels, 3, stride)
        self.bn1 = _norm_layer(norm, channels)
        self.conv2 = _conv(channels, channels, 3)
        self.bn2 = _norm_layer(norm, channels)
        self.downsample = _downsample(in_channels, channels * self.expansion, stride, norm)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 (reduce), 3x3 (stride), 1x1 (expand by 4), and a shortcut (ResNet-50 and deeper).

    Input (N, in_channels, H, W); output (N, 4 * channels, H / stride, W / stride). The 1x1 convolutions make the
    3x3 one cheap: it runs on ``channels``, a quarter of the block's output width.
    """

    expansion = 4

    def __init__(self, in_channels, channels, stride=1, norm="batch"):
        super().__init__()
        self.conv1 = _conv(in_channels, channels, 1)
        self.bn1 = _norm_layer(norm, channels)
        self.conv2 = _conv(channels, channels, 3, stride)       # v1.5: the stride is here, not on conv1
        self.bn2 = _norm_layer(norm, channels)
        self.conv3 = _conv(channels, channels * self.expansion, 1)
        self.bn3 = _norm_layer(norm, channels * self.expansion)
        self.downsample = _downsample(in_channels, channels * self.expansion, stride, norm)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def _downsample(in_channels, out_channels, stride, norm):
    """The projection shortcut (1x1 convolution + norm) when a block changes the shape, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv(in_channels, out_channels, 1, stride), _norm_layer(norm, out_channels))


class ResNet(nn.Module):
    """A ResNet backbone that returns the feature maps C3, C4, C5.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        widths: the ``channels`` of each stage's blocks (the stem has widths[0] channels).
        norm: ``"batch"`` (BatchNorm2d, for training) or ``"frozen"`` (FrozenBatchNorm2d, for pretrained weights).

    Attributes:
        out_channels: the channels of (C3, C4, C5), what the feature pyramid needs to know.

    ``forward(images)``: (N, 3, H, W) -> [C3 (N, out_channels[0], H/8, W/8), C4 (.., H/16, W/16),
    C5 (.., H/32, W/32)].
    """

    def __init__(self, block, layers, widths=(64, 128, 256, 512), norm="batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm_layer(norm, widths[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = widths[0]
        for stage, (num_blocks, channels) in enumerate(zip(layers, widths), start=1):
            stride = 1 if stage == 1 else 2
            blocks = [block(in_channels, channels, stride, norm)]
            in_channels = channels * block.expansion
            blocks += [block(in_channels, channels, 1, norm) for _ in range(num_blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.out_channels = tuple(w * block.expansion for w in widths[1:])
        self._init_weights()

    def _init_weights(self):
        # As torchvision: He (Kaiming) normal initialisation for every convolution, std = sqrt(2 / fan_out) with
        # fan_out = out_channels * KH * KW, which keeps the variance of the gradients steady through the ReLUs.
        # Norm layers start as the identity (weight 1, bias 0), their default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                shape = module.weight.shape
                fan_out = shape[0] * shape[2] * shape[3]
                module.weight.data = init.normal(shape, math.sqrt(2 / fan_out))

    def forward(self, images):
        x = F.relu(self.bn1(self.conv1(images)))
        x = self.maxpool(x)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def resnet18(norm="batch"):
    """ResNet-18: BasicBlocks (2, 2, 2, 2); C3, C4, C5 have 128, 256, 512 channels."""
    return ResNet(BasicBlock, (2, 2, 2, 2), norm=norm)


def resnet34(norm="batch"):
    """ResNet-34: BasicBlocks (3, 4, 6, 3); C3, C4, C5 have 128, 256, 512 channels."""
    return ResNet(BasicBlock, (3, 4, 6, 3), norm=norm)


def resnet50(norm="batch"):
    """ResNet-50: Bottlenecks (3, 4, 6, 3); C3, C4, C5 have 512, 1024, 2048 channels."""
    return ResNet(Bottleneck, (3, 4, 6, 3), norm=norm)


def resnet_small(norm="batch"):
    """A ResNet for training on a laptop CPU in minutes: one BasicBlock per stage, widths 16, 32, 64, 128.

    The stem and the strides are the usual ones, so C3, C4, C5 (32, 64, 128 channels) have strides 8, 16, 32
    like any ResNet's. About 0.3 M parameters, against 11 M for ResNet-18.
    """
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), norm=norm)
