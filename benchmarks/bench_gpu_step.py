"""How fast does minidet train on a GPU? Training steps on CuPy, against torchvision on the same GPU and against
minidet on the CPU.

What is measured:

1. RetinaNet-ResNet-50-FPN, 8 images of 512 x 512, float32: one training step (forward, losses, backward, SGD with
   momentum 0.9 and weight decay 1e-4) in minidet on CuPy and in torchvision on the same GPU, from the same
   weights. torchvision's side is its ``RetinaNet`` class around a ResNet-50 in ``FrozenBatchNorm2d`` (eps 1e-5)
   with every layer trainable, P6 from P5: what minidet's ``RetinaNet(91, backbone="resnet50",
   preset="torchvision")`` computes. Its weights (torchvision's initialisation, seed 0) are copied into minidet
   by ``load_torchvision_weights``. torchvision gets the images in [0, 1] and normalises them itself (its
   transform, which keeps a 512 x 512 image at scale 1 with min_size = max_size = 512); minidet gets them
   normalised. Before anything is timed, the two libraries' first-step losses must agree within 1e-3 (relative),
   or the script stops with exit status 1.
   Goal: minidet's step within 3x of torchvision's.

2. The demo's small model (benchmarks/demo_step.py: resnet_small, 64 pyramid channels, the paper preset, SGD) on
   16 images of 128 x 128: minidet on CuPy against minidet on this machine's CPU (NumPy, every core).
   Goal: the step at least 10x faster on the GPU.

Timing: the wall clock around each step, which ends by reading its losses back (so the GPU has finished it); the
median of the repeats, after warm-up steps (the first ones compile CuPy's kernels). TF32 is off on both sides:
torch is told so, and CuPy uses it only when the environment sets CUPY_TF32=1 (printed).

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_gpu_step.py
    PYTHONPATH=. python benchmarks/bench_gpu_step.py --dry-run     # rehearsal without a GPU (below)

Needs CuPy and a CUDA GPU; torch and torchvision for part 1. ``--dry-run`` runs every line of the script on any
machine, on tiny batches (2 images of 64 x 64), one step each: CuPy is the stand-in of tests/cupy_on_cpu.py
(NumPy underneath, the kernels on the CPU launch harness) and torch runs on the CPU. Its figures mean nothing.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"   # cupy_on_cpu.py, torchvision_cpu.py
NUM_CLASSES = 91               # COCO's, as torchvision numbers them
LOSS_RTOL = 1e-3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per measurement; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles kernels)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny batches, one step each, on stand-ins for the GPU: checks the script runs anywhere")
    args = parser.parse_args()
    if args.dry_run:
        args.repeat, args.warmup = 1, 0
    return args


ARGS = parse_args()
if ARGS.dry_run:  # CuPy's stand-in, in place before minidet imports cupy
    sys.path.insert(0, str(TESTS))
    import cupy_on_cpu

    cupy_on_cpu.install()

import numpy as np  # noqa: E402
from demo_step import IMAGE_SIZE, NUM_IMAGES, demo_setup, training_step  # noqa: E402  (benchmarks/demo_step.py)

import minidet  # noqa: E402
from minidet import backend, optim  # noqa: E402
from minidet.data.transforms import normalize  # noqa: E402
from minidet.models.retinanet import RetinaNet  # noqa: E402
from minidet.models.torchvision_weights import RENAMES, load_torchvision_weights  # noqa: E402


def median_step_ms(step, repeat, warmup):
    """Median wall-clock time of ``step()`` in milliseconds (it must end with the GPU's work done)."""
    times = []
    for i in range(warmup + repeat):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# --- 1. RetinaNet-ResNet-50-FPN against torchvision --------------------------------------------------------------

def r50_batch(num_images, size, seed=0):
    """Images in [0, 1] (N, 3, size, size) float32 and targets with 1 to 20 boxes each (labels 0..90)."""
    rng = np.random.default_rng(seed)
    images = rng.random((num_images, 3, size, size), dtype=np.float32)
    targets = []
    for _ in range(num_images):
        count = int(rng.integers(1, 21))
        wh = rng.uniform(0.05, 0.5, (count, 2)) * size
        corner = rng.uniform(0, 1, (count, 2)) * (size - wh)
        targets.append({"boxes": np.concatenate([corner, corner + wh], axis=1).astype(np.float32),
                        "labels": rng.integers(0, NUM_CLASSES, count)})
    return images, targets


def torchvision_r50(torch, size):
    """torchvision's RetinaNet-ResNet-50-FPN (v1) with frozen batch norm and every layer trainable."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.retinanet import RetinaNet as TorchvisionRetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return TorchvisionRetinaNet(backbone, NUM_CLASSES, min_size=size, max_size=size)


def calibrate(model, images, torch):
    """Weights whose losses depend on the images and on the whole network, as a trained model's do (in place).

    torchvision's initialisation leaves every frozen batch norm the identity, so ResNet-50's activations grow
    block after block (the first loss is in the thousands and the next steps overflow), and gives the subnets'
    towers N(0, 0.01) weights, so their outputs hardly depend on their input. Here each frozen batch norm gets the
    mean of its own input on ``images`` and its variance plus the mean of those variances (so that a channel that
    hardly varies is not scaled up to amplify rounding), set in order by a hook, each layer seeing the calibrated
    ones before it; and the towers get He-initialised weights."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    def set_statistics(norm, inputs):
        norm.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        variance = inputs[0].var(dim=(0, 2, 3))
        norm.running_var.copy_(variance + variance.mean())

    hooks = [m.register_forward_pre_hook(set_statistics) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model.backbone.body(model.transform(images)[0].tensors)
        for head in (model.head.classification_head, model.head.regression_head):
            for block in head.conv:
                block[0].weight.normal_(0, (2 / (9 * 256)) ** 0.5)
    for hook in hooks:
        hook.remove()


def bench_r50(args, device, torch, torch_device):
    num_images, size = (2, 64) if args.dry_run else (8, 512)
    images, targets = r50_batch(num_images, size)
    print(f"\nRetinaNet-ResNet-50-FPN, {num_images} images of {size} x {size}, "
          f"{sum(len(t['boxes']) for t in targets)} boxes, {NUM_CLASSES} classes; SGD lr 0.01, momentum 0.9, "
          "weight decay 1e-4")

    their_images = list(torch.from_numpy(images).to(torch_device))
    theirs = torchvision_r50(torch, size).to(torch_device)
    calibrate(theirs, their_images, torch)
    theirs.train()
    state = {name: value.detach().cpu().numpy() for name, value in theirs.state_dict().items()}
    ours = load_torchvision_weights(RetinaNet(NUM_CLASSES, backbone="resnet50", preset="torchvision"), state,
                                    eps=1e-5).to(device).train()
    print(f"parameters: minidet {sum(p.size for p in ours.parameters()):,}, torchvision "
          f"{sum(p.numel() for p in theirs.parameters() if p.requires_grad):,}")
    our_optimizer = optim.SGD(ours.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    their_optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                      weight_decay=1e-4)
    our_images = backend.to_device(np.stack([normalize(image) for image in images]), device)
    their_targets = [{"boxes": torch.from_numpy(t["boxes"]).to(torch_device),
                      "labels": torch.from_numpy(t["labels"]).to(torch_device)} for t in targets]

    def our_step():
        return training_step(ours, our_optimizer, our_images, targets)

    def their_step():
        losses = theirs(their_images, their_targets)
        loss = losses["classification"] + losses["bbox_regression"]
        their_optimizer.zero_grad()
        loss.backward()
        their_optimizer.step()
        return losses["classification"].item(), losses["bbox_regression"].item()

    our_losses, their_losses = our_step(), their_step()
    errors = [abs(a - b) / abs(b) for a, b in zip(our_losses, their_losses)]
    print(f"first step's losses (classification, box regression): minidet {our_losses[0]:.6f}, {our_losses[1]:.6f}; "
          f"torchvision {their_losses[0]:.6f}, {their_losses[1]:.6f}; relative differences "
          f"{errors[0]:.1e}, {errors[1]:.1e}")
    if max(errors) > LOSS_RTOL:
        sys.exit(f"the losses differ by more than {LOSS_RTOL:g}: the two steps are not the same computation, so "
                 "their times are not compared")
    worst, name = gradient_difference(ours, theirs)
    print(f"first step's gradients: largest relative difference {worst:.1e} ({name}; for information: float32 "
          "sums in different orders)")

    our_ms = median_step_ms(our_step, args.repeat, args.warmup)
    their_ms = median_step_ms(their_step, args.repeat, args.warmup)
    print(f"  minidet on CuPy        {our_ms:10.1f} ms a step")
    print(f"  torchvision            {their_ms:10.1f} ms a step")
    print(f"  minidet / torchvision: {our_ms / their_ms:.2f} (goal <= 3)")


def gradient_difference(ours, theirs):
    """The largest difference between the two libraries' gradients of a parameter, relative to the largest value of
    torchvision's gradient of it or to a millionth of the model's largest gradient, whichever is more (as
    bench_train_step.py measures it); and that parameter's name (torchvision's names turned into minidet's by the
    converter's prefix rules, ``RENAMES``)."""
    our_gradients = {name: backend.to_numpy(p.grad) for name, p in ours.named_parameters()}
    their_gradients = {}
    for their_name, parameter in theirs.named_parameters():
        old, new = next((old, new) for old, new in RENAMES if their_name.startswith(old))
        their_gradients[new + their_name[len(old):]] = parameter.grad.detach().cpu().numpy()
    largest = max(float(np.abs(g).max()) for g in their_gradients.values())
    return max((float(np.abs(our_gradients[name] - g).max()) / max(float(np.abs(g).max()), 1e-6 * largest), name)
               for name, g in their_gradients.items())


# --- 2. the demo's small model, GPU against CPU --------------------------------------------------------------------

def bench_demo_model(args, device):
    num_images, size = (2, 64) if args.dry_run else (NUM_IMAGES, IMAGE_SIZE)
    print(f"\nthe demo's model (benchmarks/demo_step.py), {num_images} images of {size} x {size}: GPU against CPU "
          f"({os.cpu_count()} cores)")
    times = {}
    for where in (device, "cpu"):
        setup = demo_setup(where, num_images, size)
        times[where] = median_step_ms(lambda: training_step(*setup), args.repeat, args.warmup)  # noqa: B023
        print(f"  minidet on {'CuPy' if where == device else 'NumPy'}{'':<11} {times[where]:10.1f} ms a step")
    print(f"  CPU / GPU: {times['cpu'] / times[device]:.1f}x (goal >= 10x)")


def import_torch(dry_run):
    """torch and its device ("cuda", or "cpu" in a dry run), with torchvision importable; (None, None) without."""
    try:
        import torch
        sys.path.insert(0, str(TESTS))
        import torchvision_cpu  # torchvision as is; on a CPU-only torch (a dry run), its Python code
        torchvision_cpu.import_torchvision()
    except ImportError as error:
        print(f"torch or torchvision is missing ({error}): no comparison with torchvision")
        return None, None
    if not dry_run and not torch.cuda.is_available():
        print("torch cannot see the GPU: no comparison with torchvision")
        return None, None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch, "cpu" if dry_run else "cuda"


def main():
    if not backend.cuda_available():
        sys.exit("bench_gpu_step.py needs CuPy and a CUDA GPU, and found none usable here; nothing was timed. "
                 "--dry-run rehearses the script without one.")
    torch, torch_device = import_torch(ARGS.dry_run)
    print(f"minidet {minidet.__version__}, numpy {np.__version__}, cupy {backend.cupy.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else "")
          + f"; CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')}; median of {ARGS.repeat} steps after "
          f"{ARGS.warmup} warm-up steps" + (" (dry run: CuPy's CPU stand-in, no figure means anything)"
                                             if ARGS.dry_run else ""))
    if torch is not None:
        bench_r50(ARGS, "cuda", torch, torch_device)
    bench_demo_model(ARGS, "cuda")


if __name__ == "__main__":
    main()
