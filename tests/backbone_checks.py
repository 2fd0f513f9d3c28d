"""What the backbone tests share: torchvision models with realistic batch norm, their feature maps at the taps,
a few training steps of a RetinaNet on a backbone, and training one until it finds the objects it was shown."""

import numpy as np

import minidet as md
from minidet import optim
from minidet.boxes import box_iou
from minidet.data import Shapes
from minidet.models import RetinaNet
from minidet.train import training_batch


def realistic_batch_norm(model):
    """Give every BatchNorm2d of a torch model statistics and an affine map unlike the fresh 0, 1, 1, 0."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def assert_same_feature_maps(ours, theirs_features, taps, images):
    """minidet's backbone ``ours`` against a torch ``Sequential`` run layer by layer, read after the ``taps``."""
    import torch

    ours_maps = ours(md.tensor(images))
    x, theirs_maps = torch.from_numpy(images), []
    with torch.no_grad():
        for index, layer in enumerate(theirs_features):
            x = layer(x)
            if index in taps:
                theirs_maps.append(x.numpy())
    assert len(ours_maps) == len(theirs_maps) == 3
    for level, (a, b) in enumerate(zip(ours_maps, theirs_maps)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=f"C{level + 3}")


def training_losses(backbone, num_images, lr, steps):
    """The losses of ``steps`` Adam steps of a small RetinaNet on ``backbone``, on the same few shapes images."""
    md.manual_seed(0)
    model = RetinaNet(4, backbone=backbone, fpn_channels=32, head_norm=None)
    shapes = Shapes(num_images, image_size=64, seed=2, empty_fraction=0)
    images, targets = training_batch([shapes[i] for i in range(num_images)], np.random.default_rng(0), 0.0, "cpu")
    optimizer = optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(md.tensor(images), targets)
        total = loss["classification"] + loss["box_regression"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    return losses


def found_objects(detections, targets, min_score=0.3):
    """How many of the targets' boxes have a detection of their class with IoU >= 0.5 and score > ``min_score``."""
    found = 0
    for found_in_image, target in zip(detections, targets):
        confident = found_in_image["scores"] > min_score
        boxes, labels = found_in_image["boxes"][confident], found_in_image["labels"][confident]
        for box, label in zip(target["boxes"], target["labels"]):
            same_class = boxes[labels == label]
            found += bool(len(same_class)) and bool(box_iou(box[None], same_class).max() >= 0.5)
    return found


def steps_to_find(backbone, num_images=3, max_steps=150, check_every=5):
    """Train a small RetinaNet on ``backbone`` (Adam, 2e-3, group norm in the subnets) on a few 64 px shapes images
    of up to 3 objects, and return (steps, found, total): the steps it took until ``predict`` found every object
    (``found_objects``), or ``max_steps`` and how many it found then."""
    md.manual_seed(0)
    model = RetinaNet(4, backbone=backbone, fpn_channels=32, head_norm="group")
    shapes = Shapes(num_images, image_size=64, seed=2, empty_fraction=0, max_objects=3, max_overlap=0.1)
    images, targets = training_batch([shapes[i] for i in range(num_images)], np.random.default_rng(0), 0.0, "cpu")
    total = sum(len(target["boxes"]) for target in targets)
    optimizer = optim.Adam(model.parameters(), lr=2e-3)
    for step in range(1, max_steps + 1):
        loss = model(md.tensor(images), targets)
        optimizer.zero_grad()
        (loss["classification"] + loss["box_regression"]).backward()
        optimizer.step()
        if step % check_every == 0 or step == max_steps:
            found = found_objects(model.predict(md.tensor(images)), targets)
            if found == total or step == max_steps:
                return step, found, total
