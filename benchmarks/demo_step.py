"""The demo's training step as the benchmarks time it: the model, its optimizer, one batch, and the step itself.

The setup as first set: the demo's model and optimizer as ``minidet.train`` had them then (SGD, subnets without
group norm). Written out here, not read from ``TrainConfig``, so the benchmarks keep measuring the same thing when
the demo's defaults change. ``bench_train_step.py`` times this step against torch on the CPU, ``bench_gpu_step.py``
on a GPU against the CPU.
"""

import numpy as np

from minidet import optim
from minidet.data import Shapes
from minidet.models.retinanet import RetinaNet
from minidet.nn.init import manual_seed
from minidet.train import training_batch

SEED, NUM_IMAGES, IMAGE_SIZE, FLIP_PROB = 0, 16, 128, 0.5
BACKBONE, FPN_CHANNELS, PRESET = "resnet_small", 64, "paper"
LR = 0.02 / 3          # the warm-up's first rate: 20 steps on one batch at the full rate could blow the weights up
MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4


def demo_setup(device="cpu", num_images=NUM_IMAGES, image_size=IMAGE_SIZE):
    """The model (fresh weights from the seed, as ``minidet.train.build_model``) on ``device``, its SGD and one
    batch of ``num_images`` shapes images there."""
    dataset = Shapes(num_images, image_size=image_size)
    manual_seed(SEED)
    model = RetinaNet(len(dataset.classes), backbone=BACKBONE, preset=PRESET, fpn_channels=FPN_CHANNELS).to(device)
    optimizer = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    images, targets = training_batch([dataset[i] for i in range(len(dataset))], np.random.default_rng(SEED),
                                     FLIP_PROB, device)
    return model, optimizer, images, targets


def training_step(model, optimizer, images, targets):
    """One training step, in minidet or in torch (the same calls in both); returns the two losses as floats."""
    losses = model(images, targets)
    loss = losses["classification"] + losses["box_regression"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return losses["classification"].item(), losses["box_regression"].item()
