"""What the backbone tests share: torchvision models with realistic batch norm, their feature maps at the taps,
and a few training steps of a RetinaNet on a backbone."""

import numpy as np

import minidet as md
from minidet import optim
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
