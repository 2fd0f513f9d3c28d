"""What every tutorial step shares: the small-size switch, where figures go, how they are saved, and the detector
that step 11 trains and later steps use.

Each step does ``from tutorial_setup import OUT, SMALL, save``: Python finds this file next to the step, whether
the step runs as a script (``python tutorials/03_backbone.py``) or as a notebook opened from ``tutorials/``.
"""

import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from minidet.train import TrainConfig, load_trained_model, train

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


def course_training():
    """Step 11's training run, in the run folder OUT/runs/11_training. At full size it is ``minidet demo``'s:
    ``TrainConfig``'s defaults, 1024 Shapes images of 128 x 128 for 15 epochs, 960 steps of Adam with a warm-up and
    a cosine schedule, which give a detector that finds the shapes in new images. In the small run, a tiny model
    trains for 8 steps on eight 64 x 64 images."""
    out = str(OUT / "runs" / "11_training")
    if SMALL:      # 32 pyramid channels: group norm splits them into 32 groups
        return TrainConfig(fpn_channels=32, num_images=8, image_size=64, batch_size=4, epochs=4, warmup_iters=4,
                           progress=False, out=out)
    return TrainConfig(out=out)


def trained_detector():
    """The detector step 11 trains, loaded from its run folder; trained first (once) if that folder holds no run of
    these settings yet, for instance when a later step is run before step 11."""
    config = course_training()
    path = Path(config.out) / "last.npz"
    if path.exists():
        model, saved = load_trained_model(path)
        if all(getattr(saved, name) == getattr(config, name)
               for name in ("num_images", "image_size", "batch_size", "epochs", "fpn_channels")):
            return model
    print(f"training step 11's detector first ({config.epochs} epochs of {config.num_images} images; later steps "
          "reuse it)")
    train(config)
    return load_trained_model(path)[0]
