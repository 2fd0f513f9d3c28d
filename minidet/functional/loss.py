"""Losses: binary cross-entropy with logits, smooth L1, and the sigmoid focal loss (with dense targets, or with one
class label per anchor).

All take logits (not probabilities) and stay finite for logits of +-100: they
never form log(sigmoid(x)), which is log(0) = -inf once sigmoid(x) rounds to 0.
"""

from minidet import cuda
from minidet.autograd import Function, Tensor
from minidet.backend import get_array_module, is_cupy_array
from minidet.functional import reduction as reductions  # not sum and mean by name: they would hide the builtins
from minidet.functional.activation import softplus
from minidet.functional.arithmetic import as_python_scalar

REDUCTIONS = ("none", "mean", "sum")


def _check(op_name, input, target, reduction):
    if tuple(input.shape) != tuple(target.shape):
        raise ValueError(f"{op_name}: input has shape {tuple(input.shape)} but target {tuple(target.shape)}; "
                         "they must be equal")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op_name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(loss, how):
    """``loss`` as asked: its mean, its sum, or as it is ("none")."""
    if how == "mean":
        return reductions.mean(loss)
    if how == "sum":
        return reductions.sum(loss)
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
    """The smooth L1 loss of each element (``smooth_l1_loss`` reduces it): 0.5 d^2 / beta below beta, |d| - 0.5 beta
    above, d = input - target; its slope d / beta, or the sign of d, goes to the input and, negated, the target."""

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
    return _reduce(SmoothL1(as_python_scalar(beta))(input, target), reduction)


def focal_loss_terms(x, t, alpha, gamma):
    """The focal loss of each element and its derivative, computed together: the one formula minidet uses.

    With p = sigmoid(x), q = 1 - p and a target t in [0, 1]:
        ce      = (1 - t) softplus(x) + t softplus(-x)    (the cross-entropy softplus(x) - t x, see below)
        1 - p_t = t q + (1 - t) p                         (how wrong the prediction is)
        alpha_t = alpha t + (1 - alpha) (1 - t)           (only when alpha >= 0)
        loss    = alpha_t * (1 - p_t)^gamma * ce
    Differentiating (d ce/dx = p - t, d(1 - p_t)/dx = (1 - 2t) p q):
        dloss/dx = alpha_t * [(1 - p_t)^gamma (p - t) + gamma (1 - p_t)^(gamma - 1) (1 - 2t) p q ce]

    Stable for logits of +-100: the only exponential is e = exp(-|x|), in (0, 1]; p and q = 1 - p both come from e
    without a subtraction (1 - sigmoid(x) would round to 0 for large x); softplus(x) = max(x, 0) + log1p(e). The
    cross-entropy is written as two non-negative terms because softplus(x) - t x, for t = 1 and a large x,
    subtracts two nearly equal numbers: at x = 10 in float32 only two digits of the answer 4.5e-5 would survive.

    This is also the arithmetic of the CUDA focal-loss kernel (``focal_loss_term`` in kernels/focal_loss.cuh), in
    the same order.

    Args:
        x: logits, any shape, float32 or float64. t: targets, the same shape and dtype.
        alpha, gamma: Python numbers (so the results keep the dtype of ``x``).

    Returns:
        loss, grad: arrays of the shape and dtype of ``x``.
    """
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))                                      # in (0, 1]
    r = 1 / (1 + e)
    p = xp.where(x >= 0, r, e * r)                              # sigmoid(x) = 1 / (1 + exp(-x)) = e / (1 + e) for x < 0
    q = xp.where(x >= 0, e * r, r)                              # 1 - p = sigmoid(-x), without cancellation
    log1p_e = xp.log1p(e)
    ce = (1 - t) * (xp.maximum(x, 0) + log1p_e) + t * (xp.maximum(-x, 0) + log1p_e)
    miss = t * q + (1 - t) * p                                  # 1 - p_t
    modulator = miss ** gamma
    loss = modulator * ce
    grad = modulator * (p * (1 - t) - q * t)                    # (p - t), written so that no term cancels
    if gamma != 0:
        grad = grad + gamma * miss ** (gamma - 1) * (1 - 2 * t) * p * q * ce
    if alpha >= 0:
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        loss, grad = alpha_t * loss, alpha_t * grad
    return loss.astype(x.dtype, copy=False), grad.astype(x.dtype, copy=False)


