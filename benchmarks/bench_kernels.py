"""How fast are minidet's CUDA kernels? Focal loss and IoU matching, timed on a GPU against torchvision.

What is measured:

0. The GPU's copy rate: one device-to-device copy of 1 GiB, counting the bytes read and written. It sets the
   memory floor of the focal loss below, measured in the same run on the same GPU.

1. Focal loss, forward + backward, on 8 images x 120,000 anchors x 80 classes (and x 20 classes): one float32
   logit per (anchor, class), labels with about 0.1% positive and 1% ignored anchors, weights 1 / (8 x the image's
   positives) as in torchvision's RetinaNet.
   - ours, kernel: ``minidet.cuda.focal_loss_with_labels``, the one launch that computes the loss and the
     gradient (the backward then has nothing left to do when its upstream gradient is 1). This is what the memory
     floor is about.
   - ours, public op: ``F.sigmoid_focal_loss_with_labels(x, labels, weights)`` then ``loss.backward()`` on a fresh
     leaf ``x``: adds the checks of the labels (two small reductions, read back), the read of the upstream
     gradient, and the autograd engine's copy of the gradient into ``x.grad`` (one more read and write of every
     element; in a model the logits are not a leaf and there is no such copy).
   - torchvision: ``torchvision.ops.sigmoid_focal_loss(x, targets, reduction="none")``, each row summed and
     weighted (0 for ignored anchors), summed, then ``backward()`` on a fresh leaf. The dense one-hot targets are
     made once, untimed (torchvision's RetinaNet builds them every step).
   - the same torchvision loss through ``torch.compile`` (its default backend, Inductor, which fuses the
     element-wise work into generated kernels), if compiling it and its backward takes under a minute.
   The memory floor is the bytes that must move (read each logit, write its gradient: 8 B, plus 8 B of label and
   weight per anchor) divided by the copy rate measured in 0.
   Goals: at least 5x faster than torchvision, no slower than torch.compile, within 1.4x of the floor.

2. IoU matching of 8 images x ~120,000 anchors (those of a 704 x 912 image, torchvision's preset: 120,519) against
   50 boxes each, with low-quality matches: ``minidet.matching.match_anchors_batch`` on CuPy arrays (two kernel
   launches) against ``torchvision.ops.box_iou`` + torchvision's ``Matcher(0.5, 0.4, allow_low_quality_matches=
   True)`` image by image. The matches must be identical. Peak memory: CuPy's allocations, followed with a memory
   hook, and ``torch.cuda.max_memory_allocated``, each above what was allocated before the call.
   Goal: at least 10x faster than torchvision.

Both libraries run in this process on the same arrays (shared through DLPack, no copies), TF32 off. Each
measurement: warm-up runs (the first compiles the kernels), then CUDA events around each run, median of the repeats
in microseconds. Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_kernels.py              # the shapes above
    PYTHONPATH=. python benchmarks/bench_kernels.py --version 1  # only version 1 of each kernel
    PYTHONPATH=. python benchmarks/bench_kernels.py --dry-run    # rehearsal without a GPU (below)

Every version of each kernel (kernels/focal_loss_v1.cu, ..._v2.cu, focal_loss.cu = v3; iou_match_v1.cu,
iou_match.cu = v2) is timed by default, in microseconds and in GB/s of the bytes that must move, so that what each
version changes shows in what it buys.

Needs CuPy and a CUDA GPU (it stops with a message otherwise); torch and torchvision for the comparison.
``--dry-run`` runs every line of the script on any machine, on tiny shapes, with stand-ins where a GPU would be:
CuPy is the stand-in of tests/cupy_on_cpu.py (the kernels run on the CPU launch harness), torch runs on the CPU,
host clocks replace CUDA events, torch.compile uses its ``aot_eager`` backend (no code generation), and no memory
is measured. Its figures mean nothing; it proves the script cannot fail on a GPU for a typo or a missing import.
"""

import argparse
import datetime
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"   # cupy_on_cpu.py, torchvision_cpu.py
ALPHA, GAMMA = 0.25, 2.0
COMPILE_LIMIT_S = 60


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per measurement; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (the first one compiles)")
    parser.add_argument("--no-torch", action="store_true", help="time minidet only")
    parser.add_argument("--version", type=int, default=None,
                        help="time only version N of each kernel (focal loss 1-3, matching 1-2; kernels/*_vN.cu); "
                             "default: every version")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, one run each, on stand-ins for the GPU: checks the script runs anywhere")
    args = parser.parse_args()
    if args.dry_run:
        args.repeat, args.warmup = 1, 0
    return args


