"""Execute notebooks in place and store their outputs clean enough to commit.

    python scripts/execute_notebooks.py notebooks/01_zero_convolution.ipynb [...]

Runs each notebook top to bottom with nbclient (from its own folder, as nbval does), then drops
widget state from the metadata and widget views from the outputs (they only make sense in a
live kernel; an explorer keeps the picture it offers beside its view) and keeps only the last
frame of a progress bar, so that the committed file holds prose, code, text outputs and small
plots. The outputs of cells marked ``# NBVAL_CHECK_OUTPUT``
are what nbval compares against in CI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from cnet.course.widgets import WIDGET_VIEW


def last_frames(text: str) -> str:
    """A progress bar redraws its line with carriage returns; a stored output keeps each line's
    last frame (100 %), not the first one (0 %) that a viewer without a terminal shows."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean(nb: nbformat.NotebookNode) -> None:
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        kept = []
        for out in cell.outputs:
            if out.get("output_type") == "stream":
                out["text"] = last_frames(out["text"])
            if out.get("output_type") in ("display_data", "execute_result"):
                if WIDGET_VIEW in out["data"]:
                    if "image/png" not in out["data"]:
                        # a widget's text fallback is its state when drawn: a progress bar at 0 %
                        continue
                    # an explorer (cnet.course.widgets): its picture stays, the view goes
                    del out["data"][WIDGET_VIEW]
            kept.append(out)
        cell.outputs = kept


def execute(path: Path, timeout: int = 1800) -> None:
    # transformers warns, on import, about optional image-processing backends (torchvision) that
    # no notebook uses; the stored notebook shows the lesson, not this machine's package list
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    nb = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
    clean(nb)
    nbformat.write(nb, path)
    print(f"executed {path}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        execute(Path(arg))
