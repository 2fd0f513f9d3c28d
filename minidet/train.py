"""The training loop: from a dataset to a trained RetinaNet, with checkpoints that resume exactly.

One step, as in the paper's recipe (Section 5 and the Detectron configuration):

    a batch of images, each flipped left-right half the time (boxes with it), normalised, padded to multiples of 32
      -> model(images, targets)                 the focal loss and the box regression loss
      -> loss = classification + box_regression
      -> backward                                a gradient for every parameter
      -> (optional) clip the gradients' global norm
      -> SGD with momentum 0.9 and weight decay 1e-4, the learning rate set by the schedule (warm-up, then steps
         of x0.1 or a cosine)

Around the steps:

- ``metrics.jsonl`` in the run folder: one JSON line per step (step, epoch, lr, the two losses, the anchor counts,
  the gradient norm, the seconds the step took), for loss curves.
- ``last.npz``: a checkpoint at the end of every epoch (and every ``checkpoint_every`` steps, if set), written
  atomically by ``minidet.save``, holding everything the next step depends on: weights, momentum buffers, the
  schedule's position, the step counters, the epoch's image order and the random generator's state. So
  ``train(config, resume=True)`` after a run was killed gives the same weights, bit for bit on the CPU, as a run
  that was never stopped.
- A guard: a loss or a gradient that is NaN or infinite, or a loss above 1000 times the first step's, stops
  training with ``TrainingDiverged``, naming the step and the likely causes, and the last good
  checkpoint is left as it was. Images with NaN or infinite pixels are refused, by their index in the dataset.

Randomness: the model's initial weights come from ``minidet.manual_seed(config.seed)``; the order of the images
in each epoch and the flips come from one generator, ``np.random.default_rng(config.seed)``, whose state is saved
in every checkpoint.
"""

import dataclasses
import json
import math
import os
import time
import warnings

import numpy as np

