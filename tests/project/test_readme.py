"""README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_last():
    test_command = next(c for c in _readme_commands() if c.startswith("python -m pytest"))
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert ci_lines[-1] == test_command


def test_ci_installs_cpu_torch_before_the_project():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("pip install torch==2.13.0") < ci.index('pip install -e ".[dev]"')
    assert "set -euo pipefail" in ci  # a failing test fails the run


def test_every_notebook_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"notebooks/{nb.name}" in readme, nb.name


def test_the_teaching_path_shows_figures_that_exist():
    """The 90-minute path names figures to show: each is in figures/ (written by a notebook)."""
    import re

    readme = (ROOT / "README.md").read_text()
    path = readme.split("### Teaching it in 90 minutes", 1)[1].split("\n### ", 1)[0]
    named = set(re.findall(r"`([0-9a-z_]+\.png)`", path))
    assert len(named) >= 10
    assert not [n for n in named if not (ROOT / "figures" / n).is_file()]
