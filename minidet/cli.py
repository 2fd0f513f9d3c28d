"""The ``minidet`` command.

``minidet demo`` trains a tiny convolutional network with minidet's own
autograd, prints its loss falling and draws the curve. When the detector
lands, ``demo`` will train and evaluate a RetinaNet instead.

``minidet convert WEIGHTS.pth OUT.npz`` turns torchvision's
``retinanet_resnet50_fpn`` (v1) weights into a minidet checkpoint (see
``minidet.models.torchvision_weights``). It is the only place where minidet
imports torch, to read the ``.pth`` file.
"""

import argparse
import os
import sys
import time

import numpy as np

import minidet as md
import minidet.functional as F
from minidet import nn, optim
from minidet.models.torchvision_weights import EPS_KEY, convert_torchvision_state_dict, torchvision_num_classes


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


def convert(args):
    if args.eps < 0:
        raise ValueError(f"--eps must be 0 or more, got {args.eps}")
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"{args.weights!r} does not exist; give the path of the .pth file")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder {folder!r} for {args.out!r} does not exist")
    try:
        import torch
    except ImportError:
        raise RuntimeError("reading a .pth file needs PyTorch, which minidet itself does not use: "
                           "pip install torch, then run this command again") from None
    try:
        # weights_only: unpickle tensors and plain containers only, never code (a .pth file is a pickle)
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _torch_load_error(args.weights, error) from error
    if not isinstance(state, dict):
        raise ValueError(f"{args.weights!r} holds a {type(state).__name__}, not a state dict (a dict of tensors)")
    arrays = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{args.weights!r} is not a state dict of tensors: {name!r} holds a "
                             f"{type(value).__name__}")
        value = value.detach().cpu()
        arrays[name] = (value.float() if value.is_floating_point() else value).numpy()
    converted = convert_torchvision_state_dict(arrays)       # ValueError naming the wrong keys
    num_classes = torchvision_num_classes(converted)
    md.save({**converted, EPS_KEY: np.array(args.eps, np.float64)}, args.out)
    print(f"converted {len(converted)} tensors of torchvision's retinanet_resnet50_fpn ({num_classes} classes, "
          f"frozen batch norm eps {args.eps:g}) to {args.out}")
    print(f"use it: state = minidet.load({args.out!r}); model = RetinaNet({num_classes}, backbone='resnet50', "
          "preset='torchvision'); load_torchvision_weights(model, state)")


def _torch_load_error(path, error):
    """One line for torch.load's many-line error: the file holds code (a whole model), or is not torch's."""
    text = str(error)
    detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    detail = (detail.strip().splitlines() or [type(error).__name__])[0]
    if "GLOBAL " in detail:     # "Unsupported global: GLOBAL argparse.Namespace was not an allowed global ..."
        name = detail.split("GLOBAL ", 1)[1].split()[0]
        return ValueError(f"{path!r} holds Python objects besides tensors ({name}: a whole model, or a training "
                          "checkpoint?), which torch.load(weights_only=True) does not unpickle because that could "
                          "run code; torch.save the model's state_dict() and convert that")
    return ValueError(f"{path!r} cannot be read by torch.load(weights_only=True); is it a file torch.save wrote? "
                      f"({detail})")


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

    p = commands.add_parser(
        "convert", help="convert torchvision's RetinaNet weights (.pth) to a minidet checkpoint (.npz)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert the state dict of torchvision's retinanet_resnet50_fpn (v1), such as its published\n"
                    "COCO weights retinanet_resnet50_fpn_coco-eeacb38b.pth, to a minidet checkpoint: the names\n"
                    "become minidet's, the arrays stay as they are. Needs PyTorch, to read the .pth file.",
        epilog="then, in Python:\n"
               "  import minidet\n"
               "  from minidet.models import RetinaNet, load_torchvision_weights, torchvision_num_classes\n"
               "  state = minidet.load('OUT.npz')\n"
               "  model = RetinaNet(torchvision_num_classes(state), backbone='resnet50', preset='torchvision')\n"
               "  load_torchvision_weights(model, state)     # the weights, and eps from the file\n"
               "  detections = model.predict(images)\n"
               "with images prepared as torchvision prepares them: RGB in [0, 1], minus the ImageNet mean\n"
               "(0.485, 0.456, 0.406), divided by its std (0.229, 0.224, 0.225), padded to multiples of 32.")
    p.add_argument("weights", metavar="WEIGHTS.pth", help="torchvision's state dict, as torch.save wrote it")
    p.add_argument("out", metavar="OUT.npz", help="the minidet checkpoint to write (replaced atomically)")
    p.add_argument("--eps", type=float, default=0.0,
                   help="the frozen batch norm eps the weights need, stored in OUT.npz as frozen_bn_eps "
                        "(default: 0.0, right for torchvision's published COCO weights; 1e-5 for "
                        "weights of a model torchvision built with its default FrozenBatchNorm2d eps)")
    p.set_defaults(run=convert)
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