ARGS = parse_args()
if ARGS.dry_run:  # CuPy's stand-in, in place before minidet imports cupy
    sys.path.insert(0, str(TESTS))
    import cupy_on_cpu

    cupy_on_cpu.install()

import minidet as md  # noqa: E402  (after the stand-in)
import minidet.functional as F  # noqa: E402
from minidet import backend, cuda  # noqa: E402
from minidet.anchors import AnchorGenerator  # noqa: E402
from minidet.functional.loss import BACKGROUND, IGNORED  # noqa: E402
from minidet.matching import match_anchors_batch  # noqa: E402

# --- timing ------------------------------------------------------------------------------------------------------

def median_us(run, events, repeat, warmup, prepare=None):
    """Median GPU time of ``run(state)`` in microseconds, from CUDA events recorded on the current stream around
    it; ``state = prepare()`` is made fresh and untimed each run. The events also count any time the GPU waits for
    the host in between (a value read back, a launch that comes late), which is part of the cost."""
    times = []
    for i in range(warmup + repeat):
        state = prepare() if prepare is not None else None
        start, end = events()
        start.record()
        run(state)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(elapsed_ms(start, end) * 1000)
    return statistics.median(times)


class HostEvent:
    """A CUDA event's stand-in in a dry run: the host's clock when it is recorded."""

    def record(self):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


def cupy_events():
    if ARGS.dry_run:
        return HostEvent(), HostEvent()
    cupy = backend.cupy
    return cupy.cuda.Event(), cupy.cuda.Event()


def torch_events():
    import torch
    if ARGS.dry_run:
        return HostEvent(), HostEvent()
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def elapsed_ms(start, end):
    if isinstance(start, HostEvent):
        return (end.time - start.time) * 1000
    if hasattr(start, "elapsed_time"):       # torch.cuda.Event
        return start.elapsed_time(end)
    return backend.cupy.cuda.get_elapsed_time(start, end)


def synchronize():
    if not ARGS.dry_run:
        backend.cupy.cuda.Device().synchronize()


class CupyPeakMemory:
    """The peak of the bytes CuPy's memory pool has handed out, above the level when the block started: a memory
    hook sees every allocation and every release. In a dry run nothing is measured (``peak`` is None)."""

    def __init__(self):
        self.hook = None if ARGS.dry_run else self._hook()

    @staticmethod
    def _hook():
        class Hook(backend.cupy.cuda.MemoryHook):
            name = "minidet_peak_memory"

            def __init__(hook):
                hook.in_use = hook.peak = 0

            def malloc_postprocess(hook, **kwargs):
                hook.in_use += kwargs["mem_size"]
                hook.peak = max(hook.peak, hook.in_use)

            def free_postprocess(hook, **kwargs):
                hook.in_use -= kwargs["mem_size"]

        return Hook()

    def __enter__(self):
        if self.hook is not None:
            self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        if self.hook is not None:
            self.hook.__exit__(*exc)

    @property
    def peak(self):
        return None if self.hook is None else self.hook.peak


def torch_peak_memory(run):
    """The peak of torch's GPU allocations while ``run()`` runs, above the level before; None in a dry run."""
    import torch
    if ARGS.dry_run:
        run()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_rate(args):
    """The GPU's copy rate in bytes/s: a device-to-device copy of 1 GiB of float32, bytes read plus written."""
    cupy = backend.cupy
    source = cupy.ones(2**16 if args.dry_run else 2**28, dtype=cupy.float32)
    target = cupy.empty_like(source)
    us = median_us(lambda _: cupy.copyto(target, source), cupy_events, args.repeat, args.warmup)
    rate = 2 * source.nbytes / (us * 1e-6)
    print(f"\ncopy rate: {rate / 1e12:.2f} TB/s (a copy of {source.nbytes / 2**30:.3g} GiB, read + written, "
          f"median {us:.0f} us)")
    return rate


class OverTime(Exception):
    pass


