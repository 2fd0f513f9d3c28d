"""Losses: binary cross-entropy with logits, smooth L1, and the sigmoid focal loss.

All take logits (not probabilities) and stay finite for logits of +-100: they
never form log(sigmoid(x)), which is log(0) = -inf once sigmoid(x) rounds to 0.
"""

from minidet.autograd import Function, Tensor
from minidet.backend import get_array_module
from minidet.functional.activation import softplus, stable_sigmoid, stable_softplus
from minidet.functional.arithmetic import python_number
from minidet.functional.reduction import mean, sum

REDUCTIONS = ("none", "mean", "sum")


def _check(op_name, input, target, reduction):
    if tuple(input.shape) != tuple(target.shape):
        raise ValueError(f"{op_name}: input has shape {tuple(input.shape)} but target {tuple(target.shape)}; "
                         "they must be equal")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op_name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(loss, reduction):
    if reduction == "mean":
        return mean(loss)
    if reduction == "sum":
        return sum(loss)
    return loss


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean"):
    """-[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))] = softplus(x) - t x, element-wise.

    ``weight`` (broadcastable to the input) rescales each element's loss.
    """
    _check("binary_cross_entropy_with_logits", input, target, reduction)
    loss = softplus(input) - input * target
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


class SmoothL1(Function):
    def __init__(self, beta):
        self.beta = beta

    def forward(self, x, t):
        xp = get_array_module(x)
        self.diff = x - t
        size = xp.abs(self.diff)
        self.quadratic = size < self.beta   # empty when beta = 0: the loss is then plain L1
        beta = self.beta or 1  # avoids 0/0 below when beta = 0, where the quadratic branch is never taken
        return xp.where(self.quadratic, 0.5 * self.diff ** 2 / beta, size - 0.5 * self.beta)

    def backward(self, gy):
        xp = get_array_module(gy)
        slope = xp.where(self.quadratic, self.diff / (self.beta or 1), xp.sign(self.diff))
        g = gy * slope
        return g, -g


def smooth_l1_loss(input, target, reduction="mean", beta=1.0):
    """Quadratic below ``beta``, linear above: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta, d = input - target.

    It is continuous with a continuous slope at |d| = beta, so small box errors get a
    gentle gradient and large ones a bounded one. ``beta = 0`` gives the L1 loss.
    """
    _check("smooth_l1_loss", input, target, reduction)
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be >= 0, got {beta}")
    return _reduce(SmoothL1(python_number(beta))(input, target), reduction)


class SigmoidFocalLoss(Function):
    """Element-wise focal loss and its gradient, computed together in one pass.

    With p = sigmoid(x) and a target t in [0, 1]:
        ce      = softplus(x) - t x                      (cross-entropy, stable)
        1 - p_t = t (1 - p) + (1 - t) p                  (how wrong the prediction is)
        alpha_t = alpha t + (1 - alpha) (1 - t)          (only when alpha >= 0)
        loss    = alpha_t * (1 - p_t)^gamma * ce
    Differentiating (d ce/dx = p - t, d(1 - p_t)/dx = (1 - 2t) p (1 - p)):
        dloss/dx = alpha_t * [(1 - p_t)^gamma (p - t) + gamma (1 - p_t)^(gamma - 1) (1 - 2t) p (1 - p) ce]
    1 - p is computed as sigmoid(-x), never as 1 - sigmoid(x), which rounds to 0 for large x.
    This function is the specification of the CUDA focal-loss kernel.
    """

    def __init__(self, alpha, gamma):
        self.alpha, self.gamma = alpha, gamma

    def forward(self, x, t):
        xp = get_array_module(x)
        p, e = stable_sigmoid(x)
        q = xp.where(x >= 0, e, 1) / (1 + e)           # 1 - p, without cancellation
        ce = stable_softplus(x) - t * x
        miss = t * q + (1 - t) * p                     # 1 - p_t
        modulator = miss ** self.gamma
        loss = modulator * ce
        grad = modulator * (p * (1 - t) - q * t)       # (p - t), written so that no term cancels
        if self.gamma != 0:
            grad = grad + self.gamma * miss ** (self.gamma - 1) * (1 - 2 * t) * p * q * ce
        if self.alpha >= 0:
            alpha_t = self.alpha * t + (1 - self.alpha) * (1 - t)
            loss, grad = alpha_t * loss, alpha_t * grad
        self.grad = grad.astype(x.dtype, copy=False)
        return loss.astype(x.dtype, copy=False)

    def backward(self, gy):
        return gy * self.grad, None


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """The focal loss of Lin et al. (2017), with ``torchvision.ops.sigmoid_focal_loss`` semantics.

    Args:
        inputs: logits of any shape, e.g. (A, K) for A anchors and K classes.
        targets: same shape, 1 for the true class and 0 elsewhere (soft values in [0, 1] allowed).
            Targets are constants: no gradient flows to them.
        alpha: weight of the positive class in (0, 1); a negative value turns weighting off.
        gamma: focusing parameter; gamma = 0 gives (alpha-weighted) cross-entropy.
        reduction: "none", "mean" or "sum".
    """
    _check("sigmoid_focal_loss", inputs, targets, reduction)
    if isinstance(targets, Tensor) and targets.requires_grad:
        raise ValueError("sigmoid_focal_loss: targets must be constants; pass targets.detach()")
    if gamma < 0:
        raise ValueError(f"sigmoid_focal_loss: gamma must be >= 0, got {gamma}")
    return _reduce(SigmoidFocalLoss(python_number(alpha), python_number(gamma))(inputs, targets), reduction)
