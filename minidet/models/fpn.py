"""The feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", 2017) as RetinaNet uses it.

The backbone's bottom-up pathway gives C3, C4, C5: fine but semantically weak (C3) to coarse but strong (C5). The
pyramid gives every level both qualities. A **top-down pathway** starts from C5 and walks back to finer levels,
upsampling by 2 (nearest neighbour) at each step; a **lateral connection**, a 1x1 convolution, brings each C_l to
the pyramid's width so it can be added in::

    M5 = lateral5(C5)
    M4 = lateral4(C4) + upsample(M5)          P_l = output_l(M_l): a 3x3 convolution that smooths
    M3 = lateral3(C3) + upsample(M4)          the aliasing of the upsampling
    P6 = p6(C5 or P5)                         3x3 stride-2 convolution (the paper: on C5; torchvision v1: on P5)
    P7 = p7(ReLU(P6))                         3x3 stride-2 convolution

Every P_l has ``out_channels`` channels (256 in the paper) and stride 2^l: P3 is H/8 x W/8, ..., P7 is H/128 x
W/128 (rounded up). P6 and P7 add the large objects' levels cheaply, without running the backbone deeper.

torchvision's names for the same layers, for converting its weights (``backbone.fpn.`` prefix): ``inner_blocks.{0,
1,2}.0`` are ``lateral3``, ``lateral4``, ``lateral5``; ``layer_blocks.{0,1,2}.0`` are ``output3``, ``output4``,
``output5``; ``extra_blocks.p6`` and ``extra_blocks.p7`` are ``p6`` and ``p7``.
"""

import math

from minidet import functional as F
from minidet import nn
from minidet.nn import init

P6_INPUTS = ("c5", "p5")


class FeaturePyramid(nn.Module):
    """The feature pyramid P3-P7 from the backbone's C3, C4, C5.

    Args:
        in_channels: the channels of (C3, C4, C5), e.g. ``backbone.out_channels``.
        out_channels: the channels of every pyramid level (256 in the paper).
        p6_input: ``"c5"`` (the paper: P6 from the backbone's C5) or ``"p5"`` (torchvision's
            ``retinanet_resnet50_fpn``: P6 from the pyramid's P5).

    ``forward([C3, C4, C5])`` with C_l of shape (N, in_channels[l - 3], H_l, W_l), H_4 = H_3 / 2 and H_5 = H_4 / 2
    (the same for W), returns [P3, P4, P5, P6, P7], each (N, out_channels, H_l, W_l) with H_6 = ceil(H_5 / 2),
    H_7 = ceil(H_6 / 2).
    """

    def __init__(self, in_channels, out_channels=256, p6_input="c5"):
        super().__init__()
        if p6_input not in P6_INPUTS:
            raise ValueError(f"FeaturePyramid: p6_input must be one of {P6_INPUTS}, got {p6_input!r}")
        c3, c4, c5 = in_channels
        self.p6_input = p6_input
        self.lateral3 = nn.Conv2d(c3, out_channels, 1)
        self.lateral4 = nn.Conv2d(c4, out_channels, 1)
        self.lateral5 = nn.Conv2d(c5, out_channels, 1)
        self.output3 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.output4 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.output5 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.p6 = nn.Conv2d(c5 if p6_input == "c5" else out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self._init_weights()

    def _init_weights(self):
        # torchvision's kaiming_uniform_(a=1): U(-b, b) with b = sqrt(3 / fan_in), biases 0. This is also what the
        # paper's Detectron uses for these layers (Caffe2's "XavierFill" draws from the same distribution).
        for conv in self.children():
            fan_in = math.prod(conv.weight.shape[1:])
            conv.weight.data = init.uniform(conv.weight.shape, math.sqrt(3 / fan_in))
            conv.bias.data[...] = 0

    def forward(self, features):
        c3, c4, c5 = features
        # Top-down pathway: upsample the coarser level to the finer one's size, add the lateral connection.
        m5 = self.lateral5(c5)
        lateral4 = self.lateral4(c4)
        m4 = lateral4 + F.interpolate(m5, size=lateral4.shape[-2:], mode="nearest")
        lateral3 = self.lateral3(c3)
        m3 = lateral3 + F.interpolate(m4, size=lateral3.shape[-2:], mode="nearest")
        p3, p4, p5 = self.output3(m3), self.output4(m4), self.output5(m5)
        p6 = self.p6(c5 if self.p6_input == "c5" else p5)
        p7 = self.p7(F.relu(p6))
        return [p3, p4, p5, p6, p7]