class SigmoidFocalLoss(Function):
    """Element-wise focal loss: the forward computes the gradient too (``focal_loss_terms``), backward scales it."""

    def __init__(self, alpha, gamma):
        self.alpha, self.gamma = alpha, gamma

    def forward(self, x, t):
        loss, self.grad = focal_loss_terms(x, t, self.alpha, self.gamma)
        return loss

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
    return _reduce(SigmoidFocalLoss(as_python_scalar(alpha), as_python_scalar(gamma))(inputs, targets), reduction)


# Per-anchor label codes of ``sigmoid_focal_loss_with_labels``, which minidet.matching's ``match_anchors`` also
# writes for anchors without a box (the values are also in kernels/common.cuh).
BACKGROUND = -1   # every class's target is 0
IGNORED = -2      # the anchor adds nothing: no loss, no gradient


def focal_loss_with_labels_reference(logits, labels, weights, alpha, gamma):
    """The weighted focal loss of (A, K) logits with one label per anchor, and its gradient: the specification.

    loss = sum over anchors a and classes k of weights[a] * FL(logits[a, k], t = 1 if labels[a] == k else 0),
    where FL is ``focal_loss_terms``; anchors labelled ``IGNORED`` contribute 0 to the loss and get a gradient of 0.
    The CUDA kernel (``minidet.cuda.focal_loss_with_labels``) has the same signature and results; this NumPy
    version builds the (A, K) targets, which the kernel never does.

    Args:
        logits: (A, K) float32 or float64.
        labels: (A,) integers: 0..K-1 the class of a positive anchor, ``BACKGROUND`` (-1), ``IGNORED`` (-2).
        weights: (A,) each anchor's weight, in the dtype of ``logits``.
        alpha, gamma: Python numbers, as in ``sigmoid_focal_loss``.

    Returns:
        loss: 0-d array in the dtype of ``logits``; grad: (A, K), d loss / d logits.
    """
    xp = get_array_module(logits)
    classes = xp.arange(logits.shape[1])                                        # (K,)
    targets = (labels[:, None] == classes[None, :]).astype(logits.dtype)        # (A, K): one-hot or zero rows
    loss, grad = focal_loss_terms(logits, targets, alpha, gamma)                # (A, K) each
    ignored = (labels == IGNORED)[:, None]                                      # (A, 1)
    loss = xp.where(ignored, 0, loss * weights[:, None])                        # (A, K)
    grad = xp.where(ignored, 0, grad * weights[:, None]).astype(logits.dtype, copy=False)
    return xp.asarray(loss.sum(), dtype=logits.dtype), grad


class SigmoidFocalLossWithLabels(Function):
    """The summed focal loss of (A, K) logits with per-anchor labels (inputs: logits, labels, weights).

    The forward computes the loss and its gradient in one pass: with the CUDA kernel for CuPy arrays, with the
    NumPy reference otherwise (the one place that chooses). The backward only scales that gradient.
    """

    def __init__(self, alpha, gamma):
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits, labels, weights):
        focal = cuda.focal_loss_with_labels if is_cupy_array(logits) else focal_loss_with_labels_reference
        loss, self.grad = focal(logits, labels, weights, self.alpha, self.gamma)
        return loss

    def backward(self, gy):
        # The loss is one number, so its upstream gradient gy is one number too, and 1 when this loss (or a sum
        # of losses that contains it) is what backward() started from: then the stored gradient is the answer as
        # it is, and multiplying would cost a pass over all A * K values (as much memory traffic as the forward).
        # Reading gy waits for the GPU, which has finished the forward by then anyway.
        grad = self.grad if float(gy) == 1 else gy * self.grad
        return grad, None, None


