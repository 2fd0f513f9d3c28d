"""Every tutorial step runs top to bottom as a script, in its small size, and writes the figures it announces.

Each step prints ``saved <path>`` for every figure it writes; the test checks that each announced file exists in
the output folder and is a non-empty PNG, and that the step announced at least one.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 120


def test_there_are_steps():
    assert STEPS, "no tutorials/[0-9]*.py found"


@pytest.mark.parametrize("step", STEPS, ids=[s.stem for s in STEPS])
def test_tutorial_step_runs_and_saves_its_figures(step, tmp_path):
    env = dict(os.environ, MINIDET_TUTORIAL_SMALL="1", MINIDET_TUTORIAL_OUT=str(tmp_path), MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    try:
        result = subprocess.run([sys.executable, str(step)], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{step.name} did not finish within {TIMEOUT_S} s")
    assert result.returncode == 0, f"{step.name} failed (exit {result.returncode}):\n{result.stderr[-4000:]}"

    saved = [Path(line.removeprefix("saved ").strip()) for line in result.stdout.splitlines()
             if line.startswith("saved ")]
    assert saved, f"{step.name} saved no figure (no 'saved <path>' line in its output)"
    for path in saved:
        assert path.parent == tmp_path, f"{step.name} wrote {path} outside MINIDET_TUTORIAL_OUT ({tmp_path})"
        assert path.suffix == ".png", f"{step.name}: {path.name} is not a .png"
        data = path.read_bytes() if path.is_file() else b""
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, f"{step.name}: {path.name} is not a valid PNG"


# Steps run as notebooks, the way a learner opens them: converted by jupytext, executed cell by cell in a Jupyter
# kernel by nbclient, from tutorials/ (where tutorial_setup.py is found). CI installs both; without them the test
# says what to install.
NOTEBOOK_STEPS = ["01_autograd", "07_matching", "11_training"]


@pytest.mark.parametrize("name", NOTEBOOK_STEPS)
def test_tutorial_step_runs_as_a_notebook(name, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[notebooks]' to run the steps as notebooks")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebooks]' to run the steps as notebooks")
    monkeypatch.setenv("MINIDET_TUTORIAL_SMALL", "1")       # the kernel inherits this process's environment
    monkeypatch.setenv("MINIDET_TUTORIAL_OUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    notebook = jupytext.read(ROOT / "tutorials" / f"{name}.py")
    assert sum(cell.cell_type == "markdown" for cell in notebook.cells) >= 3     # prose cells, not one big script
    nbclient.NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "tutorials")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, f"{name}: no figure shown inline"              # tutorial_setup.save shows them in a notebook
    assert list(tmp_path.glob("*.png")), f"{name}: no figure saved"