def within(seconds, function):
    """``function()``, stopped by an ``OverTime`` raised from a SIGALRM if it has not returned after ``seconds``."""
    def stop(signum, frame):
        raise OverTime(f"not done after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return function()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- focal loss --------------------------------------------------------------------------------------------------

def focal_inputs(num_images, anchors_per_image, num_classes, seed=0):
    """Logits (A, K) float32 around the prior -4.6 (some at +-100), labels (A,) int32 and weights (A,) float32, drawn
    on the host (the same numbers on any machine) and copied to the GPU."""
    rng = np.random.default_rng(seed)
    num_anchors = num_images * anchors_per_image
    logits = rng.standard_normal((num_anchors, num_classes), dtype=np.float32) * 2 - 4.6
    logits[::997] = 100
    logits[1::991] = -100
    draw = rng.random(num_anchors)
    labels = np.full(num_anchors, BACKGROUND, dtype=np.int32)
    labels[draw < 0.01] = IGNORED
    positive = draw > 0.999
    labels[positive] = rng.integers(0, num_classes, int(positive.sum()), dtype=np.int32)
    positives_per_image = positive.reshape(num_images, anchors_per_image).sum(axis=1)
    weights = np.repeat(1 / (num_images * np.maximum(positives_per_image, 1)), anchors_per_image).astype(np.float32)
    cupy = backend.cupy
    return cupy.asarray(logits), cupy.asarray(labels), cupy.asarray(weights)


def bench_focal(args, num_images, anchors_per_image, num_classes, rate, torch, torchvision):
    cupy = backend.cupy
    logits, labels, weights = focal_inputs(num_images, anchors_per_image, num_classes)
    num_anchors = logits.shape[0]
    moved = num_anchors * num_classes * (4 + 4) + num_anchors * (4 + 4)
    floor_us = moved / rate * 1e6
    shape = f"{num_images} x {anchors_per_image:,} anchors x {num_classes} classes"
    print(f"\nfocal loss, forward + backward, {shape}: {moved / 1e6:.0f} MB to move, floor {floor_us:.0f} us "
          f"at {rate / 1e12:.2f} TB/s")

    rows, versions_us = [], {}
    for version in selected(cuda.FOCAL_LOSS_VERSIONS, args.version):
        versions_us[version] = median_us(
            lambda _, v=version: cuda.focal_loss_with_labels(logits, labels, weights, ALPHA, GAMMA, v),
            cupy_events, args.repeat, args.warmup)
        rows.append((f"minidet kernel v{version} (loss + gradient)", versions_us[version]))
    if cuda.FOCAL_LOSS_VERSION not in versions_us:
        print_rows(rows, floor_us, moved)
        return {"shape": shape, "bytes": moved, "floor_us": floor_us, "versions_us": versions_us}
    kernel_us = versions_us[cuda.FOCAL_LOSS_VERSION]

    def public_op(_):
        x = md.Tensor(logits, requires_grad=True)
        F.sigmoid_focal_loss_with_labels(x, labels, weights, alpha=ALPHA, gamma=GAMMA).backward()
        return x

    op_us = median_us(public_op, cupy_events, args.repeat, args.warmup)
    rows.append(("minidet F.sigmoid_focal_loss_with_labels + backward", op_us))
    result = {"shape": shape, "bytes": moved, "floor_us": floor_us, "kernel_us": kernel_us, "op_us": op_us,
              "versions_us": versions_us}

    if torch is not None:
        x_torch = torch.from_dlpack(logits)
        targets = torch.zeros_like(x_torch)
        labels_torch = torch.from_dlpack(labels).long()
        rows_positive = torch.nonzero(labels_torch >= 0).squeeze(1)
        targets[rows_positive, labels_torch[rows_positive]] = 1
        row_weights = torch.from_dlpack(weights) * (labels_torch != IGNORED)

        def torchvision_loss(x):
            """torchvision's focal loss as its RetinaNet uses it: each anchor's row summed, weighted, all summed."""
            loss = torchvision.ops.sigmoid_focal_loss(x, targets, alpha=ALPHA, gamma=GAMMA, reduction="none")
            return (loss.sum(dim=1) * row_weights).sum()

        def torchvision_step(total):
            x = x_torch.detach().requires_grad_()
            loss = total(x)
            loss.backward()
            return loss, x

        # First, the same numbers: loss and gradient.
        ours_loss, ours_grad = cuda.focal_loss_with_labels(logits, labels, weights, ALPHA, GAMMA)
        their_loss, x = torchvision_step(torchvision_loss)
        their_grad = cupy.from_dlpack(x.grad)
        loss_error = abs(float(ours_loss) - their_loss.item()) / abs(their_loss.item())
        grad_error = float(cupy.abs(ours_grad - their_grad).max() / cupy.abs(their_grad).max())
        print(f"  agreement with torchvision: loss {loss_error:.1e} relative, gradient {grad_error:.1e} "
              "(max difference / max value)")
        torchvision_us = median_us(lambda _: torchvision_step(torchvision_loss), torch_events, args.repeat,
                                   args.warmup)
        rows.append(("torchvision sigmoid_focal_loss + autograd", torchvision_us))
        result.update(torchvision_us=torchvision_us, loss_error=loss_error, grad_error=grad_error)

        compiled = torch.compile(torchvision_loss, backend="aot_eager" if args.dry_run else "inductor")
        start = time.perf_counter()
        try:
            within(COMPILE_LIMIT_S, lambda: torchvision_step(compiled))       # compiles forward and backward
        except Exception as error:                                            # OverTime, maybe wrapped by dynamo
            print(f"  torch.compile: not timed, its first step stopped after {time.perf_counter() - start:.0f} s "
                  f"({type(error).__name__}: {str(error).splitlines()[0][:200]})")
        else:
            print(f"  torch.compile: the first step (compiling forward and backward) took "
                  f"{time.perf_counter() - start:.1f} s")
            compiled_us = median_us(lambda _: torchvision_step(compiled), torch_events, args.repeat, args.warmup)
            rows.append(("torchvision's loss through torch.compile + autograd", compiled_us))
            result["compiled_us"] = compiled_us

    print_rows(rows, floor_us, moved)
    if torch is not None:
        speedup = result["torchvision_us"] / kernel_us
        print(f"  torchvision / minidet kernel: {speedup:.1f}x (goal >= 5x); kernel / floor: "
              f"{kernel_us / floor_us:.2f} (goal <= 1.4); torchvision / public op: "
              f"{result['torchvision_us'] / op_us:.1f}x")
        if "compiled_us" in result:
            print(f"  torch.compile / minidet kernel: {result['compiled_us'] / kernel_us:.2f}x (goal >= 1); "
                  f"torch.compile / public op: {result['compiled_us'] / op_us:.2f}x")
    return result
def selected(versions, version):
    """The kernel versions to time: all of them, or the one asked for (none if this kernel has no such version)."""
    return sorted(versions) if version is None else [v for v in sorted(versions) if v == version]


def print_rows(rows, floor_us, moved):
    """Each row's median time, its rate (the bytes that must move, per second) and its ratio to the floor."""
    print(f"  {'':<52} {'median us':>10} {'GB/s':>8} {'x floor':>8}")
    for name, us in rows:
        print(f"  {name:<52} {us:10.1f} {moved / us / 1e3:8.0f} {us / floor_us:8.2f}")


# --- IoU matching --------------------------------------------------------------------------------------------------

def matching_inputs(num_images, num_boxes, image_size, seed=0):
    """The torchvision preset's anchors for one image size, and ``num_boxes`` plausible boxes per image."""
    cupy = backend.cupy
    height, width = image_size
    strides = (8, 16, 32, 64, 128)
    feature_sizes = [(-(-height // s), -(-width // s)) for s in strides]
    anchors = AnchorGenerator("torchvision")(image_size, feature_sizes)                   # (A, 4) NumPy float32
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(16), np.log(400), (num_images, num_boxes, 1)))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2), (num_images, num_boxes, 1)))
    wh = np.concatenate([sizes * np.sqrt(aspect), sizes / np.sqrt(aspect)], axis=2)
    corner = rng.uniform(0, 1, (num_images, num_boxes, 2)) * (np.array([width, height]) - wh).clip(1)
    boxes = np.concatenate([corner, corner + wh], axis=2).astype(np.float32)              # (B, G, 4)
    counts = np.full(num_images, num_boxes, dtype=np.int32)
    return cupy.asarray(anchors), cupy.asarray(boxes), cupy.asarray(counts)


