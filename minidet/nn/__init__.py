"""Layers and the ``Module`` they are built from: ``from minidet import nn``."""

from minidet.nn import init
from minidet.nn.layers import BatchNorm2d, Conv2d, FrozenBatchNorm2d, GroupNorm, MaxPool2d, ReLU, Sequential, SiLU
from minidet.nn.module import Module, Parameter

__all__ = ["Module", "Parameter", "Conv2d", "BatchNorm2d", "FrozenBatchNorm2d", "GroupNorm", "MaxPool2d",
           "ReLU", "SiLU", "Sequential", "init"]
