"""How fast does minidet train? One training step of the demo's RetinaNet, timed against PyTorch on the CPU.

What is measured: one step of ``minidet demo``'s training, i.e.

    losses = model(images, targets)                      # forward: backbone, pyramid, subnets; matching, losses
    loss = losses["classification"] + losses["box_regression"]
    optimizer.zero_grad(); loss.backward()               # backward
    optimizer.step()                                     # SGD, momentum 0.9, weight decay 1e-4

for the demo's model as it was first set (``minidet.train``'s defaults then, written out in
benchmarks/demo_step.py, so later changes of those defaults do not change the benchmark): ``RetinaNet(4,
backbone="resnet_small", fpn_channels=64, preset="paper")``, on a batch of 16 images of 128 x 128 from
``Shapes(16, 128)`` prepared by ``minidet.train.training_batch``. The goal is at most 2.0 times torch's time for
the same step.

The PyTorch side: the same network built from torchvision's parts, with minidet's initial weights copied in
-------------------------------------------------------------------------------------------------------------
torchvision's ``RetinaNet`` class cannot be used as it is: it resizes and normalises the images itself, and its
loss is the torchvision preset's (low-quality matches, L1 box loss, per-image normalisation), not the paper's. So
the torch model here is assembled from torchvision's building blocks, which give exactly the paper preset's layers:

- backbone: ``torchvision.models.resnet.BasicBlock``, one per stage, widths 16, 32, 64, 128, after a 7x7 stride-2
  stem and a 3x3 stride-2 max pool (minidet's ``resnet_small``);
- pyramid: ``torchvision.ops.FeaturePyramidNetwork`` with ``LastLevelP6P7(128, 64)``, which computes P6 from C5
  (the paper's choice) because C5's 128 channels differ from the pyramid's 64;
- subnets: torchvision's ``RetinaNetClassificationHead`` and ``RetinaNetRegressionHead`` (4 convolutions + ReLU);
- loss, written out below as minidet's paper preset defines it, from torchvision's pieces: ``box_iou`` and
  ``Matcher(0.5, 0.4)`` for the matching, ``sigmoid_focal_loss`` (alpha 0.25, gamma 2) over the anchors that are
  not ignored, ``BoxCoder`` and smooth L1 (beta 0.11) for the positives, both divided by the batch's positives.

The anchors are minidet's (an array that is the same for every step of a given image size), converted once.
Its parameters and buffers have torchvision's names, which minidet's ``torchvision_weights.RENAMES`` maps to
minidet's; so minidet's initial weights are copied in, and before timing the script checks that both libraries
compute the same step: one step from the same weights in float64, whose losses and gradients must agree within
1e-6 (for the gradients, the largest difference over a tensor relative to its largest value, or to a millionth of the
model's largest gradient where that is more). It exits with status 1 if they do not. In float32 the same step is
printed for information only: the backbone's gradients are about 1e-5 of the subnets', sums that nearly cancel,
where float32 rounding (and which side of a ReLU a value near 0 falls) differs between any two implementations.
The last line printed is the ratio of the median step times, minidet / torch.

torchvision is imported through ``tests/torchvision_cpu.py``, which makes its Python code importable on a
CPU-only torch.

Timing: both models live in the same process and train on the same batch. Their steps alternate, one minidet
step, one torch step, after a short pause each (so neither library's spinning worker threads steal a core from the
other), and the medians of the repeats are compared. Both use the same number of threads: ``--threads``
(default 2) for NumPy's OpenBLAS, set before NumPy is imported, and ``torch.set_num_threads``.

Profile: a few more minidet steps run with every op's ``forward`` and ``backward`` wrapped by a timer (and the
autograd engine, the matching, the loss code and the optimizer too). Each region is charged its own time, without
the regions nested in it, so the rows add up to the whole step; the table lists them largest first.

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_train_step.py                  # 2 threads, median of 10 steps each
    PYTHONPATH=. python benchmarks/bench_train_step.py --threads 1 --repeat 20
    PYTHONPATH=. python benchmarks/bench_train_step.py --json step.json # also write the numbers as JSON
    PYTHONPATH=. python benchmarks/bench_train_step.py --quick          # 2 repeats: checks that the script runs

Without PyTorch installed, only minidet's time and profile are printed.
"""

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from collections import defaultdict

