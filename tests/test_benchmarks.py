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
