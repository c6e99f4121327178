"""The notebooks are committed clean, and nbval really fails on a changed checked output."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SETUP_MARKER = "# Setup: import cnet from an installed package"


def test_notebooks_are_numbered_and_clean():
    assert [nb.name[:2] for nb in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    for path in NOTEBOOKS:
        raw = path.read_text()
        assert "application/vnd.jupyter.widget-state+json" not in raw, path.name
        assert len(raw) < 2_000_000, path.name
        nb = json.loads(raw)
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert "".join(code[0]["source"]).startswith(SETUP_MARKER), path.name
        checked = [c for c in code if "".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT")]
        assert checked, f"{path.name} checks no output"
        for cell in checked:
            assert cell["outputs"], f"{path.name}: a checked cell has no stored output"
            assert all(o["output_type"] != "error" for o in cell["outputs"])


@pytest.mark.slow
def test_nbval_fails_on_a_wrong_checked_output(tmp_path):
    cell = new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1 + 1)")
    cell.outputs = [new_output("stream", name="stdout", text="3\n")]
    nb = new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0, result.stdout
    assert "1 failed" in result.stdout


def test_every_cnet_name_a_notebook_imports_exists():
    """A moved or renamed library name breaks a notebook only when nbval runs it (minutes);
    this reads every notebook's and solution's imports of cnet and resolves them (seconds)."""
    import ast
    import importlib

    notebooks = NOTEBOOKS + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
    missing, checked = [], 0
    for path in notebooks:
        cells = json.loads(path.read_text())["cells"]
        for cell in (c for c in cells if c["cell_type"] == "code"):
            source = "\n".join(
                line
                for line in "".join(cell["source"]).splitlines()
                if not line.startswith(("%", "!"))
            )
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cnet":
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        checked += 1
                        if not hasattr(module, alias.name):
                            missing.append(f"{path.name}: from {node.module} import {alias.name}")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] == "cnet":
                            checked += 1
                            importlib.import_module(alias.name)
    assert checked > 50
    assert not missing, "\n".join(missing)


def test_the_strength_numbers_notebook_06_quotes_are_its_json():
    """06's prose quotes how little fidelity falls past scale 1: the numbers it wrote."""
    control = json.loads((ROOT / "figures" / "06_control.json").read_text())
    iou = {row["scale"]: row["iou"] for row in control["strength"]}
    notebook = (ROOT / "notebooks" / "06_controlling_generation.ipynb").read_text()
    assert f"({iou[1.0]:.3f} at $s = 1$, {iou[2.0]:.3f} at $s = 2$)" in notebook