from threads import set_blas_threads, thread_report  # benchmarks/threads.py


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for both libraries (default: 2)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed steps per library, the median is reported (default: 10, or 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per library before timing")
    parser.add_argument("--profile-steps", type=int, default=None,
                        help="minidet steps run with the per-op timers; 0 skips the profile (default: 3, 1 with "
                             "--quick)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="2 repeats and 1 profiled step: checks the script runs")
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 2 if args.quick else 10
    if args.profile_steps is None:
        args.profile_steps = 1 if args.quick else 3
    return args


ARGS = parse_args()

# NumPy's matrix products run in OpenBLAS, which reads its thread count from these environment variables once,
# when NumPy is first imported: so they are set here, before the imports below. (torch is told directly.)
set_blas_threads(ARGS.threads)

import numpy as np  # noqa: E402  (imported after the thread settings on purpose)
from demo_step import BACKBONE, FPN_CHANNELS, LR, MOMENTUM, PRESET, WEIGHT_DECAY, demo_setup, training_step  # noqa: E402

import minidet  # noqa: E402
from minidet import autograd, optim  # noqa: E402
from minidet.anchors import AnchorGenerator  # noqa: E402
from minidet.autograd import Function  # noqa: E402
from minidet.functional import conv  # noqa: E402
from minidet.models import retinanet  # noqa: E402
from minidet.models.torchvision_weights import RENAMES  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

if torch is not None:  # torchvision's Python code, even on a CPU-only torch (see the module docstring)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import torchvision_cpu

    torchvision = torchvision_cpu.import_torchvision()
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
    from torchvision.models.resnet import BasicBlock
    from torchvision.ops import FeaturePyramidNetwork, box_iou, sigmoid_focal_loss
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7


# ---- the same network and loss in torch ------------------------------------------------------------------------

if torch is not None:
    class TorchResNetSmall(torch.nn.Module):
        """minidet's ``resnet_small`` from torchvision's BasicBlock: returns C3, C4, C5 (32, 64, 128 channels)."""

        def __init__(self, widths=(16, 32, 64, 128)):
            super().__init__()
            nn = torch.nn
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            in_channels = widths[0]
            for stage, channels in enumerate(widths, start=1):
                stride = 1 if stage == 1 else 2
                downsample = None
                if stride != 1 or in_channels != channels:
                    downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                               nn.BatchNorm2d(channels))
                setattr(self, f"layer{stage}", nn.Sequential(BasicBlock(in_channels, channels, stride, downsample)))
                in_channels = channels

        def forward(self, images):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(images))))
            c2 = self.layer1(x)
            c3 = self.layer2(c2)
            c4 = self.layer3(c3)
            return [c3, c4, self.layer4(c4)]

    class TorchBackbone(torch.nn.Module):
        """body (the ResNet) + fpn: torchvision's ``BackboneWithFPN`` layout, so the names are torchvision's."""

        def __init__(self, fpn_channels):
            super().__init__()
            self.body = TorchResNetSmall()
            self.fpn = FeaturePyramidNetwork([32, 64, 128], fpn_channels,
                                             extra_blocks=LastLevelP6P7(128, fpn_channels))   # P6 from C5

        def forward(self, images):
            features = self.fpn(dict(zip(("c3", "c4", "c5"), self.body(images))))
            return list(features.values())                                  # [P3, ..., P7]

    class TorchHead(torch.nn.Module):
        def __init__(self, fpn_channels, num_anchors, num_classes):
            super().__init__()
            self.classification_head = RetinaNetClassificationHead(fpn_channels, num_anchors, num_classes)
            self.regression_head = RetinaNetRegressionHead(fpn_channels, num_anchors)

    class TorchRetinaNet(torch.nn.Module):
        """The paper preset's RetinaNet in torch; ``forward(images, targets)`` returns the two losses."""

        def __init__(self, num_classes, fpn_channels, anchors):
            super().__init__()
            self.backbone = TorchBackbone(fpn_channels)
            self.head = TorchHead(fpn_channels, 9, num_classes)
            self.anchors = torch.from_numpy(anchors)                        # (M, 4), minidet's
            self.matcher = det_utils.Matcher(retinanet.POSITIVE_IOU, retinanet.BACKGROUND_IOU,
                                             allow_low_quality_matches=False)
            self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

        def forward(self, images, targets):
            features = self.backbone(images)
            cls_logits = self.head.classification_head(features)             # (N, M, K)
            box_deltas = self.head.regression_head(features)                 # (N, M, 4)
            classification = box_regression = 0
            num_positive = 0
            for logits, deltas, target in zip(cls_logits, box_deltas, targets):
                boxes, labels = target["boxes"], target["labels"]
                if len(boxes):
                    matches = self.matcher(box_iou(boxes, self.anchors))     # (M,) box, -1 or -2
                else:
                    matches = torch.full((len(self.anchors),), -1, dtype=torch.int64)
                positive = matches >= 0
                num_positive += int(positive.sum())
                cls_targets = torch.zeros_like(logits)                       # (M, K)
                cls_targets[positive, labels[matches[positive]]] = 1
                counted = matches != det_utils.Matcher.BETWEEN_THRESHOLDS    # ignored anchors add nothing
                classification = classification + sigmoid_focal_loss(
                    logits[counted], cls_targets[counted], alpha=retinanet.FOCAL_ALPHA, gamma=retinanet.FOCAL_GAMMA,
                    reduction="sum")
                box_targets = self.box_coder.encode_single(boxes[matches[positive]], self.anchors[positive])
                box_regression = box_regression + torch.nn.functional.smooth_l1_loss(
                    deltas[positive], box_targets, beta=0.11, reduction="sum")
            divisor = max(1, num_positive)                                   # the paper: the batch's positives
            return {"classification": classification / divisor, "box_regression": box_regression / divisor}


