"""RetinaNet and its parts: backbones (ResNet, VGG, EfficientNet), the feature pyramid, the subnets.

    model = minidet.models.RetinaNet(num_classes=3, backbone="resnet18")
    losses = model(images, targets)       # training
    detections = model.predict(images)    # inference

torchvision's ``retinanet_resnet50_fpn`` weights: ``load_torchvision_weights`` (see ``torchvision_weights``).
"""

from minidet.models.efficientnet import (
    EfficientNet,
    convert_torchvision_efficientnet,
    efficientnet,
    efficientnet_b0,
    efficientnet_small,
)
from minidet.models.fpn import FeaturePyramid
from minidet.models.heads import ClassificationHead, RegressionHead
from minidet.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet_small
from minidet.models.retinanet import BACKBONES, PRESETS, RetinaNet
from minidet.models.torchvision_weights import (
    convert_torchvision_state_dict,
    load_torchvision_weights,
    torchvision_num_classes,
)
from minidet.models.vgg import VGG, convert_torchvision_vgg, vgg11, vgg11_bn, vgg16, vgg16_bn, vgg_small

__all__ = ["RetinaNet", "PRESETS", "BACKBONES", "FeaturePyramid", "ClassificationHead", "RegressionHead",
           "ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet_small",
           "VGG", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "vgg_small", "convert_torchvision_vgg",
           "EfficientNet", "efficientnet", "efficientnet_b0", "efficientnet_small", "convert_torchvision_efficientnet",
           "convert_torchvision_state_dict", "load_torchvision_weights", "torchvision_num_classes"]
