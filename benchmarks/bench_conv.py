"""How fast is minidet's conv2d? Forward + backward timed against PyTorch on the CPU.

What is measured: one training step of a single 3x3 convolution layer, i.e.

    y = conv2d(x, w, b, stride, padding)       # forward
    y.backward(g)                              # backward, with a fixed upstream gradient g = dL/dy

which produces the gradients of x, w and b. minidet (NumPy, im2col + one matrix product) and PyTorch (its own
CPU kernels) get the same float32 arrays, run in the same process with the same number of threads, and each
is timed with ``time.perf_counter`` after a few warm-up runs. The table shows the median of the repeats and
the ratio minidet / torch. The goal is a ratio of at most 2: a from-scratch NumPy conv within twice the time
of a production library is fast enough to train the small RetinaNet of the tutorials. The last line printed is
the largest ratio of these layers.

A second table times depthwise convolutions (groups = C = O, one filter per channel, as in EfficientNet's blocks),
which minidet computes tap by tap rather than by im2col. A third table splits minidet's (and torch's) time into
forward only and backward only, to show where the time goes. Before timing, each shape checks that both libraries
compute the same gradients, on the same inputs in float64 (the last column: the largest difference, relative to the
largest value, over the three gradients); above 1e-10 the script stops with exit status 1. (In float32 the two
differ by rounding, about 1e-6 here, which says nothing about whether they compute the same thing.)

Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_conv.py               # all cores, 10 repeats
    PYTHONPATH=. python benchmarks/bench_conv.py --threads 1   # single-threaded, both libraries
    PYTHONPATH=. python benchmarks/bench_conv.py --quick       # tiny shapes, a smoke test of the script

Without PyTorch installed, only minidet's timings are printed.
"""

import argparse
import os
import statistics
import sys
import time