def bench_matching(args, num_images, num_boxes, image_size, torch, torchvision):
    cupy = backend.cupy
    anchors, boxes, counts = matching_inputs(num_images, num_boxes, image_size)
    shape = f"{num_images} x {anchors.shape[0]:,} anchors x {num_boxes} boxes, low-quality matches"
    print(f"\nIoU matching, {shape}")

    def ours(_=None):
        return match_anchors_batch(anchors, boxes, counts, 0.5, 0.4, allow_low_quality_matches=True)

    matches, _ = ours()
    rows, versions_us = [], {}
    for version in selected(cuda.MATCHING_VERSIONS, args.version):
        same = bool((cuda.match_anchors_batch(anchors, boxes, counts, 0.5, 0.4, True, version)[0] == matches).all())
        versions_us[version] = median_us(
            lambda _, v=version: cuda.match_anchors_batch(anchors, boxes, counts, 0.5, 0.4, True, v), cupy_events,
            args.repeat, args.warmup)
        rows.append((f"minidet kernels v{version} only (same matches: {same})", versions_us[version], None))
    if cuda.MATCHING_VERSION not in versions_us:
        print_matching_rows(rows)
        return {"shape": shape, "versions_us": versions_us}
    synchronize()
    with CupyPeakMemory() as memory:
        ours()
        synchronize()
    ours_us = median_us(ours, cupy_events, args.repeat, args.warmup)
    positives = int((matches >= 0).sum())
    rows.insert(0, ("minidet match_anchors_batch", ours_us, memory.peak))
    result = {"shape": shape, "ours_us": ours_us, "kernels_us": versions_us[cuda.MATCHING_VERSION],
              "versions_us": versions_us, "ours_peak_bytes": memory.peak, "positives": positives}

    if torch is not None:
        from torchvision.models.detection._utils import Matcher

        matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
        anchors_torch, boxes_torch = torch.from_dlpack(anchors), torch.from_dlpack(boxes)

        def torchvision_matching(_=None):
            return torch.stack([matcher(torchvision.ops.box_iou(boxes_torch[b], anchors_torch))
                                for b in range(num_images)])

        theirs = cupy.from_dlpack(torchvision_matching())
        differ = int((theirs != matches).sum())
        print(f"  matches identical to torchvision's: {differ == 0} ({differ} of {matches.size:,} differ; "
              f"{positives:,} positive anchors)")
        torch_peak = torch_peak_memory(torchvision_matching)
        torch_us = median_us(torchvision_matching, torch_events, args.repeat, args.warmup)
        rows.append(("torchvision box_iou + Matcher, per image", torch_us, torch_peak))
        result.update(torchvision_us=torch_us, torchvision_peak_bytes=torch_peak, differing_matches=differ)

    print_matching_rows(rows)
    if torch is not None:
        print(f"  torchvision / minidet: {result['torchvision_us'] / ours_us:.1f}x (goal >= 10x)")
    return result


