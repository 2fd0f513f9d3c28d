"""Bugs planted in the production kernels and their launchers, each of which the CPU launch harness must catch and
explain. Each runs in its own process (tests/planted_bug.py), the kernel or minidet/cuda.py changed by one line.

Some catches depend on the order in which the harness runs a block's threads: a missing __syncthreads before the
block sum lets the first warp read the other warps' sums before they are written, which shows in forward order
(warp 0 runs first and reads poison) and in most random orders, but not in reverse order (the other warps have
written their sums by the time warp 0 reads them). That is why CI runs the kernel tests in two orders, and why the
first test below also shows the order that hides the bug.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU launch harness needs g++")]


def run_planted(file, old, new, check, schedule="forward", poison="0xFF"):
    """(exit code, output) of tests/planted_bug.py with line ``old`` of ``file`` replaced by ``new``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               MINIDET_HARNESS_SCHEDULE=schedule, MINIDET_HARNESS_POISON=poison)
    result = subprocess.run([sys.executable, str(ROOT / "tests/planted_bug.py"), file, old, new, check], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    return result.returncode, (result.stdout + result.stderr).strip()


def test_the_unchanged_kernels_pass_the_checks():
    for file, line, check in [("kernels/block_sum.cuh", "__syncthreads();", "focal"),
                              ("kernels/iou_match.cu", "tile_box_best[threadIdx.x] = 0;", "matching"),
                              ("minidet/cuda.py", "BLOCK_SIZE = 256", "focal")]:
        code, output = run_planted(file, line, line, check)
        assert code == 0 and "equal to the reference" in output, output


@pytest.mark.parametrize("schedule, caught", [("forward", True), ("random:1", True), ("reverse", False)])
def test_a_missing_syncthreads_before_the_block_sum(schedule, caught):
    code, output = run_planted("kernels/block_sum.cuh", "    __syncthreads();\n", "\n", "focal", schedule)
    if caught:
        assert code == 1, output
        assert "the loss is nan, the NumPy reference" in output        # poison 0xFF read as a float is NaN
    else:
        assert code == 0, output


def test_a_warp_shuffle_inside_a_divergent_branch():
    code, output = run_planted("kernels/block_sum.cuh",
                               "value = warp_sum(lane < BLOCK_SIZE / 32 ? warp_sums[lane] : T(0));",
                               "if (lane < BLOCK_SIZE / 32) value = warp_sum(warp_sums[lane]);", "focal")
    assert code == 1, output
    assert "deadlock in block" in output
    assert "Threads 0-7 wait at __shfl_down_sync (mask 0xffffffff) at block_sum.cuh:" in output
    assert "for lanes 8-31 of their warp" in output and "Threads 8-255 have exited" in output


def test_a_load_guard_that_goes_one_element_too_far():
    code, output = run_planted("kernels/focal_loss.cu", "if (at.i < num_elements) {", "if (at.i <= num_elements) {",
                               "focal")
    assert code == 86, output
    assert "made an invalid read" in output and "0 bytes past the end of argument" in output
    assert "the faulting instruction is at" in output and "focal_loss.cu:" in output


def test_a_per_tile_maximum_not_reset_between_tiles():
    for poison in ("0xFF", "0x7F"):        # 0xFF: last tile's maxima stay; 0x7F: the poison itself is the maximum
        code, output = run_planted("kernels/iou_match.cu", "tile_box_best[threadIdx.x] = 0;", "", "matching",
                                   poison=poison)
        assert code == 1, output
        assert "pairs differ from the NumPy reference" in output


def test_a_launch_with_the_wrong_block_size():
    code, output = run_planted("minidet/cuda.py", "BLOCK_SIZE = 256", "BLOCK_SIZE = 512", "focal")
    assert code == 1, output
    assert ("launched with 512 threads per block, but its __launch_bounds__ allows at most 256 (a GPU refuses such "
            "a launch)") in output


def test_a_python_float_passed_for_a_float32_parameter():
    code, output = run_planted("minidet/cuda.py", "scalar(alpha), scalar(gamma), grad, loss))",
                               "float(alpha), scalar(gamma), grad, loss))", "focal")
    assert code == 1, output
    assert ("argument 5 (alpha) is a Python float, which a launch passes as double (8 bytes), but the kernel's "
            "parameter is float") in output


def test_two_size_arguments_swapped():
    code, output = run_planted("minidet/cuda.py", "np.int32(num_anchors), np.int32(max_boxes))",
                               "np.int32(max_boxes), np.int32(num_anchors))", "matching")
    assert code == 86, output
    assert "made an invalid read" in output and "bytes past the end of argument 1 (boxes)" in output
