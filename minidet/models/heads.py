"""The classification subnet and the regression subnet: what RetinaNet predicts for every anchor.

Both are small fully convolutional networks applied to every pyramid level with the **same** weights (objects
of any size get the same treatment; only the anchors' sizes differ between levels). Each is a tower of
``num_convs`` (4) 3x3 convolutions with ReLU, keeping the pyramid's C channels, then a 3x3 convolution to

    classification subnet: A * K channels, one logit per (anchor, class); sigmoid, no softmax, no background class
    regression subnet:     A * 4 channels, the offsets (dx, dy, dw, dh) that move each anchor onto its object

with A anchors per cell and K classes. The two towers share nothing, not even their first layers.

Output order (the contract with ``minidet.anchors``)
---------------------------------------------------
Level l gives (N, A*K, H_l, W_l), channel ``a * K + k`` holding class k of anchor a. It is viewed as
(N, A, K, H_l, W_l), permuted to (N, H_l, W_l, A, K) and reshaped to (N, H_l*W_l*A, K): row ``(y * W_l + x) * A
+ a`` is anchor a of cell (y, x), exactly the row of that anchor in ``AnchorGenerator``'s output. The levels are
then concatenated, P3 first, into (N, sum_l H_l*W_l*A, K); the same with 4 for the box offsets.

Parameter names follow torchvision's ``RetinaNetClassificationHead`` and ``RetinaNetRegressionHead``
(``conv.{0..3}.0.weight``, ``cls_logits.weight``, ``bbox_reg.weight``): its weights load after renaming the
``head.`` prefix away.
"""

import math

from minidet import functional as F
from minidet import nn
from minidet.nn import init

NORMS = (None, "group")
GROUP_NORM_GROUPS = 32


def _tower(channels, num_convs, norm):
    """``num_convs`` blocks of 3x3 convolution (+ GroupNorm(32)) + ReLU, C channels in and out.

    Each block is a Sequential (conv, [norm,] ReLU), so the convolutions are named ``{i}.0`` as in torchvision.
    With a norm layer the convolution needs no bias: the norm's own shift replaces it.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown head norm {norm!r}: use None or 'group'")
    blocks = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=norm is None)
        if norm == "group":
            blocks.append(nn.Sequential(conv, nn.GroupNorm(GROUP_NORM_GROUPS, channels), nn.ReLU()))
        else:
            blocks.append(nn.Sequential(conv, nn.ReLU()))
    return nn.Sequential(*blocks)


def _init_normal(module):
    """Every convolution in ``module``: weights N(0, 0.01), biases 0 (the paper's initialisation of the subnets)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = init.normal(m.weight.shape, 0.01)
            if m.bias is not None:
                m.bias.data[...] = 0


def flatten_levels(outputs, values_per_anchor):
    """Per-level subnet outputs to one row per anchor, in ``minidet.anchors``' order.

    Args:
        outputs: list of L tensors, level l of shape (N, A * D, H_l, W_l), channel a * D + d.
        values_per_anchor: D (K classes, or 4 box offsets).

    Returns:
        Tensor (N, sum_l H_l * W_l * A, D): row (y * W_l + x) * A + a of level l (after the rows of the levels
        before it) holds anchor a of cell (y, x).
    """
    rows = []
    for y in outputs:
        n, _, h, w = y.shape
        y = y.reshape(n, -1, values_per_anchor, h, w)       # (N, A, D, H, W)
        y = y.permute(0, 3, 4, 1, 2)                        # (N, H, W, A, D)
        rows.append(y.reshape(n, -1, values_per_anchor))    # (N, H*W*A, D)
    return F.cat(rows, dim=1)


class ClassificationHead(nn.Module):
    """The classification subnet: K logits for each of the A anchors of every cell of every level.

    Args:
        in_channels: the pyramid's channels C (256).
        num_anchors: A, anchors per cell (9).
        num_classes: K.
        num_convs: convolutions in the tower (4).
        prior_probability: pi, the probability every anchor gives every class at initialisation (0.01).
        norm: None (the paper) or ``"group"`` (GroupNorm with 32 groups before each ReLU; C must divide by 32).

    ``forward([P3, ..., P7])``, each (N, C, H_l, W_l) -> logits (N, sum_l H_l * W_l * A, K).
    """

    def __init__(self, in_channels, num_anchors, num_classes, num_convs=4, prior_probability=0.01, norm=None):
        super().__init__()
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.conv = _tower(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        _init_normal(self)
        # The prior: start every anchor at p = sigmoid(b) = pi = 0.01, i.e. b = -log((1 - pi) / pi) = -4.595.
        # With the default bias 0 every anchor would start at p = 0.5, and the ~100k anchors of an image, nearly
        # all easy background, would each cost a large loss: their sum swamps the few positives and destabilises
        # the first iterations. At p = 0.01 a background anchor costs almost nothing (7.5e-7 with the focal loss).
        self.cls_logits.bias.data[...] = -math.log((1 - prior_probability) / prior_probability)

    def forward(self, features):
        return flatten_levels([self.cls_logits(self.conv(p)) for p in features], self.num_classes)


class RegressionHead(nn.Module):
    """The regression subnet: 4 box offsets (dx, dy, dw, dh) for each of the A anchors of every cell.

    Args:
        in_channels: the pyramid's channels C (256).
        num_anchors: A, anchors per cell (9).
        num_convs: convolutions in the tower (4).
        norm: None (the paper) or ``"group"`` (GroupNorm with 32 groups before each ReLU).

    ``forward([P3, ..., P7])``, each (N, C, H_l, W_l) -> offsets (N, sum_l H_l * W_l * A, 4). The offsets are
    class-agnostic: one box per anchor, whatever its class (the paper found this as good, with fewer weights).
    """

    def __init__(self, in_channels, num_anchors, num_convs=4, norm=None):
        super().__init__()
        self.num_anchors = num_anchors
        self.conv = _tower(in_channels, num_convs, norm)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        _init_normal(self)

    def forward(self, features):
        return flatten_levels([self.bbox_reg(self.conv(p)) for p in features], 4)
