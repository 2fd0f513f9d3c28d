#!/usr/bin/env bash
# Everything minidet needs a GPU for, in one go: the GPU tests (every kernel version), then the kernel benchmarks,
# with every log written under "$OUT" (default: /tmp/minidet-gpu-results).
#
#   benchmarks/gpu_suite.sh            # environment, kernel tests, all gpu tests, benchmarks
#   benchmarks/gpu_suite.sh kernels    # environment and tests/test_kernels.py + tests/test_focal_labels.py only
#   benchmarks/gpu_suite.sh tests      # environment and every test marked gpu
#   benchmarks/gpu_suite.sh bench      # environment and the benchmarks only
#
# Runs from a source checkout without installing minidet (PYTHONPATH=.); needs CuPy (cupy-cuda12x or cupy-cuda13x),
# pytest and hypothesis for the tests, torch and torchvision for the comparison in the benchmarks. Each step runs
# even when an earlier one failed; the exit status is that of the first step that failed. Copy the benchmark's
# figures into benchmarks/RESULTS.md afterwards.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/minidet-gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH=.
what="${1:-all}"
status=0

step() {  # step NAME COMMAND...: run COMMAND, its output to the screen and to $OUT/NAME.log
    local name="$1"
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc="${PIPESTATUS[0]}"
    echo "=== $name: exit status $rc"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status="$rc"; fi
}

environment() {
    nvidia-smi || true
    git log -1 --format='commit %H %cd' 2>/dev/null || echo "commit: not a git checkout"
    git status --short 2>/dev/null | head -20
    python - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "cupy", "torch", "torchvision", "pytest", "hypothesis"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # report, do not stop
        print(name, "unavailable:", error)
from minidet import backend, cuda
print("minidet sees a CUDA GPU:", backend.cuda_available())
print("kernel sources:", cuda.kernels_dir())
if backend.cuda_available():
    cupy = backend.cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print("device:", props["name"].decode(), "compute capability", cupy.cuda.Device().compute_capability)
EOF
}

step environment environment
case "$what" in
    kernels)
        step test_kernels python -m pytest -q -rs tests/test_kernels.py tests/test_focal_labels.py ;;
    tests)
        step test_gpu python -m pytest -q -rs -m gpu ;;
    bench)
        step bench_kernels python benchmarks/bench_kernels.py ;;
    all)
        step test_kernels python -m pytest -q -rs tests/test_kernels.py tests/test_focal_labels.py
        step test_gpu python -m pytest -q -rs -m gpu
        step bench_kernels python benchmarks/bench_kernels.py ;;
    *)
        echo "unknown step '$what': use kernels, tests, bench or all" >&2
        exit 2 ;;
esac
echo "logs in $OUT/"
exit "$status"
