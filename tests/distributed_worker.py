"""One worker of the data-parallel tests (tests/test_distributed.py), started N times by ``mpiexec -n N``.

    python tests/distributed_worker.py OUT BATCH_SIZE PRESET [--resume] [--stop-after READS]

trains the tests' tiny config in OUT with BATCH_SIZE images per worker and writes this worker's final weights to
OUT/rank<R>.npz. ``--stop-after`` makes worker 0 raise KeyboardInterrupt at its READS-th image read, as if the run
were killed there.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_config import tiny_data_parallel_config  # noqa: E402

from minidet import distributed  # noqa: E402
from minidet.data import Shapes  # noqa: E402
from minidet.train import train  # noqa: E402


class StopAfter:
    """The dataset, raising KeyboardInterrupt at its ``reads``-th read."""

    def __init__(self, dataset, reads):
        self.dataset, self.reads, self.count, self.classes = dataset, reads, 0, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.count += 1
        if self.count >= self.reads:
            raise KeyboardInterrupt("killed")
        return self.dataset[index]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("preset")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int)
    args = parser.parse_args()
    config = tiny_data_parallel_config(args.out, args.batch_size, args.preset)
    dataset = Shapes(config.num_images, image_size=config.image_size, seed=config.data_seed)
    world = distributed.world()
    if args.stop_after and world.is_root:
        dataset = StopAfter(dataset, args.stop_after)
    result = train(config, dataset, resume=args.resume)
    np.savez(Path(args.out) / f"rank{world.rank}.npz", **result.model.state_dict())


if __name__ == "__main__":
    main()