def torch_name(minidet_name):
    """minidet's parameter name -> torchvision's (the inverse of ``torchvision_weights.RENAMES``)."""
    for theirs, ours in RENAMES:
        if minidet_name.startswith(ours):
            return theirs + minidet_name[len(ours):]
    raise KeyError(minidet_name)


def torch_setup(model, images, targets):
    """The torch model with ``model``'s weights, its SGD optimizer, and the batch as torch tensors."""
    feature_sizes = [(128 // s, 128 // s) for s in AnchorGenerator().strides]   # P3-P7 of a 128 x 128 image
    anchors = model.anchor_generator(images.shape[-2:], feature_sizes)
    torch_model = TorchRetinaNet(model.num_classes, FPN_CHANNELS, anchors)
    state = {torch_name(name): torch.from_numpy(value) for name, value in model.state_dict().items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map: torch model lacks {unexpected}, minidet lacks {missing}")
    torch_model.train()
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=LR, momentum=MOMENTUM,
                                      weight_decay=WEIGHT_DECAY)
    torch_images = torch.from_numpy(images.copy())
    torch_targets = [{"boxes": torch.from_numpy(np.asarray(t["boxes"], np.float32)),
                      "labels": torch.from_numpy(np.asarray(t["labels"], np.int64))} for t in targets]
    return torch_model, torch_optimizer, torch_images, torch_targets


def compare(model, optimizer, images, targets, torch_model, torch_optimizer, torch_images, torch_targets):
    """One step in each library from the same weights: the losses, and the largest gradient difference."""
    ours = training_step(model, optimizer, images, targets)
    theirs = training_step(torch_model, torch_optimizer, torch_images, torch_targets)
    torch_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}
    # Some gradients are all but zero at initialisation (fpn.p7's are about 1e-14, a millionth of the others):
    # there float32 rounding is the whole value, so each tensor's error is taken relative to its largest value,
    # but at least a millionth of the largest gradient of the model.
    floor = 1e-6 * max(np.abs(g).max() for g in torch_grads.values())
    worst, worst_name = 0.0, None
    for name, p in model.named_parameters():
        reference = torch_grads[torch_name(name)]
        error = float(np.abs(p.grad - reference).max() / max(np.abs(reference).max(), floor))
        if error > worst:
            worst, worst_name = error, name
    loss_errors = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    return ours, theirs, loss_errors, worst, worst_name


# ---- timing ----------------------------------------------------------------------------------------------------

def alternate(steps, repeat, warmup):
    """Run the steps in turn, ``warmup + repeat`` rounds; returns each step's timed seconds (a list per step).

    The order flips every round, so neither library always runs right after the other. Before each step the
    script sleeps briefly: OpenBLAS's and torch's worker threads spin for a moment after their work, waiting for
    more; on 2 cores they would take a core from whatever is timed next.
    """
    times = [[] for _ in steps]
    for round_index in range(warmup + repeat):
        order = range(len(steps)) if round_index % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            time.sleep(0.2)
            start = time.perf_counter()
            steps[i]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[i].append(elapsed)
    return times


# ---- the profile by op -----------------------------------------------------------------------------------------

class Profile:
    """Seconds spent in named regions, each charged only its own time (without the regions nested inside it)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._nested = []   # for each region now running: the time spent so far in regions nested inside it

    def timed(self, function, label):
        """``function`` wrapped so that its calls count under ``label(*args)`` (a function giving the row name)."""
        profile = self

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            profile._nested.append(0.0)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                profile.seconds[label(*args)] += elapsed - profile._nested.pop()
                if profile._nested:
                    profile._nested[-1] += elapsed
        return wrapper


def _function_classes(cls=Function):
    """Every subclass of ``Function`` (recursively), i.e. every op minidet has."""
    for sub in cls.__subclasses__():
        yield sub
        yield from _function_classes(sub)


@contextlib.contextmanager
def instrumented(profile):
    """Within this block, the ops, the autograd engine, matching, loss and optimizer report to ``profile``."""
    targets = []   # (owner, attribute name, row name given the call's arguments)
    for cls in _function_classes():
        for method in ("forward", "backward"):
            if method in vars(cls):  # each op's own methods; the row is named after the op that runs
                targets.append((cls, method, lambda fn, *_, m=method: f"{type(fn).__name__} {m}"))
    fixed = {  # the rest: each a fixed row
        (Function, "__call__"): "autograd: recording ops (Function.__call__, outside forward)",
        (autograd, "run_backward"): "autograd: backward engine (graph walk, gradient sums)",
        (retinanet, "match_anchors_batch"): "loss: anchor matching (match_anchors_batch)",
        (retinanet.RetinaNet, "compute_loss"): "loss: compute_loss outside the ops and matching",
        (AnchorGenerator, "__call__"): "anchors: AnchorGenerator",
        (optim.SGD, "step"): "optimizer: SGD.step",
        (optim.Optimizer, "zero_grad"): "optimizer: zero_grad",
    }
    targets += [(owner, name, lambda *_, row=row: row) for (owner, name), row in fixed.items()]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for owner, name, label in targets:
            setattr(owner, name, profile.timed(getattr(owner, name), label))
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def profile_steps(model, optimizer, images, targets, steps):
    """Mean seconds per step in each region over ``steps`` instrumented steps, largest first."""
    profile = Profile()
    step = profile.timed(training_step, lambda *_: "other: Python between the ops (modules, checks, ...)")
    with instrumented(profile):
        for _ in range(steps):
            step(model, optimizer, images, targets)
    return sorted(((row, seconds / steps) for row, seconds in profile.seconds.items()), key=lambda r: -r[1])


def print_profile(rows, top=30):
    total = sum(seconds for _, seconds in rows)
    print(f"\nwhere minidet's step goes ({ARGS.profile_steps} instrumented steps, {1000 * total:.0f} ms a step with "
          "the timers; each row without the rows nested in it)")
    print(f"{'region':<62} {'ms/step':>8} {'share':>6} {'cumul':>6}")
    cumulative = 0.0
    for row, seconds in rows[:top]:
        cumulative += seconds
        print(f"{row:<62} {1000 * seconds:8.1f} {seconds / total:6.1%} {cumulative / total:6.1%}")
    if len(rows) > top:
        rest = sum(seconds for _, seconds in rows[top:])
        print(f"{f'({len(rows) - top} more rows)':<62} {1000 * rest:8.1f} {rest / total:6.1%}")
    groups = defaultdict(float)  # the same time by kind: conv forward, conv backward, other ops, ...
    for row, seconds in rows:
        if row.startswith("Conv2d "):
            groups[row] += seconds
        elif row.endswith(" forward") or row.endswith(" backward"):
            groups["other ops " + row.rsplit(" ", 1)[1]] += seconds
        else:
            groups[row.split(":")[0]] += seconds
    print("\nby kind: " + ", ".join(f"{name} {seconds / total:.0%}"
                                    for name, seconds in sorted(groups.items(), key=lambda g: -g[1])))


# ---- the floor: the convolutions' matrix products alone ---------------------------------------------------------

def convolution_products(model, optimizer, images, targets):
    """The matrix products of every ``Conv2d`` in one step, as functions that repeat them on arrays of their shapes.

    Each convolution does up to three products: the forward W x columns, dL/dW = dL/dY x columns transposed, and
    dL/dx (a product with the flipped kernel where ``Conv2d`` computes it so, else W transposed x dL/dY, before
    col2im; none for the images). Timed alone, they are what the step would cost if every copy, every other op
    and all of Python took no time: a floor under minidet's step that only a faster BLAS can lower.
    """
    calls = []
    backward = conv.Conv2d.backward

    def recording(self, gy):
        taps = self.w_shape[2] * self.w_shape[3]
        calls.append((self.w_mat.shape, self.cols.shape[2], taps, self.needs_input_grad[0], self._flipping_pays()))
        return backward(self, gy)

    conv.Conv2d.backward = recording
    try:
        training_step(model, optimizer, images, targets)
    finally:
        conv.Conv2d.backward = backward
    rng = np.random.default_rng(0)

    def operands(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    products = []   # (a, b) pairs, each one a @ b of the step
    for (g, o, k), columns, taps, need_x, flipped in calls:   # W is (G, O/G, k), k = C/G * KH * KW
        w, cols, gy = operands(g, o, k), operands(g, k, columns), operands(g, o, columns)
        products += [(w, cols), (cols, gy.swapaxes(-1, -2))]   # the forward; dL/dW, transposed as Conv2d does it
        if need_x and flipped:    # the flipped kernel (G, C/G, O/G*KH*KW) times the columns of dL/dy
            products.append((operands(g, k // taps, o * taps), operands(g, o * taps, columns)))
        elif need_x:              # W transposed (G, k, O/G) times dL/dY
            products.append((w.swapaxes(-1, -2), gy))
    return products


def time_products(products, repeat):
    """The median seconds of all ``products`` done once, over ``repeat`` runs after one warm-up."""
    times = []
    for _ in range(repeat + 1):
        time.sleep(0.2)
        start = time.perf_counter()
        for a, b in products:
            np.matmul(a, b)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# ---- main --------------------------------------------------------------------------------------------------------

# The weights, images and every op run in float64; the anchors and boxes stay float32 in both libraries (the box
# targets are encoded from them), so the box loss and the gradients agree to about float32's precision of those
# targets (measured: 6e-9 and 4e-7), not to float64's. A wrong op disagrees by orders of magnitude more.
LOSS_TOLERANCE_FLOAT64 = GRADIENT_TOLERANCE_FLOAT64 = 1e-6


def check_same_step_in_float64(result):
    """One step of both libraries from the same fresh weights, in float64; exit 1 if they disagree."""
    model, optimizer, images, targets = demo_setup()
    model.to(np.float64)
    images = images.astype(np.float64)
    torch_model, torch_optimizer, torch_images, torch_targets = torch_setup(model, images, targets)
    torch_model.double()
    ours, theirs, loss_errors, worst, worst_name = compare(model, optimizer, images, targets, torch_model,
                                                           torch_optimizer, torch_images, torch_targets)
    print(f"same step, same weights, float64: losses (classification, box regression) minidet ({ours[0]:.9f}, "
          f"{ours[1]:.9f}), torch ({theirs[0]:.9f}, {theirs[1]:.9f}), max rel diff {max(loss_errors):.1e}; "
          f"gradients max rel diff {worst:.1e} ({worst_name})")
    result.update(loss_rel_diff=max(loss_errors), grad_rel_diff=worst)
    if max(loss_errors) > LOSS_TOLERANCE_FLOAT64 or worst > GRADIENT_TOLERANCE_FLOAT64:
        sys.exit(f"bench_train_step.py: minidet and torch disagree on the same step in float64 (losses "
                 f"{max(loss_errors):.1e} > {LOSS_TOLERANCE_FLOAT64:g} or gradients {worst:.1e} > "
                 f"{GRADIENT_TOLERANCE_FLOAT64:g}, worst {worst_name}): the timings would not compare like with "
                 "like")


def main():
    if torch is not None:
        torch.set_num_threads(ARGS.threads)
    print(f"numpy {np.__version__}, minidet {minidet.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else ""))
    print(thread_report(ARGS.threads, torch))
    model, optimizer, images, targets = demo_setup()
    print(f"model: RetinaNet({model.num_classes} classes, {BACKBONE}, fpn_channels={FPN_CHANNELS}, "
          f"preset={PRESET!r}), {sum(p.size for p in model.parameters())} parameters; batch "
          f"{tuple(images.shape)}, {sum(len(t['boxes']) for t in targets)} boxes; SGD lr {LR:g}, momentum "
          f"{MOMENTUM}, weight decay {WEIGHT_DECAY}")
    result = {"threads": ARGS.threads, "repeat": ARGS.repeat, "numpy": np.__version__,
              "torch": torch.__version__ if torch is not None else None}

    steps = [lambda: training_step(model, optimizer, images, targets)]
    if torch is not None:
        check_same_step_in_float64(result)
        torch_parts = torch_setup(model, images, targets)
        ours, theirs, loss_errors, worst, worst_name = compare(model, optimizer, images, targets, *torch_parts)
        print(f"the same step in float32 (for information): losses max rel diff {max(loss_errors):.1e}; gradients "
              f"max rel diff {worst:.1e} ({worst_name})")
        result.update(loss_rel_diff_float32=max(loss_errors), grad_rel_diff_float32=worst)
        steps.append(lambda: training_step(*torch_parts))

    print(f"\ntiming: {ARGS.warmup} warm-up and {ARGS.repeat} timed steps per library, alternating")
    times = alternate(steps, ARGS.repeat, ARGS.warmup)
    ours_ms = 1000 * statistics.median(times[0])
    result["minidet_ms"] = ours_ms
    print(f"{'library':<10} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, seconds in zip(("minidet", "torch"), times):
        print(f"{name:<10} {1000 * statistics.median(seconds):10.1f} {1000 * min(seconds):8.1f} "
              f"{1000 * max(seconds):8.1f}")
    if torch is not None:
        torch_ms = 1000 * statistics.median(times[1])
        ratio = ours_ms / torch_ms
        # Each round's pair of steps ran a second apart: the median of their ratios is steadier when the load of
        # a shared machine changes during the run.
        paired = statistics.median(a / b for a, b in zip(*times))
        result.update(torch_ms=torch_ms, ratio=ratio, paired_ratio=paired)
        print(f"ratio minidet / torch: {ratio:.2f} (median of the rounds' ratios: {paired:.2f}); goal <= 2.0: "
              f"{'ok' if ratio <= 2.0 else 'SLOWER'}")

    products = convolution_products(model, optimizer, images, targets)
    floor_ms = 1000 * time_products(products, ARGS.repeat)
    result["conv_products_ms"] = floor_ms
    print(f"\nthe convolutions' {len(products)} matrix products alone (a floor under minidet's step): {floor_ms:.1f} ms"
          + (f", {floor_ms / result['torch_ms']:.2f}x torch's whole step" if torch is not None else ""))

    if ARGS.profile_steps:
        rows = profile_steps(model, optimizer, images, targets, ARGS.profile_steps)
        print_profile(rows)
        result["profile_ms"] = {row: 1000 * seconds for row, seconds in rows}
    if ARGS.json:
        with open(ARGS.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {ARGS.json}")
    if torch is not None:
        print(f"ratio minidet / torch: {result['ratio']:.2f}")


if __name__ == "__main__":
    main()
