"""The README tells the truth: its test command is the one CI runs."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in readme
    assert command in ci.splitlines()


def _block_after(text, heading, fence):
    """The contents of the first ``fence`` code block after ``heading``, and where it ends."""
    start = text.index(fence, text.index(heading)) + len(fence)
    end = text.index("```", start)
    return text[start:end], end


def test_the_retinanet_example_prints_what_the_readme_says(capsys):
    readme = (ROOT / "README.md").read_text()
    code, end = _block_after(readme, "## A RetinaNet in a few lines", "```python\n")
    printed, _ = _block_after(readme[end + 3:], "prints", "```\n")
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out == printed


def test_the_pytorch_comparison_prints_what_the_readme_says(capsys):
    readme = (ROOT / "README.md").read_text()
    code, _ = _block_after(readme, "## minidet beside PyTorch", "```python\n")
    exec(compile(code, "README.md", "exec"), {})
    expected = readme[readme.index("Both print `") + len("Both print `"):].split("`")[0]
    assert capsys.readouterr().out == expected + "\n"


def test_the_pytorch_half_of_the_comparison_prints_the_same(capsys, torchvision):
    readme = (ROOT / "README.md").read_text()
    _, end = _block_after(readme, "## minidet beside PyTorch", "```python\n")
    code, _ = _block_after(readme[end + 3:], "<td>", "```python\n")         # the second column
    assert "import torch\n" in code
    exec(compile(code, "README.md", "exec"), {})                              # torchvision: imported by the fixture
    expected = readme[readme.index("Both print `") + len("Both print `"):].split("`")[0]
    assert capsys.readouterr().out == expected + "\n"