def sigmoid_focal_loss_with_labels(logits, labels, weights=None, alpha=0.25, gamma=2.0):
    """The focal loss summed over (A, K) logits, with one class label per anchor instead of dense targets.

    Equal to ``(weights[:, None] * sigmoid_focal_loss(logits, one_hot(labels), alpha, gamma)).sum()`` over the
    anchors that are not ignored, where the one-hot row of a ``BACKGROUND`` anchor is all zeros. RetinaNet's
    classification loss is this, with weights 1 / (number of positive anchors) (per image, or for the batch).
    Without the (A, K) targets, and on a GPU in one kernel that reads each logit once and writes its gradient.

    Args:
        logits: Tensor or array (A, K), float32 or float64: A anchors (all images' together), K classes.
        labels: (A,) integer array: 0..K-1, the class of a positive anchor; ``BACKGROUND`` (-1): every target 0;
            ``IGNORED`` (-2): the anchor adds no loss and gets no gradient. Constants.
        weights: (A,) array, each anchor's loss is multiplied by its weight (None: all 1). Constants.
        alpha: weight of the positive class in (0, 1); a negative value turns weighting off.
        gamma: focusing parameter, >= 0.

    Returns:
        A 0-d Tensor in the dtype of ``logits``. Its backward multiplies the gradient stored by the forward by the
        upstream gradient.

    On a GPU (CuPy arrays) the CUDA kernel computes it. Its exp and log1p round differently from NumPy's and it sums
    in another order, so the two agree within float32 rounding, not bit for bit: each gradient element within 32
    units in the last place, the loss within 1e-5 relative (tests/test_kernels.py explains the tolerances).
    """
    name = "sigmoid_focal_loss_with_labels"
    for what, value in (("labels", labels), ("weights", weights)):
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(f"{name}: {what} must be constants; pass {what}.detach()")
    data = logits.data if isinstance(logits, Tensor) else logits
    xp = get_array_module(data)
    labels = labels.data if isinstance(labels, Tensor) else labels
    weights = weights.data if isinstance(weights, Tensor) else weights
    labels = labels if hasattr(labels, "dtype") else xp.asarray(labels)                # a list: on the logits' device
    weights = weights if weights is None or hasattr(weights, "dtype") else xp.asarray(weights, dtype=data.dtype)
    if data.ndim != 2:
        raise ValueError(f"{name}: logits must be (A, K), one row per anchor, got shape {tuple(data.shape)}")
    if data.dtype.kind != "f":
        raise TypeError(f"{name}: logits must be float32 or float64, got {data.dtype}")
    num_anchors, num_classes = data.shape
    if tuple(labels.shape) != (num_anchors,) or labels.dtype.kind not in "iu":
        raise ValueError(f"{name}: labels must be an integer array of shape ({num_anchors},), one per row of the "
                         f"logits; got dtype {labels.dtype} and shape {tuple(labels.shape)}")
    if num_anchors and (int(labels.min()) < IGNORED or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: labels must be classes 0..{num_classes - 1}, BACKGROUND (-1) or IGNORED (-2); "
                         f"got values from {int(labels.min())} to {int(labels.max())}")
    if weights is None:
        weights = xp.ones(num_anchors, dtype=data.dtype)
    if tuple(weights.shape) != (num_anchors,):
        raise ValueError(f"{name}: weights must have shape ({num_anchors},), one per anchor, "
                         f"got {tuple(weights.shape)}")
    if gamma < 0:
        raise ValueError(f"{name}: gamma must be >= 0, got {gamma}")
    return SigmoidFocalLossWithLabels(as_python_scalar(alpha), as_python_scalar(gamma))(
        logits, labels.astype("int32", copy=False), weights.astype(data.dtype, copy=False))
