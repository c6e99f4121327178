"""Where the course lives: a notebook copied alone into an empty folder, in a fresh virtual
environment without cnet, runs top to bottom from its setup cell (which clones the repository
named by $CNET_REPO_URL, here this clone, and installs it), as in a fresh Colab runtime; and
``python -m cnet course --repo URL`` stamps one URL into every setup cell and Colab link."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from cnet.__main__ import main
from cnet.course.colab import colab_link, setup_cell, stamp_repository, stamped_url
from cnet.course.figures import repo_root

ROOT = repo_root()
NOTEBOOKS = sorted((ROOT / "notebooks").rglob("[0-9][0-9]_*.ipynb"))


def _setup_source(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_every_notebook_starts_with_the_one_setup_cell_and_one_url():
    urls = {stamped_url(_setup_source(path)) for path in NOTEBOOKS}
    assert len(urls) == 1 and None not in urls, urls
    (url,) = urls
    assert all(_setup_source(path) == setup_cell(url) for path in NOTEBOOKS)


def test_colab_links_only_for_github():
    assert colab_link("https://github.com/you/cnet.git", "notebooks/01_x.ipynb") == (
        "https://colab.research.google.com/github/you/cnet/blob/main/notebooks/01_x.ipynb"
    )
    assert colab_link("git@github.com:you/cnet", "n.ipynb", "dev").endswith(
        "github/you/cnet/blob/dev/n.ipynb"
    )
    assert colab_link("/srv/git/cnet", "n.ipynb") is None


def test_course_stamps_a_forks_url_into_every_setup_cell_and_readme(tmp_path, monkeypatch):
    fork = tmp_path / "fork"
    shutil.copytree(ROOT / "notebooks", fork / "notebooks")
    (fork / "models").mkdir()
    shutil.copy(ROOT / "README.md", fork / "README.md")
    changed = stamp_repository("https://github.com/you/cnet", fork)
    assert fork / "README.md" in changed and len(changed) == len(NOTEBOOKS) + 1
    for path in sorted((fork / "notebooks").rglob("[0-9][0-9]_*.ipynb")):
        assert stamped_url(_setup_source(path)) == "https://github.com/you/cnet"
        before = json.loads((ROOT / path.relative_to(fork)).read_text())["cells"]
        after = json.loads(path.read_text())["cells"]
        first = next(i for i, c in enumerate(before) if c["cell_type"] == "code")
        assert after[:first] + after[first + 1 :] == before[:first] + before[first + 1 :]
    readme = (fork / "README.md").read_text()
    link = colab_link("https://github.com/you/cnet", "notebooks/01_zero_convolution.ipynb")
    assert f"- [01_zero_convolution]({link})" in readme
    assert stamp_repository("https://github.com/you/cnet", fork) == []  # stamping twice: no change
    monkeypatch.chdir(fork)
    assert main(["course", "--repo", "https://github.com/other/cnet"]) == 0  # stamps "here"
    assert "github/other/cnet/blob/main" in (fork / "README.md").read_text()
    assert main(["course", "--repo", "x", "--root", str(tmp_path / "nothing")]) == 2


def test_the_unstamped_setup_cell_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CNET_REPO_URL", "PYTHONPATH")}
    # -S: no site-packages, so cnet (and everything else) is not importable, as in a bare runtime
    done = subprocess.run(
        [sys.executable, "-S", "-c", setup_cell("")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert (
        "RuntimeError: cnet is neither installed nor around this notebook: set CNET_REPO_URL"
        in done.stderr
    )


def _fresh_environment(path: Path) -> Path:
    """A new virtual environment holding this one's packages (linked, not copied) but cnet."""
    venv.EnvBuilder(with_pip=True, symlinks=True).create(path)
    python = path / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    fresh = Path(
        subprocess.run(
            [python, "-c", where], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        is_cnet = entry.name.startswith(("cnet", "__editable__.cnet", "__editable___cnet"))
        if not is_cnet and not (fresh / entry.name).exists():
            (fresh / entry.name).symlink_to(entry)
    return python


RUN_ALONE = """
import json, sys
import nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nb.cells.append(nbformat.v4.new_code_cell(
    "import json, sys\\nfrom cnet.course.figures import repo_root\\n"
    "print(json.dumps([cnet.__file__, sys.executable, str(repo_root())]))"))
nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[2]}}).execute()
print(nb.cells[-1].outputs[0]["text"])
"""


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="needs git and this clone's history",
)
@pytest.mark.slow
def test_a_notebook_alone_in_a_fresh_environment_clones_installs_and_runs(tmp_path):
    python = _fresh_environment(tmp_path / "venv")
    alone = tmp_path / "alone"
    alone.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CNET_ROOT")}
    assert (
        subprocess.run(
            [python, "-c", "import cnet"], cwd=alone, env=env, capture_output=True
        ).returncode
        != 0
    )  # no cnet in there
    notebook = shutil.copy(ROOT / "notebooks" / "01_zero_convolution.ipynb", alone)
    env["CNET_REPO_URL"] = str(ROOT)  # this clone's committed tree stands in for GitHub
    done = subprocess.run(
        [python, "-c", RUN_ALONE, notebook, str(alone)],
        cwd=alone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    package, executable, root = json.loads(done.stdout.strip().splitlines()[-1])
    clone = alone / "cnet-repo"
    assert Path(package).resolve() == (clone / "cnet" / "__init__.py").resolve()
    assert Path(executable).parent == python.parent  # the fresh environment's kernel
    assert Path(root).resolve() == clone.resolve() and (clone / "models" / "miniature-sd").is_dir()
    installed = subprocess.run(
        [python, "-m", "pip", "show", "-f", "cnet"], capture_output=True, text=True, check=True
    ).stdout
    assert "Editable project location: " + str(clone) in installed
