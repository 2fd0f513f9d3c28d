"""How fast is data-parallel training? Steps per second of the demo's model, one process or several.

What is measured: ``minidet.train.train`` on the demo's model and data (``resnet_small``, 64-channel pyramid,
128 x 128 Shapes images) with a global batch of 16 images: one process with 16, or N workers under ``mpiexec -n N``
with 16 / N each. Then, on the same workers, the all-reduce alone: the gradient's bytes (4 per weight) summed
across the workers, timed on its own. Run from the repository root:

    OPENBLAS_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_data_parallel.py                 # 1 worker x 2
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. mpiexec -n 2 python benchmarks/bench_data_parallel.py    # 2 workers x 1
    PYTHONPATH=. python benchmarks/bench_data_parallel.py --quick                                # a smoke test

Only the first worker prints. Its last line is the median step time in ms. The steps' times come from the run's
own ``metrics.jsonl`` (each step, from reading its images to the optimizer's update, all-reduce included); the
first steps, which find their memory, are left out of the median.
"""

import argparse
import statistics
import tempfile
import time

import numpy as np

from minidet import distributed
from minidet.train import TrainConfig, train

GLOBAL_BATCH = 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 24, or 4 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a few small steps: checks that the script runs")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 4 if args.quick else 24
    return args


def main():
    args = parse_args()
    world = distributed.world()
    if GLOBAL_BATCH % world.size:
        raise SystemExit(f"bench_data_parallel.py: {world.size} workers do not divide the global batch of "
                         f"{GLOBAL_BATCH}")
    size = 64 if args.quick else 128
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(num_images=GLOBAL_BATCH * args.steps, image_size=size, epochs=1,
                             batch_size=GLOBAL_BATCH // world.size, progress=False, auto_anchors=False,
                             out=out)
        run = train(config)
    skip = min(2, len(run.metrics) - 1)
    step_ms = 1000 * statistics.median(row["seconds"] for row in run.metrics[skip:])

    gradients = [np.zeros_like(p.data) for p in run.model.parameters()]
    times = []
    for _ in range(5 if args.quick else 20):
        start = time.perf_counter()
        world.sum_arrays(gradients)
        times.append(time.perf_counter() - start)
    if world.is_root:
        megabytes = sum(g.nbytes for g in gradients) / 1e6
        print(f"{world.size} worker(s), global batch {GLOBAL_BATCH} ({config.batch_size} per worker) of "
              f"{size} x {size}, {len(run.metrics)} steps")
        print(f"all-reduce of the gradients: {megabytes:.2f} MB, median {1000 * statistics.median(times):.2f} ms")
        print(f"median step: {step_ms:.1f} ms ({1000 / step_ms:.2f} steps per second)")


if __name__ == "__main__":
    main()