from minidet import anchor_report, backend, distributed, optim
from minidet.checkpoint import load, save
from minidet.data import Shapes, collate, horizontal_flip, normalize, resize
from minidet.models.retinanet import BACKBONES, PRESETS, RetinaNet
from minidet.nn.init import manual_seed
from minidet.progress import progress_bar


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run. The defaults train the small model on the built-in Shapes data on a CPU.

    Every setting is checked when the config is made (and when ``dataclasses.replace`` makes a new one): a value
    outside its range is a ValueError that names the setting and what it allows.

    Model:
        num_classes: K; None takes the number of the dataset's ``classes``.
        classes: the K class names, saved with every checkpoint so detections can be named; None takes the
            dataset's ``classes``.
        anchor_sizes, aspect_ratios: passed to ``RetinaNet``: the anchors' base size per level P3-P7 (None: 32, 64,
            128, 256, 512) and their shapes h / w (None: 0.5, 1, 2).
        auto_anchors: before training, measure how many boxes no anchor can match at IoU 0.5
            (``minidet.anchor_report``); if that is ``AUTO_ANCHOR_SHARE`` (10%) or more and anchors fitted to the
            boxes match clearly more, train with the fitted ones, and say so. Only when neither anchor setting is
            given. False keeps the preset's anchors.
        backbone, fpn_channels, head_norm, preset: passed to ``RetinaNet`` (``resnet_small`` with 64 channels: about
            0.3 M backbone parameters, a step of 16 images of 128 x 128 in about 0.3 s on a CPU). Group norm in
            the subnets (``head_norm="group"``, as torchvision's ``retinanet_resnet50_fpn_v2`` has) makes a model
            trained from scratch learn faster.
        box_loss_weight: lambda, the weight of the box regression loss against the classification loss (1, the
            paper's), passed to ``RetinaNet``.
        backbone_norm: ``"batch"`` (trainable batch norm in the backbone, the paper preset's, for a backbone that
            learns from scratch), ``"frozen"`` (fixed statistics and scales, the torchvision preset's, for a
            pretrained one), or None for the preset's.
    Data:
        min_size, max_size: every image (in training, evaluation and detection) is first resized, keeping its
            aspect ratio, so that its shorter side is ``min_size`` pixels, unless its longer side would then exceed
            ``max_size``, in which case that side is ``max_size`` (``minidet.data.transforms.resize_factor``; the
            paper's values are 800 and 1333). ``min_size`` None (the default) never enlarges an image, it only
            makes one longer than ``max_size`` smaller: the built-in 128 px shapes stay as they are, and a 4000 x
            3000 phone photo trains at 512 x 384 (one step of 16 such images: about 4 GB with ``resnet_small``).
            The boxes are scaled with the image; detections are mapped back to the original pixels.
        multiscale_sizes: None, or shorter sides in pixels to train at: each image of each step takes one of
            them at random in place of ``min_size`` (multi-scale training, as a tuple ``min_size`` is in
            torchvision), still capped by ``max_size``, so the detector sees its objects at several scales.
            Evaluation and detection use ``min_size``.
        num_images, image_size, data_seed: the built-in set, ``Shapes(num_images, image_size, seed=data_seed)``
            (unused when ``train`` is given a dataset).
        flip_prob: the probability of flipping each image (and its boxes) left-right at each step.
    Optimisation:
        batch_size, epochs: an epoch is one pass over the dataset in a new random order, ceil(len / batch_size)
            steps (the last batch may be smaller).
        optimizer: ``"sgd"`` (with momentum, the paper's) or ``"adam"``. The paper trains with SGD from a backbone
            pretrained on ImageNet; the small model here learns from scratch, and Adam gets it much further in the
            few hundred steps a CPU affords: measured on Shapes (batch 16, 128 px), after 190 steps the
            classification loss was 1.03 with SGD at lr 0.02 (0.01 barely moves it, 0.05 diverges) against 0.42
            with Adam at 1e-3 and 0.33 with Adam at 2e-3 and group norm in the subnets.
        lr: the learning rate after warm-up (the paper: 0.01 for SGD with 16 images a batch).
        momentum: SGD's (0.9, the paper's). weight_decay: L2 decay added to every gradient (1e-4, the paper's;
            for simplicity on every parameter, biases and normalisation scales included, as Detectron and
            torchvision do by default).
        warmup_iters, warmup_factor: the rate rises linearly from ``warmup_factor * lr`` to ``lr`` over the first
            ``warmup_iters`` steps, so the large early gradients of a fresh detector do not blow it up.
        schedule: ``"step"``: the rate is multiplied by 0.1 at each of ``milestones`` (step numbers; None puts them
            at 2/3 and 8/9 of training, where the paper's 60k and 80k of 90k are); ``"cosine"``: it falls along
            half a cosine to 0 at the last step.
        clip_grad_norm: None, or the largest global norm of the gradients (all parameters as one vector); larger
            gradients are scaled down to it before the update.
    Run:
        seed: the initial weights, the image order and the flips.
        device: ``"cpu"`` or ``"cuda"``.
        out: the run folder (``metrics.jsonl``, ``last.npz``).
        log_every: write a line to ``metrics.jsonl`` every this many steps.
        checkpoint_every: None, or also write ``last.npz`` every this many steps (besides the end of each epoch).
        progress: show a progress bar (on a terminal or in a Jupyter notebook; never into a log file).
    """

    # model
    num_classes: int | None = None
    classes: list[str] | None = None
    backbone: str = "resnet_small"
    fpn_channels: int = 64
    head_norm: str | None = "group"
    preset: str = "paper"
    anchor_sizes: list[float] | None = None
    aspect_ratios: list[float] | None = None
    auto_anchors: bool = True
    box_loss_weight: float = 1.0
    backbone_norm: str | None = None
    # data
    min_size: int | None = None
    max_size: int | None = 512
    multiscale_sizes: list[int] | None = None
    num_images: int = 1024
    image_size: int = 128
    data_seed: int = 0
    flip_prob: float = 0.5
    # optimisation
    optimizer: str = "adam"
    batch_size: int = 16
    epochs: int = 15
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 1 / 3
    schedule: str = "cosine"
    milestones: list[int] | None = None
    clip_grad_norm: float | None = None
    # run
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/train"
    log_every: int = 1
    checkpoint_every: int | None = None
    progress: bool = True

    def __post_init__(self):
        """Check every setting where it is set: a bad value is a ValueError that names it and what is allowed."""
        def check(ok, name, allowed):
            if not ok:
                raise ValueError(f"TrainConfig: {name} must be {allowed}, got {getattr(self, name)!r}")

        def whole(value, low):
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        def number(value):
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        check(self.num_classes is None or whole(self.num_classes, 1), "num_classes", "None or a whole number >= 1")
        check(self.classes is None or (isinstance(self.classes, list | tuple) and all(
            isinstance(name, str) and name for name in self.classes)), "classes", "None or a list of class names")
        check(self.backbone in BACKBONES, "backbone", f"one of {sorted(BACKBONES)}")
        check(whole(self.fpn_channels, 1), "fpn_channels", "a whole number >= 1")
        check(self.head_norm in (None, "group"), "head_norm", 'None or "group"')
        check(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}")
        def positive_numbers(values, count=None):
            return (isinstance(values, list | tuple) and len(values) == (count or len(values)) > 0
                    and all(number(v) and v > 0 for v in values))

        check(self.anchor_sizes is None or (positive_numbers(self.anchor_sizes, 5)
                                            and list(self.anchor_sizes) == sorted(self.anchor_sizes)),
              "anchor_sizes", "None or 5 increasing sizes in pixels > 0, one per level P3-P7")
        check(self.aspect_ratios is None or positive_numbers(self.aspect_ratios), "aspect_ratios",
              "None or a list of aspect ratios h / w > 0")
        check(isinstance(self.auto_anchors, bool), "auto_anchors", "True or False")
        check(self.backbone_norm in (None, "batch", "frozen"), "backbone_norm", 'None, "batch" or "frozen"')
        check(number(self.box_loss_weight) and self.box_loss_weight >= 0, "box_loss_weight",
              "a number >= 0 (the article's lambda; 1 is the paper's)")
        check(self.min_size is None or whole(self.min_size, 8), "min_size", "None or a whole number of pixels >= 8")
        check(self.max_size is None or whole(self.max_size, 32), "max_size", "None or a whole number of pixels >= 32")
        check(self.min_size is None or self.max_size is None or self.min_size <= self.max_size, "min_size",
              f"at most max_size ({self.max_size})")
        check(self.multiscale_sizes is None or (isinstance(self.multiscale_sizes, list | tuple)
                                                and len(self.multiscale_sizes) > 0
                                                and all(whole(v, 8) for v in self.multiscale_sizes)),
              "multiscale_sizes", "None or a list of whole numbers of pixels >= 8")
        check(whole(self.num_images, 1), "num_images", "a whole number >= 1")
        check(whole(self.image_size, 32), "image_size", "a whole number of pixels >= 32")
        check(whole(self.data_seed, 0), "data_seed", "a whole number >= 0")
        check(number(self.flip_prob) and 0 <= self.flip_prob <= 1, "flip_prob", "a probability, 0 to 1")
        check(self.optimizer in ("sgd", "adam"), "optimizer", '"sgd" or "adam"')
        check(whole(self.batch_size, 1), "batch_size", "a whole number >= 1")
        check(whole(self.epochs, 1), "epochs", "a whole number >= 1")
        check(number(self.lr) and self.lr > 0, "lr", "a number > 0 (the learning rate)")
        check(number(self.momentum) and 0 <= self.momentum < 1, "momentum", "a number from 0 to less than 1")
        check(number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        check(whole(self.warmup_iters, 0), "warmup_iters", "a whole number >= 0")
        check(number(self.warmup_factor) and 0 < self.warmup_factor <= 1, "warmup_factor",
              "a number > 0 and at most 1 (the first step's share of lr)")
        check(self.schedule in ("step", "cosine"), "schedule", '"step" or "cosine"')
        check(self.milestones is None or (isinstance(self.milestones, list | tuple) and all(
            whole(m, 1) for m in self.milestones) and list(self.milestones) == sorted(set(self.milestones))),
              "milestones", "None or increasing step numbers >= 1")
        check(self.clip_grad_norm is None or (number(self.clip_grad_norm) and self.clip_grad_norm > 0),
              "clip_grad_norm", "None or a number > 0")
        check(whole(self.seed, 0), "seed", "a whole number >= 0")
        check(self.device in backend.DEVICES, "device", f"one of {backend.DEVICES}")
        check(isinstance(self.out, str) and self.out != "", "out", "the path of the run folder")
        check(whole(self.log_every, 1), "log_every", "a whole number >= 1")
        check(self.checkpoint_every is None or whole(self.checkpoint_every, 1), "checkpoint_every",
              "None or a whole number >= 1")
        check(isinstance(self.progress, bool), "progress", "True or False")

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))


# auto_anchors fits the anchors when at least this share of the boxes cannot reach IoU 0.5 with the preset's, and
# uses the fitted ones when they leave at least AUTO_ANCHOR_GAIN fewer boxes unmatchable.
AUTO_ANCHOR_SHARE = 0.10
AUTO_ANCHOR_GAIN = 0.05

# Settings that may change when a run is resumed: they do not change what the steps compute. ``out`` too: a run
# folder that was moved or copied resumes where it now is.
RESUMABLE_CHANGES = ("device", "progress", "log_every", "checkpoint_every", "out")
# The divergence guard stops a run whose loss climbs above EXPLOSION_FACTOR times its first step's loss, or times
# MIN_LOSS_YARDSTICK if that was smaller: such a loss is not learning (with Adam at lr 1e3 the loss went from 1.7
# to 1e35 in one step while staying finite). The losses are divided by the positive anchors, so a fresh model
# starts near 1.1 (the focal loss of a positive at the prior 0.01) plus its box loss, whatever the data; a first
# batch without any object starts far lower, hence the floor.
EXPLOSION_FACTOR = 1000
MIN_LOSS_YARDSTICK = 1.0


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or infinite, or the loss exploded; training stopped and the last good
    checkpoint was kept."""


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the trained model, the run folder, the rows of its ``metrics.jsonl``, and the
    settings it trained with (the given ones, with the classes and any fitted anchors filled in)."""

    model: RetinaNet
    out: str
    metrics: list
    config: TrainConfig


# --- gradients ------------------------------------------------------------------------------------------------------
def grad_norm(parameters):
    """The global L2 norm of the gradients: sqrt(sum over parameters of sum(grad ** 2)), a Python float.

    Parameters without a gradient are skipped. Summed on the gradients' device and read once, so on a GPU it
    costs one synchronisation, not one per parameter. NaN or inf if any gradient holds one.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    xp = backend.get_array_module(grads[0])
    # float64 so the sum of squares of many float32 gradients neither overflows nor loses the small ones
    total = sum((g.astype(xp.float64) ** 2).sum() for g in grads)
    return math.sqrt(float(total))


def clip_grad_norm(parameters, max_norm):
    """Scale all gradients together so that their global norm is at most ``max_norm`` (as torch's
    ``clip_grad_norm_``): a gradient with norm n > max_norm is multiplied by max_norm / (n + 1e-6).

    Scaling every gradient by the same factor keeps the direction of the update and only shortens it, which is
    why it is done on the global norm and not parameter by parameter.

    Returns:
        the norm before clipping (a float), to log.
    """
    parameters = list(parameters)
    norm = grad_norm(parameters)
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in parameters:
            if p.grad is not None:
                p.grad = p.grad * p.grad.dtype.type(scale)
    return norm


# --- anchors that fit the data -------------------------------------------------------------------------------------
def fit_anchors_if_needed(config, dataset, report=True):
    """``config``, or a copy with anchors fitted to ``dataset``'s boxes, as ``TrainConfig.auto_anchors`` says.

    The check is ``minidet.anchor_report``'s: each box's best IoU with any anchor, on the images as training
    resizes them. A box below 0.5 gets no positive anchor under the paper's matching, so the detector never learns
    to find it. What was decided, and why, is printed (unless ``report`` is False: the workers of a data-parallel
    run but the first decide the same in silence), with the settings that repeat it.
    """
    if not config.auto_anchors or config.anchor_sizes is not None or config.aspect_ratios is not None:
        return config
    sizes = dict(min_size=config.min_size, max_size=config.max_size)
    before = anchor_report.anchor_statistics(dataset, config.preset, max_images=anchor_report.FIT_MAX_IMAGES,
                                             **sizes)
    if before.share_unmatchable < AUTO_ANCHOR_SHARE:
        return config
    fit = anchor_report.fit_anchors(dataset, config.preset, **sizes)
    say = print if report else (lambda text: None)
    lost = (f"anchors: {fit.before.share_unmatchable:.1%} of the boxes cannot reach IoU 0.5 with any of the "
            f"preset's anchors (sizes {min(min(s) for s in before.anchor_sizes):.0f}-"
            f"{max(max(s) for s in before.anchor_sizes):.0f} px), so they would never be learned")
    if fit.after.share_unmatchable > fit.before.share_unmatchable - AUTO_ANCHOR_GAIN:
        say(f"{lost}; fitted anchors do not do clearly better ({fit.after.share_unmatchable:.1%}): keeping the "
            "preset's. Resizing the images (min_size) may help; minidet inspect-anchors shows the boxes")
        return config
    say(f"{lost}. Training with anchors fitted to the boxes instead, which leave {fit.after.share_unmatchable:.1%}: "
        f"anchor_sizes {fit.anchor_sizes}, aspect_ratios {[round(r, 4) for r in fit.aspect_ratios]} "
        "(auto_anchors=False, or --no-auto-anchors, keeps the preset's)")
    return dataclasses.replace(config, anchor_sizes=fit.anchor_sizes, aspect_ratios=fit.aspect_ratios)


# --- building the pieces --------------------------------------------------------------------------------------------
def build_model(config):
    """The RetinaNet that ``config`` describes, with fresh weights from ``manual_seed(config.seed)``, on its device."""
    manual_seed(config.seed)
    model = RetinaNet(config.num_classes, backbone=config.backbone, preset=config.preset,
                      fpn_channels=config.fpn_channels, head_norm=config.head_norm,
                      anchor_sizes=config.anchor_sizes, aspect_ratios=config.aspect_ratios,
                      box_loss_weight=config.box_loss_weight, backbone_norm=config.backbone_norm)
    return model.to(config.device)


def build_optimizer(config, model):
    """The optimizer of ``config`` over the model's parameters: SGD with momentum (the paper's) or Adam."""
    if config.optimizer == "sgd":
        return optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                         weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"TrainConfig.optimizer: unknown optimizer {config.optimizer!r}; use 'sgd' or 'adam'")


def build_schedule(config, optimizer, total_steps):
    """The learning-rate schedule of ``config`` (with its warm-up) over ``total_steps`` steps."""
    warmup = dict(warmup_iters=config.warmup_iters, warmup_factor=config.warmup_factor)
    if config.schedule == "step":
        milestones = config.milestones
        if milestones is None:   # the paper: x0.1 at 60k and 80k of 90k iterations, i.e. at 2/3 and 8/9
            milestones = [round(total_steps * 2 / 3), round(total_steps * 8 / 9)]
        return optim.MultiStepLR(optimizer, milestones, gamma=0.1, **warmup)
    if config.schedule == "cosine":
        return optim.CosineAnnealingLR(optimizer, T_max=max(1, total_steps), **warmup)
    raise ValueError(f"TrainConfig.schedule: unknown schedule {config.schedule!r}; use 'step' or 'cosine'")


def draw_augmentations(rng, count, multiscale_sizes=None):
    """The random choices of ``count`` training images, in order: (the shorter side to resize to, or None for
    ``min_size``; a uniform number in [0, 1), the image is flipped when it is under ``flip_prob``). Per image, one
    draw for the size (only with ``multiscale_sizes``), then one for the flip, whatever ``flip_prob`` is, so the
    random stream does not depend on it. Drawn for a whole global batch at once, so that each worker of a
    data-parallel run uses the same choices for its images as one process would."""
    draws = []
    for _ in range(count):
        shorter = multiscale_sizes[rng.integers(len(multiscale_sizes))] if multiscale_sizes else None
        draws.append((shorter, rng.random()))
    return draws


def training_batch(items, rng, flip_prob, device, min_size=None, max_size=None, multiscale_sizes=None, draws=None):
    """Turn a list of ``(image, target)`` pairs into the model's input.

    Each image is resized by ``min_size`` and ``max_size`` (``minidet.data.transforms.resize``; None and None keep
    it as it is), or, with ``multiscale_sizes``, by one of those drawn from ``rng`` in place of ``min_size``;
    flipped left-right with probability ``flip_prob``; normalised with the ImageNet mean and standard deviation,
    and the batch is padded to multiples of 32 by ``collate``. The random choices are ``draws`` (from
    ``draw_augmentations``), or drawn from ``rng`` now.

    Returns:
        images: (N, 3, H, W) float32 on ``device``; targets: N dicts {"boxes": (G_i, 4), "labels": (G_i,)}.
    """
    if draws is None:
        draws = draw_augmentations(rng, len(items), multiscale_sizes)
    prepared = []
    for (image, target), (shorter, flip) in zip(items, draws):
        image, boxes, _ = resize(image, target["boxes"], shorter or min_size, max_size)
        if flip < flip_prob:
            image, boxes = horizontal_flip(image, boxes)
        prepared.append((normalize(image), {"boxes": boxes, "labels": target["labels"]}))
    images, targets, _ = collate(prepared)
    return backend.to_device(images, device), targets


# --- checkpoints ----------------------------------------------------------------------------------------------------
def checkpoint_state(config, model, optimizer, schedule, rng, step, epoch, batch_in_epoch, order,
                     loss_yardstick=None, workers=1):
    """Everything the next step depends on, as the flat dict of arrays ``minidet.save`` writes.

    Keys: ``model.*`` (weights and batch norm statistics), ``optimizer.*`` (momentum buffers and settings),
    ``scheduler.*`` (its step), ``step`` (optimizer steps done), ``epoch`` and ``batch_in_epoch`` (where the next
    step is: batch ``batch_in_epoch`` of epoch ``epoch``, counting from 0), ``epoch_order`` (this epoch's image
    order; empty at the end of an epoch, the next order is drawn when the next epoch starts), ``rng_state`` and
    ``config`` (JSON text in 0-d string arrays: a checkpoint holds arrays only, and loading never unpickles),
    ``loss_yardstick`` (the first step's loss, at least ``MIN_LOSS_YARDSTICK``, which the divergence guard
    compares with; NaN before any step), ``workers`` (how many processes trained together: a data-parallel run
    resumes with as many).
    """
    state = {"model." + name: value for name, value in model.state_dict().items()}
    state.update(("optimizer." + name, value) for name, value in optimizer.state_dict().items())
    state.update(("scheduler." + name, value) for name, value in schedule.state_dict().items())
    state.update(step=np.int64(step), epoch=np.int64(epoch), batch_in_epoch=np.int64(batch_in_epoch),
                 epoch_order=np.asarray(order if order is not None else [], dtype=np.int64),
                 # the bit generator's state holds 128-bit integers, which JSON writes exactly
                 rng_state=np.array(json.dumps(rng.bit_generator.state)),
                 config=np.array(config.to_json()),
                 loss_yardstick=np.float64(math.nan if loss_yardstick is None else loss_yardstick),
                 workers=np.int64(workers))
    return state


def _entries_under(state, prefix):
    """The entries of ``state`` whose names start with ``prefix``, with the prefix removed."""
    return {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}


def load_trained_model(path, device="cpu"):
    """Rebuild the model saved in a checkpoint of ``train``: returns ``(model, config)``, the model in eval mode."""
    state = load(path)
    if "config" not in state:
        kind = ("the weights of a model (a state dict, as minidet.save(model.state_dict()) writes)"
                if state and not any(name.startswith("model.") for name in state) else "no settings")
        raise ValueError(f"{path} is not a checkpoint of minidet train: it holds {kind}, without the run's settings "
                         "('config'). Load such weights into a model built as they were: "
                         "model.load_state_dict(minidet.load(path))")
    config = dataclasses.replace(TrainConfig.from_json(str(state["config"])), device=device)
    model = build_model(config)
    model.load_state_dict(_entries_under(state, "model."))
    return model.eval(), config


def _check_resumable(config, saved):
    """Raise ValueError if ``config`` differs from the checkpoint's in a setting that changes the steps."""
    now, then = json.loads(config.to_json()), json.loads(saved.to_json())
    changed = [f"{name} ({then[name]!r} in the checkpoint, {now[name]!r} now)" for name in now
               if name not in RESUMABLE_CHANGES and now[name] != then[name]]
    if changed:
        raise ValueError("train: cannot resume exactly with different settings: " + "; ".join(changed)
                         + ". Resume with the checkpoint's settings, or start a new run in another folder")


def _divergence_message(what, value, step, epoch, lr, checkpoint):
    """The message of ``TrainingDiverged``; ``step`` and ``epoch`` as in ``metrics.jsonl`` (from 1 and from 0)."""
    kept = (f"The last good checkpoint, {checkpoint}, was kept" if os.path.exists(checkpoint)
            else "No checkpoint had been written yet")
    return (f"training diverged at step {step} (epoch {epoch}): the {what} is {value}. Likely causes: a learning "
            f"rate too high for the batch size (lr was {lr:g}: lower it, lengthen the warm-up or set "
            "clip_grad_norm); bad boxes in the data (zero or negative size, outside the image, wrong labels); "
            f"float16 overflow. {kept}.")


def _read_metrics(path, up_to_step=None):
    """The rows of ``metrics.jsonl`` (those with step <= ``up_to_step`` if given).

    A last line that is not whole JSON is what a kill in the middle of writing it leaves: it is dropped, with a
    warning (its step runs again on resume). A bad line anywhere else is an error that names the file and line.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for position, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                warnings.warn(f"{path}: dropped its last line {number}, which was cut off (a run stopped while "
                              "writing it)", stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not a JSON row of metrics ({error}); the file was changed "
                             "by hand or damaged: delete the line, or start the run again with --overwrite") from None
    return [row for row in rows if up_to_step is None or row["step"] <= up_to_step]


def _remove_unfinished_writes(folder):
    """Delete the temporary files (``.tmp-*``) of atomic writes that a kill interrupted in ``folder``.

    ``minidet.checkpoint.write_atomically`` removes its temporary file when the write fails, but a process killed
    outright (SIGKILL, power loss) cannot; the complete file it was replacing is still there.
    """
    for name in sorted(os.listdir(folder)):
        if name.startswith(".tmp-"):
            os.remove(os.path.join(folder, name))
            print(f"removed {os.path.join(folder, name)}, left by an interrupted write")


# --- the loop -------------------------------------------------------------------------------------------------------
def _worker_losses(model, dataset, indices, draws, config, world):
    """Forward and backward of this worker's share of a step (``indices``, with their random ``draws``), the
    gradients summed over the workers: the gradient of the whole global batch's loss on every worker.

    Returns the global batch's losses and anchor counts as Python numbers (the same on every worker). A worker
    without images in the step (the last batch of an epoch can be short) adds zeros.
    """
    items = [dataset[int(i)] for i in indices]
    for index, (image, _) in zip(indices, items):
        if not np.isfinite(image).all():
            raise ValueError(f"train: image {index} of the dataset has NaN or infinite pixels; fix or remove it")
    names = ("loss", "classification", "box_regression", "num_positive", "num_ignored", "num_negative")
    if items:
        images, targets = training_batch(items, None, config.flip_prob, config.device, config.min_size,
                                         config.max_size, draws=draws)
        losses = model(images, targets)
        share = distributed.loss_share(world, model.loss_normalization, len(items), losses["num_positive"])
        (losses["loss"] * share if world.size > 1 else losses["loss"]).backward()
        local = [losses[name].item() * share if name in names[:3] else losses[name] for name in names]
    else:
        distributed.loss_share(world, model.loss_normalization, 0, 0)         # every worker takes part
        local = [0.0] * len(names)
    if world.size > 1:
        parameters = model.parameters()
        xp = backend.get_array_module(parameters[0].data)
        for p in parameters:
            if p.grad is None:
                p.grad = xp.zeros_like(p.data)
        world.sum_arrays([p.grad for p in parameters])
        world.average_buffers(model)
    totals = world.sum_numbers(*local)
    return {name: int(value) if name.startswith("num_") else value for name, value in zip(names, totals)}


def _with_the_data(config, dataset):
    """``config`` with the class names and count from ``dataset`` (default: the built-in ``Shapes`` of the config)
    filled in, and the dataset."""
    if dataset is None:
        dataset = Shapes(config.num_images, image_size=config.image_size, seed=config.data_seed)
    if config.classes is None and hasattr(dataset, "classes"):
        config = dataclasses.replace(config, classes=list(dataset.classes))
    if config.num_classes is None:
        if config.classes is None:
            raise ValueError("train: the dataset has no 'classes' (its class names); set TrainConfig.num_classes")
        config = dataclasses.replace(config, num_classes=len(config.classes))
    if len(dataset) == 0:
        raise ValueError("train: the dataset is empty")
    return config, dataset


def train(config=None, dataset=None, resume=False):
    """Train a RetinaNet as ``config`` says, on ``dataset`` (default: the built-in ``Shapes`` of the config).

    Args:
        config: a ``TrainConfig`` (default ``TrainConfig()``).
        dataset: a sequence of ``(image (3, H, W) float32 in [0, 1], {"boxes": (G, 4), "labels": (G,)})`` with
            the class names in ``dataset.classes``; images of different sizes are padded together.
        resume: continue the run in ``config.out`` from its ``last.npz``, exactly where it stopped: the result is
            the same as if it had never stopped. The settings must be the checkpoint's, but for
            ``RESUMABLE_CHANGES`` (device, progress bar, logging, checkpoint frequency, and the folder's path: a
            moved or copied run folder resumes where it is).

    Returns:
        ``TrainResult(model, out, metrics, config)``: the model (in training mode, on ``config.device``), the run
        folder, the rows of its ``metrics.jsonl`` and the settings it trained with (classes and fitted anchors
        filled in).

    Raises:
        TrainingDiverged: the loss or a gradient became NaN or infinite, or the loss exploded (``last.npz`` is left
            as it was).
        ValueError: an image of the dataset has NaN or infinite pixels (named by its index).
    """
    config = config or TrainConfig()
    backend.check_device_name(config.device)
    config, dataset = _with_the_data(config, dataset)
    world = distributed.world(config.device)
    config = fit_anchors_if_needed(config, dataset, report=world.is_root)
    os.makedirs(config.out, exist_ok=True)
    metrics_path = os.path.join(config.out, "metrics.jsonl")
    if world.is_root:
        _remove_unfinished_writes(config.out)

    global_batch = config.batch_size * world.size          # each worker takes batch_size images of each step
    steps_per_epoch = math.ceil(len(dataset) / global_batch)
    run = _Run.start(config, world, dataset, total_steps=config.epochs * steps_per_epoch)
    start_epoch, start_batch = 0, 0
    if resume:
        start_epoch, start_batch = run.resume(metrics_path)
    elif world.is_root:
        # A fresh run in a folder replaces the run there: its log and its checkpoint go now, so that a later resume
        # can never continue the old checkpoint with the new log.
        for old in (metrics_path, run.checkpoint_path):
            if os.path.exists(old):
                os.remove(old)

    bar = progress_bar(config.progress and world.is_root, total=run.total_steps, initial=run.step, unit="step",
                       dynamic_ncols=True)
    try:
        with open(metrics_path if world.is_root else os.devnull, "a", encoding="utf-8") as metrics_file:
            for epoch in range(start_epoch, config.epochs):
                if run.order is None:
                    run.order = run.rng.permutation(len(dataset))
                bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
                for batch_index in range(start_batch, steps_per_epoch):
                    row = run.train_step(epoch, run.order[batch_index * global_batch:(batch_index + 1) * global_batch])
                    if run.step % config.log_every == 0:
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                    bar.set_postfix({"cls": f"{row['classification']:.3f}", "box": f"{row['box_regression']:.3f}",
                                     "pos": row["num_positive"], "ign": row["num_ignored"],
                                     "neg": row["num_negative"]})      # a dict keeps this order
                    bar.update()
                    if (config.checkpoint_every and run.step % config.checkpoint_every == 0
                            and batch_index + 1 < steps_per_epoch):
                        run.save_checkpoint(epoch, batch_index + 1)
                run.order, start_batch = None, 0
                run.save_checkpoint(epoch + 1, 0)
    except BaseException as error:
        if world.size > 1:
            world.abort(error)
        raise
    finally:
        bar.close()
    metrics = world.broadcast(_read_metrics(metrics_path) if world.is_root else None)    # the first worker's log
    return TrainResult(run.model, config.out, metrics, config)


class _DivergenceGuard:
    """Stops a run whose loss, gradient norm or weights stop being finite, or whose loss explodes (over
    ``EXPLOSION_FACTOR`` times the first step's, at least ``MIN_LOSS_YARDSTICK``: the yardstick, kept in the
    checkpoint so a resumed run compares with the same): ``TrainingDiverged``, raised before the update or the
    checkpoint that would keep the bad values, so ``last.npz`` stays the last good state."""

    def __init__(self, checkpoint_path, yardstick=None):
        self.checkpoint_path, self.yardstick = checkpoint_path, yardstick

    def _diverged(self, what, value, step, epoch, lr):
        return TrainingDiverged(_divergence_message(what, value, step, epoch, lr, self.checkpoint_path))

    def check_loss(self, loss, step, epoch, lr):
        if not math.isfinite(loss):
            raise self._diverged("loss", loss, step, epoch, lr)
        if self.yardstick is None:
            self.yardstick = max(loss, MIN_LOSS_YARDSTICK)
        if loss > EXPLOSION_FACTOR * self.yardstick:
            raise self._diverged("loss", f"{loss:.4g}, over {EXPLOSION_FACTOR} times where it started "
                                 f"({self.yardstick:.4g})", step, epoch, lr)

    def check_gradient_norm(self, norm, step, epoch, lr):
        if not math.isfinite(norm):
            raise self._diverged("gradient norm", norm, step, epoch, lr)

    def check_weights(self, model, step, epoch, lr):
        # Weights can overflow in an update even when the gradients were finite.
        for name, p in model.named_parameters():
            largest = float(abs(p.data).max())        # NaN if any weight is NaN, inf if any is infinite
            if not math.isfinite(largest):
                raise self._diverged(f"largest weight of {name} after the update", largest, step, epoch, lr)


@dataclasses.dataclass
class _Run:
    """A training run under way: what it trains, how far it is, one step of it and its checkpoint."""

    config: TrainConfig
    world: object
    dataset: object
    model: RetinaNet
    optimizer: object
    schedule: object
    rng: np.random.Generator
    guard: _DivergenceGuard
    total_steps: int
    parameters: list              # the model's, in order: clipped and measured at every step
    step: int = 0                 # optimizer steps done
    order: np.ndarray = None      # this epoch's order of the images, None until it is drawn

    @property
    def checkpoint_path(self):
        return self.guard.checkpoint_path

    @classmethod
    def start(cls, config, world, dataset, total_steps):
        """A new run: the model with fresh weights from the seed, its optimizer and schedule."""
        model = build_model(config)
        optimizer = build_optimizer(config, model)
        guard = _DivergenceGuard(os.path.join(config.out, "last.npz"))
        run = cls(config, world, dataset, model, optimizer, build_schedule(config, optimizer, total_steps),
                  np.random.default_rng(config.seed), guard, total_steps, model.parameters())
        model.train()
        return run

    def resume(self, metrics_path):
        """Load the run folder's checkpoint into the model, optimizer, schedule and random generator, after checking
        that it can be continued exactly; drop the log lines written after it. Returns where the run goes on: (epoch,
        batch in the epoch)."""
        config, world = self.config, self.world
        if not os.path.exists(self.checkpoint_path):
            raise FileNotFoundError(f"train: cannot resume: {self.checkpoint_path} does not exist (no epoch of a run "
                                    f"in {config.out} has finished); start without resume")
        state = load(self.checkpoint_path)
        _check_resumable(config, TrainConfig.from_json(str(state["config"])))
        workers = int(state.get("workers", 1))                       # checkpoints before data-parallel runs lack it
        if workers != world.size:
            raise ValueError(f"train: cannot resume exactly: the run in {config.out} trained on {workers} "
                             f"worker(s), now there are {world.size}, which changes every global batch; resume "
                             f"with mpiexec -n {workers} (or without mpiexec for 1), or start a new run")
        self.model.load_state_dict(_entries_under(state, "model."))
        self.optimizer.load_state_dict(_entries_under(state, "optimizer."))
        self.schedule.load_state_dict(_entries_under(state, "scheduler."))
        self.rng.bit_generator.state = json.loads(str(state["rng_state"]))
        self.step, epoch, batch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        self.order = state["epoch_order"] if batch else None
        saved = float(state.get("loss_yardstick", math.nan))          # checkpoints before the guard lack it
        self.guard.yardstick = saved if math.isfinite(saved) else None
        # Lines the stopped run logged after its checkpoint are dropped: those steps are run again.
        if world.is_root:
            rows = _read_metrics(metrics_path, up_to_step=self.step)
            with open(metrics_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return epoch, batch

    def train_step(self, epoch, batch):
        """One optimizer step on the image indices ``batch`` (the global batch; this worker takes its share).
        Returns its row of ``metrics.jsonl``."""
        config, world = self.config, self.world
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        draws = draw_augmentations(self.rng, len(batch), config.multiscale_sizes)   # the whole batch's draws
        mine = slice(world.rank * config.batch_size, (world.rank + 1) * config.batch_size)
        self.optimizer.zero_grad()
        losses = _worker_losses(self.model, self.dataset, batch[mine], draws[mine], config, world)
        self.guard.check_loss(losses["loss"], self.step + 1, epoch, lr)
        if config.clip_grad_norm is not None:
            norm = clip_grad_norm(self.parameters, config.clip_grad_norm)
        else:
            norm = grad_norm(self.parameters)
        self.guard.check_gradient_norm(norm, self.step + 1, epoch, lr)
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        return {"step": self.step, "epoch": epoch, "lr": lr, **losses, "grad_norm": norm,
                "seconds": time.perf_counter() - started}

    def save_checkpoint(self, next_epoch, next_batch):
        """Write last.npz (the first worker); the next step is batch ``next_batch`` of epoch ``next_epoch``."""
        epoch_of_step = next_epoch if next_batch else next_epoch - 1
        self.guard.check_weights(self.model, self.step, epoch_of_step, self.optimizer.param_groups[0]["lr"])
        if self.world.is_root:
            save(checkpoint_state(self.config, self.model, self.optimizer, self.schedule, self.rng, self.step,
                                  next_epoch, next_batch, self.order, self.guard.yardstick, workers=self.world.size),
                 self.checkpoint_path)


__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train", "fit_anchors_if_needed", "build_model",
           "build_schedule",
           "training_batch", "draw_augmentations", "grad_norm", "clip_grad_norm", "checkpoint_state",
           "load_trained_model"]
