"""Where cnet reads shipped files from and writes figures to."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The clone this package lives in (a folder holding both cnet/ and notebooks/), or None
    for an installed copy."""
    root = PACKAGE_DIR.parent
    return root if (root / "notebooks").is_dir() else None


def figures_dir() -> Path:
    """Where figures are written: $CNET_FIGURES, else the clone's figures/, else ./figures."""
    if "CNET_FIGURES" in os.environ:
        path = Path(os.environ["CNET_FIGURES"])
    else:
        root = repo_root()
        path = (root if root is not None else Path.cwd()) / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path
