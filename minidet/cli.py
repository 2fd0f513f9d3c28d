"""The ``minidet`` command.

For now it has one job, ``minidet demo``: train a tiny convolutional network
with minidet's own autograd, print its loss falling and draw the curve. When
the detector lands, ``demo`` will train and evaluate a RetinaNet instead.
"""

import argparse
import os
import sys
import time

import numpy as np

import minidet as md
import minidet.functional as F
from minidet import nn, optim


def bars(count, size, rng):
    """Images (count, 1, size, size) holding one horizontal (label 0) or vertical (label 1) bar, plus noise."""
    images = rng.normal(0, 0.3, (count, 1, size, size)).astype(np.float32)
    labels = rng.integers(0, 2, count)
    for image, label, where in zip(images, labels, rng.integers(2, size - 2, count)):
        if label:
            image[0, :, where] += 1.0
        else:
            image[0, where, :] += 1.0
    return images, labels.astype(np.float32)


class TinyNet(nn.Module):
    """conv 3x3 -> ReLU -> max pool -> conv 3x3 -> ReLU -> global average -> one logit."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.classifier = nn.Parameter(nn.init.normal((16, 1), std=0.1))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return (F.mean(x, dim=(2, 3)) @ self.classifier).reshape(-1)   # (N,)


def demo(args):
    md.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = TinyNet().to(args.device)
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, start = [], time.perf_counter()
    print(f"training a tiny conv net to tell horizontal from vertical bars ({args.steps} steps, {args.device})")
    for step in range(1, args.steps + 1):
        images, labels = bars(32, 16, rng)
        images, labels = md.tensor(images, device=args.device), md.tensor(labels, device=args.device)
        loss = F.binary_cross_entropy_with_logits(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    with md.no_grad():
        images, labels = bars(512, 16, rng)
        predicted = model(md.tensor(images, device=args.device)).numpy() > 0
    print(f"held-out accuracy {np.mean(predicted == labels):.1%} after {time.perf_counter() - start:.1f} s")
    os.makedirs(args.out, exist_ok=True)
    picture = os.path.join(args.out, "loss.png")
    _plot_loss(losses, picture)
    print(f"loss curve written to {picture}")


def _plot_loss(losses, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="binary cross-entropy", title="TinyNet learning bars with minidet")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser():
    parser = argparse.ArgumentParser(prog="minidet", description="RetinaNet from scratch, for learning.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="train a tiny network and show its loss falling",
                            description="Train a tiny conv net with minidet, print the loss and draw its curve.")
    p.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed for data and weights (default: 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default: cpu)")
    p.add_argument("--out", default="minidet-demo", help="folder for the pictures (default: minidet-demo)")
    p.set_defaults(run=demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (RuntimeError, ValueError, OSError) as error:
        print(f"minidet {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
