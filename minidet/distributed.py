"""Data-parallel training: several processes train one model together, as the paper trained on 8 GPUs.

Run ``mpiexec -n N minidet train ...`` (or any script that calls ``minidet.train.train``): N processes start, each
holds the whole model, and each step every process (a *worker*, numbered by its *rank*, 0 to N - 1) takes its own
``batch_size`` images of a global batch of N * ``batch_size``, computes its loss and its gradients, and then the N
gradients are added together (an *all-reduce*: afterwards every worker holds the same sum). Every worker then takes
the same optimizer step from the same weights with the same gradient, so the weights stay identical on all of them,
without ever being sent.

Why that equals one process with the whole global batch: the loss is a sum over images (and anchors) divided by a
normaliser, and the gradient of a sum is the sum of the gradients. Each worker divides its part by the *global*
normaliser (``loss_share``: its own, times its own / the global one), so the sum of the workers' gradients is the
gradient of the one big batch's loss, up to the order in which float32 additions round.

What travels: the gradients, 4 bytes per weight each step (and the batch norm statistics, which are averaged each
step so that every worker's copy of the model stays the same), through MPI (``mpi4py``) between CPU processes, or
NCCL (``cupy.cuda.nccl``) between GPUs, where MPI only hands out NCCL's id. Batch norm in the backbone normalises
each worker's images with their own statistics (as PyTorch's DistributedDataParallel does): with trainable batch
norm, N workers are then close to, not equal to, one process; with frozen batch norm (the torchvision preset) and
the group norm of the subnets they are equal.

Without ``mpiexec`` (or with ``-n 1``) ``world()`` is a single process, and training is exactly what it is without
this module.
"""

import os
import sys

import numpy as np

from minidet import backend

# Environment variables through which MPI launchers tell a process how many were started: MPICH and Intel MPI
# (Hydra), Open MPI.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
INSTALL_HINT = "pip install 'minidet[mpi]' (mpi4py and an MPI library) or pip install mpi4py mpich"


class World:
    """The processes training together: ``size`` of them, this one ``rank``. ``World()`` is one process alone."""

    def __init__(self, comm=None, nccl=None):
        self.comm, self.nccl = comm, nccl
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1

    @property
    def is_root(self):
        """Rank 0: the one worker that writes checkpoints, metrics, pictures and reports."""
        return self.rank == 0

    def sum_arrays(self, arrays):
        """Replace each array, in place, by its sum over the workers: one all-reduce of them all, flattened."""
        if self.comm is None or not arrays:           # one process alone: nothing to add
            return
        xp = backend.get_array_module(arrays[0])
        flat = xp.concatenate([a.reshape(-1) for a in arrays])
        if self.nccl is not None:
            backend.nccl_sum(self.nccl, flat)
        else:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        start = 0
        for a in arrays:
            a[...] = flat[start:start + a.size].reshape(a.shape)
            start += a.size

    def sum_numbers(self, *numbers):
        """The sums over the workers of a few Python numbers, as floats (one all-reduce, in float64)."""
        values = np.asarray(numbers, dtype=np.float64)
        if self.size > 1:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, values, op=MPI.SUM)
        return [float(v) for v in values]

    def broadcast(self, value):
        """The first worker's ``value`` (any picklable object), on every worker."""
        return value if self.size == 1 else self.comm.bcast(value, root=0)

    def average_buffers(self, model):
        """Make each floating-point buffer of ``model`` (batch norm's running statistics) the workers' mean."""
        buffers = [b for _, b in model.named_buffers() if b.dtype.kind == "f"]
        self.sum_arrays(buffers)
        for b in buffers:
            b /= self.size

    def abort(self, error):
        """Stop every worker at once, after one line on this one's ``error``. When one worker fails alone (a bad
        image, Ctrl-C), the others wait in an all-reduce it will never join: without this they would hang, and so
        would MPI's shutdown of the failing one."""
        print(f"minidet: worker {self.rank} of {self.size} stopped the run: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
        self.comm.Abort(1)


def launched_size():
    """How many processes the MPI launcher started (1 when not under ``mpiexec``)."""
    for name in LAUNCHER_SIZE_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 1


def launched_rank():
    """This process's rank as the MPI launcher numbered it (0 when not under ``mpiexec``), without starting MPI."""
    for name in LAUNCHER_RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def world(device="cpu"):
    """The ``World`` of this process: a single one, or, under ``mpiexec -n N`` with N > 1, the N workers over MPI
    (on ``device="cuda"``, each on its own GPU, reduced with NCCL).

    Raises ImportError, naming what to install, when the launcher started several processes but mpi4py is missing
    (each would otherwise train alone, N times the same run).
    """
    if launched_size() == 1:
        return World()
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(f"minidet: started by mpiexec as {launched_size()} processes, but mpi4py is not installed, "
                          f"so they cannot train together: {INSTALL_HINT}") from error
    comm = MPI.COMM_WORLD
    if device != "cuda":
        return World(comm)
    backend.use_gpu(comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank())      # this process's rank on its machine
    unique_id = comm.bcast(backend.nccl_unique_id() if comm.Get_rank() == 0 else None, root=0)
    return World(comm, backend.nccl_communicator(comm.Get_size(), unique_id, comm.Get_rank()))


def loss_share(world, normalization, num_images, num_positive):
    """The factor that turns this worker's loss into its part of the global batch's loss.

    RetinaNet divides a batch's loss by a normaliser: the positive anchors of the whole batch (``"batch"``, the
    paper's), or, image by image, the number of images times that image's positives (``"image"``, torchvision's).
    A worker's model divides by its own images' normaliser; multiplying by own / global makes the division by the
    global one, so that the workers' losses (and gradients) add up to the global batch's.
    """
    total_images, total_positive = world.sum_numbers(num_images, num_positive)
    if normalization == "batch":
        return max(1, num_positive) / max(1, total_positive)
    return num_images / total_images
