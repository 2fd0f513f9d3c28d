"""The CUDA sources of minidet's kernels (``*.cu``) and their arithmetic (``*.cuh``), shipped as package data.

``setup.py`` installs this folder as the package ``minidet.kernels``; ``minidet.cuda`` reads the sources from it
and compiles them with CuPy when a kernel is first needed. There is no Python code here.
"""