def print_matching_rows(rows):
    print(f"  {'':<52} {'median us':>10} {'peak memory':>12}")
    for name, us, peak in rows:
        print(f"  {name:<52} {us:10.1f} {'-' if peak is None else f'{peak / 1e6:.1f} MB':>12}")


# --- main ----------------------------------------------------------------------------------------------------------

def commit():
    try:
        root = pathlib.Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def import_torch(args):
    """torch and torchvision, or (None, None) with the reason printed: not wanted, not installed, or no GPU."""
    if args.no_torch:
        return None, None
    try:
        import torch
        sys.path.insert(0, str(TESTS))
        import torchvision_cpu  # torchvision as is; on a CPU-only torch (a dry run), its Python code
        torchvision = torchvision_cpu.import_torchvision()
    except ImportError as error:
        print(f"torch or torchvision is missing ({error}): timing minidet only")
        return None, None
    if not args.dry_run and not torch.cuda.is_available():
        print("torch cannot see the GPU: timing minidet only")
        return None, None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch, torchvision


def describe_device():
    cupy = backend.cupy
    if ARGS.dry_run:
        return "CuPy's CPU stand-in (dry run: kernels on the CPU launch harness, host clocks; no figure means anything)"
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return (f"{device['name'].decode()}, {device['totalGlobalMem'] / 2**30:.0f} GiB; CUDA runtime "
            f"{cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}")


def main():
    args = ARGS
    if not backend.cuda_available():
        sys.exit("bench_kernels.py needs CuPy and a CUDA GPU, and found none usable here "
                 f"(CuPy {'installed' if backend.cupy is not None else 'not installed'}); nothing was timed. "
                 "--dry-run rehearses the script without one.")
    torch, torchvision = import_torch(args)
    print(f"device: {describe_device()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, cupy {backend.cupy.__version__}"
          + (f", torch {torch.__version__}, torchvision {torchvision.__version__}" if torch is not None else ""))
    print(f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit()}; "
          f"median of {args.repeat} runs after {args.warmup} warm-up runs; TF32 off")

    rate = copy_rate(args)
    if args.dry_run:
        bench_focal(args, 1, 300, 8, rate, torch, torchvision)
        bench_matching(args, 2, 5, (64, 96), torch, torchvision)
        return
    bench_matching(args, 8, 50, (704, 912), torch, torchvision)     # first: torch.compile below may take minutes
    for num_classes in (80, 20):
        bench_focal(args, 8, 120_000, num_classes, rate, torch, torchvision)


if __name__ == "__main__":
    main()
