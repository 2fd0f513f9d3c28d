"""minidet: RetinaNet from scratch, for learning how a one-stage detector works.

    import minidet as md
    import minidet.functional as F
    from minidet import nn, optim
"""

from minidet import anchors, boxes, functional, matching, models, nn, optim  # functional gives Tensor its operators
from minidet.autograd import Tensor, is_grad_enabled, no_grad, tensor
from minidet.backend import cuda_available
from minidet.checkpoint import load, save
from minidet.nn.init import manual_seed

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "cuda_available", "functional", "nn", "optim",
           "save", "load", "manual_seed", "anchors", "boxes", "matching", "models"]
