"""Where the course lives: every notebook's setup cell, and the "Open in Colab" links.

A notebook must start in three places: beside an installed cnet, inside a clone, and in a fresh
Colab runtime opened from a GitHub URL, where nothing but the notebook exists. Its first code
cell (:data:`SETUP_CELL`) handles all three. In the third it clones the repository, installs it
with pip (a torch already there, such as Colab's, satisfies ``torch>=2.1`` and is left alone),
puts the clone on ``sys.path`` so that ``import cnet`` works without restarting the runtime, and
sets ``$CNET_ROOT`` so that :func:`cnet.course.figures.repo_root` finds ``models/`` wherever the
clone is.

The repository's URL is written in one place per file: the ``REPO_URL`` line of each setup cell
and the links between the README's ``<!-- colab links -->`` markers, all stamped by
``python -m cnet course --repo URL`` (:func:`stamp_repository`). ``$CNET_REPO_URL`` overrides
the stamped URL at run time, which is how a test points a notebook at a local clone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["SETUP_CELL", "colab_link", "setup_cell", "stamp_repository"]

SETUP_CELL = """\
# Setup: import cnet from an installed package or from the clone this notebook sits in; in a
# fresh Colab runtime, clone the repository and install it (the runtime's own torch stays).
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = os.environ.get("CNET_REPO_URL") or {repo_url!r}  # python -m cnet course --repo URL
try:
    import cnet
except ImportError:
    here = [Path.cwd(), *Path.cwd().parents]
    clone = next((p for p in here if (p / "cnet" / "__init__.py").is_file()), None)
    if clone is None:  # a notebook on its own, e.g. opened in Colab from GitHub
        if not REPO_URL:
            raise RuntimeError("cnet is neither installed nor around this notebook: set "
                               "CNET_REPO_URL to the repository's git URL, or open the "
                               "notebook in a clone") from None
        clone = Path.cwd() / "cnet-repo"
        if not (clone / "cnet" / "__init__.py").is_file():
            subprocess.run(["git", "clone", "--quiet", REPO_URL, str(clone)], check=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "-e", str(clone)], check=True)  # a torch already there stays
    sys.path.insert(0, str(clone))  # importable now, without restarting the runtime
    os.environ["CNET_ROOT"] = str(clone)  # where models/ and figures/ are
    import cnet
"""

_URL_LINE = re.compile(r'^REPO_URL = os\.environ\.get\("CNET_REPO_URL"\) or (.*?)  #', re.M)
_LINKS = re.compile(r"(<!-- colab links -->\n)(.*?)(<!-- /colab links -->)", re.S)


def setup_cell(repo_url: str) -> str:
    """The first code cell of every notebook, with ``repo_url`` stamped in."""
    return SETUP_CELL.format(repo_url=repo_url)


def stamped_url(source: str) -> str | None:
    """The URL a setup cell's source carries, or None if it is not :data:`SETUP_CELL`'s form."""
    match = _URL_LINE.search(source)
    if match is None:
        return None
    url = match.group(1)
    return url[1:-1] if url[:1] in "'\"" else None


def colab_link(repo_url: str, notebook: str, branch: str = "main") -> str | None:
    """Colab's address for ``notebook`` (a path inside the repository) of a GitHub repository,
    or None when ``repo_url`` is not on GitHub (Colab opens notebooks from GitHub only)."""
    match = re.fullmatch(r"(?:https://|git@)github\.com[/:]([^/]+)/([^/]+?)(?:\.git)?/?", repo_url)
    if match is None:
        return None
    owner, name = match.groups()
    return f"https://colab.research.google.com/github/{owner}/{name}/blob/{branch}/{notebook}"


def _readme_links(repo_url: str, notebooks: list[Path], root: Path, branch: str) -> str:
    if not repo_url:
        return (
            "No repository URL is stamped yet: `python -m cnet course --repo URL` writes "
            "the links here.\n"
        )
    lines = []
    for path in notebooks:
        link = colab_link(repo_url, path.relative_to(root).as_posix(), branch)
        if link is None:
            return f"{repo_url} is not a GitHub repository: Colab opens notebooks from GitHub.\n"
        lines.append(f"- [{path.stem}]({link})")
    return "\n".join(lines) + "\n"


def stamp_repository(repo_url: str, root: Path, branch: str = "main") -> list[Path]:
    """Write ``repo_url`` into every notebook's setup cell (replacing the whole cell by
    :data:`SETUP_CELL`, so the cells stay one and the same) and into the README's Colab links.
    Returns the files changed."""
    notebooks = sorted((root / "notebooks").rglob("[0-9][0-9]_*.ipynb"))
    changed = []
    for path in notebooks:
        notebook = json.loads(path.read_text())
        first = next(c for c in notebook["cells"] if c["cell_type"] == "code")
        source = setup_cell(repo_url)
        if "".join(first["source"]) != source:
            first["source"] = source.splitlines(keepends=True)
            text = json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True)
            path.write_text(text + "\n")
            changed.append(path)
    readme = root / "README.md"
    text = readme.read_text()
    links = _readme_links(repo_url, notebooks, root, branch)
    stamped = _LINKS.sub(lambda m: m.group(1) + links + m.group(3), text)
    if stamped != text:
        readme.write_text(stamped)
        changed.append(readme)
    return changed