from threads import set_blas_threads, thread_report  # benchmarks/threads.py


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per measurement, the median is reported (default: 10, or 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both libraries (default: $OPENBLAS_NUM_THREADS if set, else all cores)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 2 repeats, to check the script runs")
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 2 if args.quick else 10
    return args


ARGS = parse_args()
THREADS = ARGS.threads or int(os.environ.get("OPENBLAS_NUM_THREADS") or len(os.sched_getaffinity(0)))

# NumPy's matrix products run in OpenBLAS, which reads its thread count from these environment variables
# once, when NumPy is first imported. So they are set here, before the imports below; setting them later has
# no effect. (PyTorch is told directly, with torch.set_num_threads.)
set_blas_threads(THREADS)

import numpy as np  # noqa: E402  (imported after the thread settings on purpose)

import minidet  # noqa: E402
import minidet.functional as F  # noqa: E402

try:
    import torch
except ImportError:
    torch = None


# (name, x shape (N, C, H, W), output channels O, kernel size, stride, padding, groups)
SHAPES = [
    ("backbone 3x3, 64->64", (4, 64, 64, 64), 64, 3, 1, 1, 1),
    ("head 3x3, 256->256", (2, 256, 32, 32), 256, 3, 1, 1, 1),
    ("stride 2, 64->128", (4, 64, 64, 64), 128, 3, 2, 1, 1),
]
QUICK_SHAPES = [
    ("tiny 3x3, 8->8", (2, 8, 16, 16), 8, 3, 1, 1, 1),
    ("tiny stride 2, 8->16", (2, 8, 16, 16), 16, 3, 2, 1, 1),
]
# Depthwise convolutions (groups = C = O), as in EfficientNet's blocks: a separate table, not in the last line's
# ratio (which is about the dense 3x3 layers that most of a ResNet's or a pyramid's time goes to).
DEPTHWISE_SHAPES = [
    ("depthwise 3x3 s2, 96", (16, 96, 64, 64), 96, 3, 2, 1, 96),
    ("depthwise 5x5, 240", (16, 240, 16, 16), 240, 5, 1, 2, 240),
]
QUICK_DEPTHWISE_SHAPES = [("tiny depthwise 3x3, 8", (2, 8, 16, 16), 8, 3, 1, 1, 8)]


AGREEMENT_FLOAT64 = 1e-10    # the same sums in float64, in another order: about 1e-15 apart


def make_inputs(x_shape, out_channels, kernel, stride, padding, groups, seed=0):
    """Random float32 x (N, C, H, W), w (O, C/G, K, K), b (O,) and upstream gradient g (N, O, OH, OW)."""
    rng = np.random.default_rng(seed)
    n, c, h, w = x_shape
    oh = (h + 2 * padding - kernel) // stride + 1
    ow = (w + 2 * padding - kernel) // stride + 1
    x = rng.standard_normal(x_shape, dtype=np.float32)
    weight = rng.standard_normal((out_channels, c // groups, kernel, kernel), dtype=np.float32)
    weight /= (c // groups * kernel**2) ** 0.5
    bias = rng.standard_normal(out_channels, dtype=np.float32)
    g = rng.standard_normal((n, out_channels, oh, ow), dtype=np.float32)
    return x, weight, bias, g


# ---- one layer, forward and backward, in each library ----------------------------------------------------
# Every run makes fresh leaf tensors, so gradients never accumulate from one run into the next.

def minidet_forward(x, weight, bias, stride, padding, groups):
    leaves = [minidet.Tensor(a, requires_grad=True) for a in (x, weight, bias)]
    return leaves, F.conv2d(*leaves, stride=stride, padding=padding, groups=groups)


def torch_forward(x, weight, bias, stride, padding, groups):
    leaves = [torch.from_numpy(a).requires_grad_() for a in (x, weight, bias)]  # shares the NumPy memory
    return leaves, torch.nn.functional.conv2d(*leaves, stride=stride, padding=padding, groups=groups)


def minidet_step(x, weight, bias, g, stride, padding, groups):
    """Forward + backward; returns the gradients of x, w, b as NumPy arrays."""
    leaves, y = minidet_forward(x, weight, bias, stride, padding, groups)
    y.backward(g)
    return [t.grad for t in leaves]


def torch_step(x, weight, bias, g, stride, padding, groups):
    leaves, y = torch_forward(x, weight, bias, stride, padding, groups)
    y.backward(torch.from_numpy(g))
    return [t.grad.numpy() for t in leaves]


# ---- timing ----------------------------------------------------------------------------------------------

def median_ms(run, prepare=None):
    """Median time of ``run(state)`` in milliseconds, ``state = prepare()`` made fresh and untimed each run."""
    # After a matrix product, OpenBLAS's and PyTorch's worker threads keep spinning for a moment, waiting for more
    # work. On a 2-core machine they would steal a core from whatever is timed next, so let them fall asleep first.
    time.sleep(0.3)
    times = []
    for i in range(ARGS.warmup + ARGS.repeat):
        state = prepare() if prepare is not None else None
        start = time.perf_counter()
        run(state)
        elapsed = time.perf_counter() - start
        if i >= ARGS.warmup:
            times.append(elapsed)
    return 1000 * statistics.median(times)


def time_library(forward, step, inputs, conv, as_upstream):
    """Median ms of forward + backward, forward only and backward only, for one library; ``conv`` is (stride,
    padding, groups)."""
    x, weight, bias, g = inputs
    upstream = as_upstream(g)
    both = median_ms(lambda _: step(x, weight, bias, g, *conv))
    # Forward only still records the graph, as in training (minidet keeps its im2col columns for backward).
    forward_only = median_ms(lambda _: forward(x, weight, bias, *conv))
    # Backward only: the forward pass runs untimed in prepare(), then only y.backward(g) is timed.
    backward_only = median_ms(lambda state: state[1].backward(upstream),
                              prepare=lambda: forward(x, weight, bias, *conv))
    return both, forward_only, backward_only


def max_relative_error(ours, reference):
    return max(float(np.abs(a - r).max() / np.abs(r).max()) for a, r in zip(ours, reference))


def describe(x_shape, out_channels, kernel, stride, groups):
    n, c, h, w = x_shape
    return f"x {n}x{c}x{h}x{w}, w {out_channels}x{c // groups}x{kernel}x{kernel}, s{stride}"


def measure(shapes):
    """(name, shapes, minidet's times, torch's times or None, float64 difference or None) of each layer."""
    rows = []
    for name, x_shape, out_channels, kernel, stride, padding, groups in shapes:
        conv = (stride, padding, groups)
        inputs = make_inputs(x_shape, out_channels, kernel, stride, padding, groups)
        theirs = error = None
        if torch is not None:  # first make sure both compute the same thing, in float64
            inputs64 = [a.astype(np.float64) for a in inputs]
            error = max_relative_error(minidet_step(*inputs64, *conv), torch_step(*inputs64, *conv))
            if error > AGREEMENT_FLOAT64:
                sys.exit(f"bench_conv.py: {name}: minidet and torch disagree in float64 (largest relative difference "
                         f"of the gradients {error:.1e} > {AGREEMENT_FLOAT64:g})")
        ours = time_library(minidet_forward, minidet_step, inputs, conv, as_upstream=lambda g: g)
        if torch is not None:
            theirs = time_library(torch_forward, torch_step, inputs, conv, as_upstream=torch.from_numpy)
        rows.append((name, describe(x_shape, out_channels, kernel, stride, groups), ours, theirs, error))
    return rows


def print_steps(title, rows, goal):
    """The forward + backward table; ``goal``: with the column that says whether the ratio is at most 2."""
    print(title)
    print(f"{'layer':<22} {'shapes':<34} {'minidet':>8} {'torch':>8} {'ratio':>6}  {'goal <= 2x' if goal else '':<10} "
          f"{'float64 diff':>12}")
    for name, shapes, ours, theirs, error in rows:
        if theirs is None:
            print(f"{name:<22} {shapes:<34} {ours[0]:8.2f} {'-':>8} {'-':>6}")
            continue
        ratio = ours[0] / theirs[0]
        print(f"{name:<22} {shapes:<34} {ours[0]:8.2f} {theirs[0]:8.2f} {ratio:6.2f}  "
              f"{('ok' if ratio <= 2 else 'SLOWER') if goal else '':<10} {error:12.1e}")


def main():
    if torch is None:
        print("PyTorch is not installed: timing minidet only (pip install torch for the comparison).")
    else:
        torch.set_num_threads(THREADS)
    print(f"numpy {np.__version__}, minidet {minidet.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else ""))
    print(thread_report(THREADS, torch))
    print(f"median of {ARGS.repeat} runs after {ARGS.warmup} warm-up runs, times in ms\n")

    rows = measure(QUICK_SHAPES if ARGS.quick else SHAPES)
    depthwise_rows = measure(QUICK_DEPTHWISE_SHAPES if ARGS.quick else DEPTHWISE_SHAPES)

    print_steps("forward + backward (grads of x, w, b)", rows, goal=True)
    print_steps("\ndepthwise convolutions (groups = C, EfficientNet's), forward + backward", depthwise_rows, goal=False)
    print("\nwhere the time goes: forward only and backward only (their sum can differ from the step above, as\n"
          "fresh memory for the large temporary arrays is found, and paid for, differently)")
    header = f"{'layer':<22} {'minidet fwd':>11} {'bwd':>7} {'bwd share':>9}"
    if torch is not None:
        header += f"   {'torch fwd':>9} {'bwd':>7} {'fwd ratio':>9} {'bwd ratio':>9}"
    print(header)
    for name, _, ours, theirs, _ in rows + depthwise_rows:
        line = f"{name:<22} {ours[1]:11.2f} {ours[2]:7.2f} {ours[2] / (ours[1] + ours[2]):9.0%}"
        if theirs is not None:
            line += f"   {theirs[1]:9.2f} {theirs[2]:7.2f} {ours[1] / theirs[1]:9.2f} {ours[2] / theirs[2]:9.2f}"
        print(line)
    if torch is not None:   # the dense layers only
        worst = max(rows, key=lambda row: row[2][0] / row[3][0])
        print(f"ratio minidet / torch: {worst[2][0] / worst[3][0]:.2f} (the slowest layer, {worst[0]})")


if __name__ == "__main__":
    main()
