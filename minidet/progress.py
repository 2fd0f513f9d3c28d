"""Progress bars for long work: tqdm's, drawn on a terminal and in a Jupyter notebook, never into a log file."""

import sys

from tqdm.auto import tqdm


def progress_bar(enabled=True, **options):
    """A tqdm bar (``options`` are tqdm's), shown only when ``enabled`` and someone can see it: stderr is a terminal,
    or the code runs in a Jupyter kernel, where ``tqdm.auto`` draws a notebook widget (with ipywidgets installed)
    instead of printing lines. A bar into a file or a pipe would only fill a log with carriage returns."""
    watched = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(disable=not (enabled and watched), **options)
