"""pyproject.toml and environment.yml install the same packages with the same lower bounds."""

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
# conda-forge's name -> PyPI's name
CONDA_NAMES = {"pytorch": "torch", "opencv": "opencv-python-headless"}
NOT_PYTHON_PACKAGES = {"python", "pip"}


def _split(requirement: str) -> tuple[str, str]:
    requirement = requirement.split(";")[0].strip()
    name, spec = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return name.lower(), spec.replace(" ", "")


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return dict(_split(r) for r in reqs if "python_version" not in r)


def _environment() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name, spec = _split(dep)
            if name not in NOT_PYTHON_PACKAGES:
                out[CONDA_NAMES.get(name, name)] = spec
    return out


def test_environment_yml_matches_pyproject():
    assert _environment() == _pyproject()


def test_environment_installs_the_project_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_parts = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip_parts == [["-e ."]]
