"""What the CPU benchmarks share: one thread count for NumPy's BLAS and for torch, and a report of it.

NumPy's matrix products run in OpenBLAS, which reads its thread count from environment variables once, when NumPy
is first imported: ``set_blas_threads`` must run before that import. (torch is told with ``torch.set_num_threads``.)
"""

import os


def set_blas_threads(threads):
    """Tell OpenBLAS (and MKL or OpenMP builds) to use ``threads`` threads; call before importing NumPy."""
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)


def thread_report(threads, torch):
    """Two lines: NumPy's BLAS threads (asked of OpenBLAS itself when threadpoolctl is installed) and torch's."""
    try:
        from threadpoolctl import threadpool_info
        counts = {f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info() if p["user_api"] == "blas"}
        blas = f"NumPy BLAS threads (threadpoolctl): {', '.join(sorted(counts))}"
    except ImportError:
        blas = f"NumPy BLAS threads: {threads} (OPENBLAS_NUM_THREADS, set before NumPy was imported)"
    if os.environ.get("OPENBLAS_CORETYPE"):  # e.g. Haswell: AVX2 kernels even on a CPU with AVX-512
        blas += f", OpenBLAS kernels chosen by OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}"
    torch_part = f"torch threads: {torch.get_num_threads()}" if torch is not None else "torch: not installed"
    return f"{blas}\n{torch_part}"
