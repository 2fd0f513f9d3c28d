#!/usr/bin/env bash
# Everything minidet needs a GPU for, in one go: most important first, each step time-boxed, each step's output on
# the screen and in "$OUT/STEP.log" (default OUT: /tmp/minidet-gpu-results).
#
#   environment      the GPU, its driver, CUDA, the libraries' versions, the commit
#   test_gpu         pytest -m gpu: every op on CuPy, every kernel version against its NumPy reference (kernels first)
#   bench_kernels    focal loss and IoU matching against torchvision (and torch.compile); the copy rate; memory
#   bench_gpu_step   a training step: RetinaNet-R50-FPN against torchvision, the demo's model against the CPU
#   train_gpu        the demo's recipe trained on the GPU for at most 90 s, then its COCO mAP on held-out shapes
#                    (also copies loss.png and detections.png to $OUT)
#
#   benchmarks/gpu_suite.sh                      # every step, at most 8 minutes in all
#   benchmarks/gpu_suite.sh bench_kernels        # some steps only (environment always runs first)
#   benchmarks/gpu_suite.sh --dry-run            # every step without a GPU (see below)
#
# --dry-run rehearses the suite on any machine, so that a GPU's scarce minutes are never lost to a typo or a missing
# import: each Python script runs every line on tiny inputs, with stand-ins where a GPU would be (CuPy's CPU
# stand-in of tests/cupy_on_cpu.py, torch on the CPU, host clocks), pytest collects the gpu tests without running
# them, and the training is a few steps on the CPU; every log is written. None of its figures means anything.
#
# Runs from a source checkout without installing minidet (PYTHONPATH=.); needs CuPy (cupy-cuda12x or cupy-cuda13x),
# pytest and hypothesis for the tests, torch and torchvision for the comparisons, pycocotools for the mAP. On a
# machine without network that lacks one of them, put its wheel in a folder and name it in WHEELS: each wheel there
# is unpacked onto PYTHONPATH first. Each step runs even when an earlier one failed; the exit status is that of the
# first step that failed. Copy the figures into benchmarks/RESULTS.md afterwards.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/minidet-gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
dry_run=""
if [ "${1:-}" = "--dry-run" ]; then
    dry_run="--dry-run"
    shift
fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(test_gpu bench_kernels bench_gpu_step train_gpu)

if [ -n "${WHEELS:-}" ]; then
    site="$(mktemp -d)"
    for wheel in "$WHEELS"/*.whl; do
        python -m zipfile -e "$wheel" "$site" || { echo "cannot unpack $wheel" >&2; exit 2; }
    done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
status=0
summary=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND (a program or a function below) for at most SECONDS, its
          # output to the screen and to $OUT/NAME.log
    local name="$1" seconds="$2"
    shift 2
    echo "=== $name (at most $seconds s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc="${PIPESTATUS[0]}"
    local verdict="exit status $rc"
    [ "$rc" -eq 124 ] && verdict="stopped at its time limit ($seconds s)"
    echo "=== $name: $verdict after $((SECONDS - start)) s"
    summary+=("$name: $verdict after $((SECONDS - start)) s")
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status="$rc"; fi
}

environment() {
    nvidia-smi || echo "no nvidia-smi here"
    git log -1 --format='commit %H %cd' 2>/dev/null || echo "commit: not a git checkout"
    git status --short 2>/dev/null | head -20
    python - <<'EOF'
import importlib, os, platform
print("python", platform.python_version(), "| CPU cores:", os.cpu_count())
for name in ("numpy", "cupy", "torch", "torchvision", "pytest", "hypothesis", "pycocotools", "tqdm"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "(no version)"))
    except Exception as error:  # report, do not stop
        print(name, "unavailable:", error)
from minidet import backend, cuda
print("minidet sees a CUDA GPU:", backend.cuda_available())
print("kernel sources:", cuda.kernels_dir())
if backend.cuda_available():
    cupy = backend.cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print("device:", props["name"].decode(), "| compute capability", cupy.cuda.Device().compute_capability,
          "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "| driver", cupy.cuda.runtime.driverGetVersion())
EOF
}

test_gpu() {  # the kernels' tests first, then every other; up to 10 failures listed each time, not only the first
    local first=(tests/test_kernels.py tests/test_focal_labels.py tests/test_matching.py) rc
    local options=(-m gpu -q -rs -p no:cacheprovider --maxfail=10 --durations=10 ${dry_run:+--collect-only})
    python -m pytest "${options[@]}" "${first[@]}"
    rc=$?
    python -m pytest "${options[@]}" tests "${first[@]/#/--ignore=}" || return
    return "$rc"
}

train_gpu() {  # the demo's recipe (minidet train's defaults) on the GPU, stopped like Ctrl-C after 90 s
    local run rc
    run="$(mktemp -d)"      # not in $OUT: only the pictures come back
    if [ -n "$dry_run" ]; then
        python -m minidet.cli train --device cpu --out "$run" --num-images 8 --image-size 64 --epochs 1 \
            --batch-size 4 --checkpoint-every 1
    else
        # --preserve-status: the exit status is minidet's (130 after Ctrl-C), not timeout's 124
        timeout --preserve-status --signal=INT 90 python -m minidet.cli train --device cuda --out "$run" \
            --checkpoint-every 20
    fi
    rc=$?
    [ "$rc" -eq 130 ] && echo "(stopped at the 90 s time box: evaluating the last checkpoint)"
    python - "$run/metrics.jsonl" "$run/loss.png" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
seconds = [row["seconds"] for row in rows[5:]] or [row["seconds"] for row in rows]
print(f"{len(rows)} steps logged, median step {1000 * statistics.median(seconds):.1f} ms (after the first 5), "
      f"{sum(row['seconds'] for row in rows):.0f} s of steps in all, last loss {rows[-1]['loss']:.4f}")
from minidet import plots   # an interrupted run stops before it draws its loss curve: drawn here from its log
plots.plot_losses(rows, sys.argv[2])
EOF
    if [ -n "$dry_run" ]; then
        python -m minidet.cli evaluate "$run/last.npz" --device cpu --out "$run/eval" --num-images 4 || return
    else
        python -m minidet.cli evaluate "$run/last.npz" --device cuda --out "$run/eval" || return
    fi
    cp "$run/loss.png" "$run/eval/detections.png" "$OUT/" && rm -rf "$run" || return
    [ "$rc" -eq 0 ] || [ "$rc" -eq 130 ]
}
export OUT dry_run
export -f environment test_gpu train_gpu

step environment 30 environment
for name in "${steps[@]}"; do
    case "$name" in
        test_gpu) step test_gpu 110 test_gpu ;;
        bench_kernels) step bench_kernels 130 python benchmarks/bench_kernels.py $dry_run ;;
        bench_gpu_step) step bench_gpu_step 70 python benchmarks/bench_gpu_step.py $dry_run ;;
        train_gpu) step train_gpu 140 train_gpu ;;
        *) echo "unknown step '$name': use test_gpu, bench_kernels, bench_gpu_step or train_gpu" >&2
           exit 2 ;;
    esac
done
echo
printf '%s\n' "${summary[@]}"
echo "logs in $OUT/"
exit "$status"
