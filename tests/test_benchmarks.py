"""The CPU benchmarks run, check that minidet and torch compute the same thing, and end with their ratio.

Their timings mean nothing on a busy test machine; what is checked is that the scripts work: exit status 0 (they
exit 1 when minidet and torch disagree in float64) and a last line that gives the ratio minidet / torch.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.reference,
              pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the benchmarks compare with torch")]


@pytest.mark.parametrize("script, arguments", [
    ("bench_conv.py", ["--quick"]),
    ("bench_train_step.py", ["--repeat", "1", "--warmup", "0", "--profile-steps", "0", "--threads", "1"]),
])
def test_the_benchmark_runs_agrees_and_ends_with_the_ratio(script, arguments):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *arguments], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output[-3000:]
    assert "float64" in output
    last = output.splitlines()[-1]
    assert last.startswith("ratio minidet / torch: "), last
    float(last.split(": ")[1].split()[0])


@pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None, reason="the suite's training step scores mAP")
def test_the_gpu_suite_rehearses_every_step_without_a_gpu(tmp_path):
    """``gpu_suite.sh --dry-run``: every step runs (its scripts on CuPy's CPU stand-in and torch's CPU), exits 0 and
    leaves its log and pictures in $OUT, no more files than come back from a GPU machine (8)."""
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], cwd=ROOT,
                            env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True, timeout=900)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output[-3000:]
    steps = ["environment", "test_gpu", "bench_kernels", "bench_gpu_step", "train_gpu"]
    for step in steps:
        assert f"\n{step}: exit status 0 after " in output, f"{step} did not end well:\n{output[-3000:]}"
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == sorted([f"{step}.log" for step in steps] + ["loss.png", "detections.png"])
    logs = {step: (tmp_path / f"{step}.log").read_text() for step in steps}
    assert "minidet sees a CUDA GPU" in logs["environment"]
    assert "tests collected" in logs["test_gpu"]
    for line in ("copy rate:", "torchvision / minidet kernel:", "torch.compile / minidet kernel:",
                 "matches identical to torchvision's: True", "torchvision / minidet:"):
        assert line in logs["bench_kernels"], line
    for line in ("first step's losses", "minidet / torchvision:", "CPU / GPU:"):
        assert line in logs["bench_gpu_step"], line
    assert "steps logged" in logs["train_gpu"] and "AP50" in logs["train_gpu"]
