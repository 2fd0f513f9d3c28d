"""What every tutorial step shares: the small-size switch, where figures go, and how they are saved.

Each step does ``from tutorial_setup import OUT, SMALL, save``: Python finds this file next to the step, whether
the step runs as a script (``python tutorials/03_backbone.py``) or as a notebook opened from ``tutorials/``.
"""

import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt

IN_NOTEBOOK = "ipykernel" in sys.modules
if not IN_NOTEBOOK:
    plt.switch_backend("Agg")                             # a script draws off-screen; a notebook shows figures inline
SMALL = os.environ.get("MINIDET_TUTORIAL_SMALL") == "1"   # CI's small-size switch: smaller images and models
# Figures go to $MINIDET_TUTORIAL_OUT, or tutorials/figures/ (from the repository root or from tutorials/).
OUT = Path(os.environ.get("MINIDET_TUTORIAL_OUT") or ("figures" if Path.cwd().name == "tutorials"
                                                      else "tutorials/figures"))
OUT.mkdir(parents=True, exist_ok=True)


def save(fig, name):
    """Write ``fig`` to OUT/name as a PNG (and show it, in a notebook), then say where."""
    path = OUT / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    if IN_NOTEBOOK:
        plt.show()                                        # inline, under the cell
    else:
        plt.close(fig)
    print(f"saved {path}")


def show_source(path, first, last=None):
    """Print the file ``path`` from the line containing ``first`` to the line containing ``last`` (None: to the
    function's closing brace, the next line that is just "}"), with line numbers."""
    path = Path(path)
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i in range(start, len(lines)) if (last in lines[i] if last else lines[i] == "}"))
    print(f"--- {path.parent.name}/{path.name}, lines {start + 1}-{end + 1}")
    for number in range(start, end + 1):
        print(f"{number + 1:4d} | {lines[number]}")
