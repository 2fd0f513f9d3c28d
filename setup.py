from setuptools import find_packages, setup

setup(
    name="minidet",
    version="0.1.0",
    description="RetinaNet written from scratch in Python (NumPy, optional CuPy), for learning how a detector works",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The CUDA sources live in the top-level kernels/ folder (next to minidet/, where a learner finds them); they are
    # installed as the package minidet.kernels, where minidet/cuda.py looks for them.
    packages=find_packages(include=["minidet", "minidet.*"]) + ["minidet.kernels"],
    package_dir={"minidet.kernels": "kernels"},
    package_data={"minidet.kernels": ["*.cu", "*.cuh", "*.h"]},
    install_requires=["numpy>=2.0", "matplotlib>=3.8", "tqdm>=4.60", "pycocotools>=2.0.8"],
    extras_require={
        "cuda12": ["cupy-cuda12x[ctk]>=13"],
        "gpu": ["cupy-cuda12x[ctk]>=13"],
        "cuda13": ["cupy-cuda13x[ctk]>=13"],
        "test": ["pytest>=8", "hypothesis>=6.100"],
        # Data-parallel training under mpiexec: the Python bindings and an MPI library (MPICH) as wheels.
        "mpi": ["mpi4py>=4", "mpich"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "jupytext>=1.16"],
        # The tutorials as notebooks: jupytext converts the steps, Jupyter Notebook opens them, nbclient runs
        # them in tests, ipywidgets draws tqdm's progress bars in a notebook.
        "notebooks": ["jupytext>=1.16", "notebook>=7", "ipykernel>=6", "nbclient>=0.10", "ipywidgets>=8"],
    },
    entry_points={"console_scripts": ["minidet = minidet.cli:main"]},
)
