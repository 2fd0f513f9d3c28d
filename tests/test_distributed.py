"""Data-parallel training (minidet/distributed.py): two workers under ``mpiexec -n 2`` end with the same weights,
equal to one process training on the same global batches; a killed two-worker run resumes exactly; the loss shares
that make this so; and the clear errors (mpi4py missing, another number of workers on resume)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_config import tiny_data_parallel_config

from minidet import distributed
from minidet.train import build_model, train

HERE = Path(__file__).resolve().parent
MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpiexec and mpi4py: pip install mpi4py mpich")
# One process with a global batch of 8 against 2 workers of 4: the same sums in float32, added in another order
# (each worker's share, then the all-reduce). Over the 4 SGD steps here the weights agree to about 1e-7 of their
# size; 1e-5 leaves room for rounding while any real difference (a wrong share, a lost image) is far larger.
RTOL, ATOL = 1e-5, 1e-7


def run_workers(out, batch_size, preset, *flags, workers=2):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH"))
                                                      if p))
    return subprocess.run([MPIEXEC, "-n", str(workers), sys.executable, str(HERE / "distributed_worker.py"),
                           str(out), str(batch_size), preset, *flags],
                          env=env, capture_output=True, text=True, timeout=300)


def weights_of(path):
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


@needs_mpi
@pytest.mark.parametrize("preset", ["paper", "torchvision"])   # their losses divide by the positives differently
def test_two_workers_keep_identical_weights_equal_to_one_process_with_their_global_batch(tmp_path, preset):
    result = run_workers(tmp_path / "two", 4, preset)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = weights_of(tmp_path / "two" / "rank0.npz"), weights_of(tmp_path / "two" / "rank1.npz")
    assert all(np.array_equal(rank0[name], rank1[name]) for name in rank0), "the workers' weights differ"

    result = train(tiny_data_parallel_config(tmp_path / "one", 8, preset))
    one = result.model.state_dict()
    for name, value in one.items():
        np.testing.assert_allclose(rank0[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    start = build_model(result.config).state_dict()
    assert max(float(np.abs(one[name] - start[name]).max()) for name in one) > 1e-3   # training moved them


@needs_mpi
def test_a_killed_two_worker_run_resumes_exactly_and_refuses_another_number_of_workers(tmp_path):
    uninterrupted = run_workers(tmp_path / "whole", 4, "paper")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    killed = run_workers(tmp_path / "run", 4, "paper", "--stop-after", "7")       # worker 0, in the second epoch
    assert killed.returncode != 0
    assert (tmp_path / "run" / "last.npz").exists()
    with pytest.raises(ValueError, match=r"trained on 2 worker\(s\), now there are 1.*mpiexec -n 2"):
        train(tiny_data_parallel_config(tmp_path / "run", 4), resume=True)
    resumed = run_workers(tmp_path / "run", 4, "paper", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, again = weights_of(tmp_path / "whole" / "rank0.npz"), weights_of(tmp_path / "run" / "rank1.npz")
    assert all(np.array_equal(whole[name], again[name]) for name in whole), "the resumed run differs"


class FakeWorld:
    """Two workers' sums, as the all-reduce would give them."""

    size = 2

    def __init__(self, others):
        self.others = others

    def sum_numbers(self, *numbers):
        return [a + b for a, b in zip(numbers, self.others)]


def test_loss_shares_divide_each_workers_part_by_the_global_normaliser():
    # "batch": the positives of the whole batch. Worker with 30 of 40 positives: its loss (divided by 30) times 30/40.
    assert distributed.loss_share(FakeWorld([4, 10]), "batch", 4, 30) == pytest.approx(30 / 40)
    assert distributed.loss_share(FakeWorld([4, 40]), "batch", 4, 0) == pytest.approx(1 / 40)   # divided by 1
    assert distributed.loss_share(FakeWorld([0, 0]), "batch", 4, 0) == 1.0                      # no positives
    # "image": each image by N x its positives; a worker of 4 of 12 images divides by 4, the batch by 12.
    assert distributed.loss_share(FakeWorld([8, 99]), "image", 4, 5) == pytest.approx(4 / 12)


def test_without_mpiexec_there_is_one_worker_and_under_it_mpi4py_is_required(monkeypatch):
    for name in distributed.LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    alone = distributed.world()
    assert (alone.rank, alone.size, alone.is_root) == (0, 1, True)
    arrays = [np.ones(3)]
    alone.sum_arrays(arrays)
    assert arrays[0].tolist() == [1, 1, 1] and alone.sum_numbers(2, 3) == [2.0, 3.0]

    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)          # as if it were not installed
    with pytest.raises(ImportError, match="started by mpiexec as 2 processes, but mpi4py is not installed.*pip"):
        distributed.world()


def test_the_cli_says_in_one_line_that_mpi4py_is_missing(monkeypatch, tmp_path, capsys):
    from minidet.cli import main

    for name in distributed.LAUNCHER_SIZE_VARIABLES + distributed.LAUNCHER_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert main(["train", "--num-images", "2", "--image-size", "64", "--out", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("minidet train: minidet: started by mpiexec as 2 processes") and "\n" not in error


@needs_mpi
def test_mpiexec_minidet_train_trains_once_and_only_the_first_worker_writes_and_speaks(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH"))
                                                      if p))
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "minidet.cli", "train", "--num-images", "8",
                             "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--fpn-channels", "32",
                             "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained 2 steps") == 1          # 8 images, 2 workers of 2: 2 steps of 4
    assert (tmp_path / "run" / "last.npz").exists() and (tmp_path / "run" / "loss.png").exists()


@needs_mpi
def test_the_data_parallel_benchmark_runs_on_two_workers():
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OPENBLAS_NUM_THREADS="1")
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(HERE.parent / "benchmarks" /
                                                                     "bench_data_parallel.py"), "--quick"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("2 worker(s), global batch 16 (8 per worker)") and len(lines) == 3
    assert "all-reduce of the gradients: 3.53 MB" in lines[1] and lines[-1].startswith("median step: ")


class OneProcess:
    """An MPI communicator of one process, as far as World asks: its rank and size."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1


@pytest.mark.gpu
def test_the_nccl_all_reduce_runs_on_a_gpu():
    # One GPU: a communicator of one rank (NCCL refuses two ranks on one GPU), which checks the call itself, its
    # buffer, dtype and stream, and that the result lands back in the arrays. Two GPUs are needed for a real sum.
    from minidet import backend

    if os.environ.get("MINIDET_TEST_CUPY") == "cpu-harness" or not backend.cuda_available():
        pytest.skip("needs CuPy with a real CUDA GPU (NCCL)")
    nccl = pytest.importorskip("cupy.cuda.nccl", reason="CuPy without NCCL")
    if not getattr(nccl, "available", True):
        pytest.skip("CuPy finds no NCCL library (pip install nvidia-nccl-cu12 or -cu13)")
    cp = backend.cupy
    world = distributed.World(OneProcess(), backend.nccl_communicator(1, backend.nccl_unique_id(), 0))
    arrays = [cp.arange(6, dtype=cp.float32).reshape(2, 3), cp.full(4, 0.5, dtype=cp.float32)]
    expected = [cp.asnumpy(a).copy() for a in arrays]
    world.sum_arrays(arrays)
    for got, want in zip(arrays, expected):
        np.testing.assert_array_equal(cp.asnumpy(got), want)
