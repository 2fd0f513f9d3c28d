"""Regenerate tutorials/thumbnails/ from the figures the steps write (not a step: the tests do not run it).

    for f in tutorials/[0-9]*.py; do python "$f"; done      # writes tutorials/figures/
    python tutorials/make_thumbnails.py                      # writes tutorials/thumbnails/, 320 pixels wide

The thumbnails are committed so the course's README shows a picture of each step before anything runs; the
full-size figures are not (tutorials/figures/ is git-ignored).
"""

import os
from pathlib import Path

from PIL import Image  # Pillow, installed with matplotlib

FIGURES = Path(os.environ.get("MINIDET_TUTORIAL_OUT", "tutorials/figures"))
THUMBNAILS = Path("tutorials/thumbnails")
WIDTH = 320

# One figure per step: the one its line in tutorials/README.md shows.
PER_STEP = ["01_finite_differences.png", "02_im2col.png", "03_feature_maps.png", "04_feature_pyramid.png",
            "05_subnets.png", "06_anchors.png", "07_matching.png", "08_box_coding.png", "09_focal_loss.png",
            "10_architecture.png", "11_loss_curve.png", "12_nms.png", "13_thread_layout.png",
            "14_matching.png", "15_cpu_harness.png", "16_all_reduce.png"]

THUMBNAILS.mkdir(parents=True, exist_ok=True)
for name in PER_STEP:
    image = Image.open(FIGURES / name).convert("RGB")
    image.thumbnail((WIDTH, 10 * WIDTH))                      # keeps the aspect ratio
    image.quantize(colors=128).save(THUMBNAILS / name, optimize=True)   # a palette image: a few tens of KB
    print(f"saved {THUMBNAILS / name} ({(THUMBNAILS / name).stat().st_size // 1024} KB)")
