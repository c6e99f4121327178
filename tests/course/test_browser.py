"""A learner's view: JupyterLab in a real browser (Debian's Chromium, headless, driven by
playwright) runs each of the course's explorers, every control is moved once with the mouse or
the keyboard as a person would, and the drawn picture must change after each move, with no
label cut. The screenshots are kept under the test's temporary folder (named on failure).

Needs /usr/bin/chromium (``apt-get install -y chromium``, as ``.ci/run`` does) and playwright
from PyPI; skipped without them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no chromium to drive"),
    pytest.mark.slow,
]

# what the probe of this machine kind found Chromium needs on a closed network, as root
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free port, serving ``tmp_path``; yields its base URL."""
    port, token = _free_port(), "cnet-browser-test"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / ".runtime"),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            "--allow-root",
            f"--ServerApp.root_dir={tmp_path}",
            "--LabApp.expose_app_in_browser=True",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "lab.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()}")
        yield url, token
    finally:
        server.terminate()
        server.wait(timeout=30)


def _write_notebook(path, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


#: Every explorer of the course, built as its notebook builds it (smaller where it samples).
EXPLORERS = {
    "01_zero_conv": "from cnet.course.widgets import ZeroConvExplorer\n"
    "ZeroConvExplorer(lr=0.1, input_scale=1.0, steps=20)",
    "02_gradient_flow": "import copy, torch\n"
    "from cnet import ControlledBlock\n"
    "from cnet.course.lessons import ConvNormAct, gradient_flow\n"
    "from cnet.course.widgets import GradientFlowExplorer\n"
    "torch.manual_seed(0)\n"
    "block = ControlledBlock(copy.deepcopy(ConvNormAct(8)), 8, condition_channels=3)\n"
    "x, c, t = torch.randn(2, 8, 8, 8), torch.rand(2, 3, 8, 8), torch.randn(2, 8, 8, 8)\n"
    "GradientFlowExplorer(gradient_flow(block, x, c, t, steps=3))",
    "03_scales": "from cnet.course.widgets import ScalesExplorer\nScalesExplorer()",
    "05_run": "from cnet.course.figures import repo_root\n"
    "from cnet.course.widgets import RunExplorer\n"
    "RunExplorer(repo_root() / 'models' / 'controlnet-fill')",
    "06_control": "from cnet import ControlledUNet\n"
    "from cnet.course.figures import repo_root\n"
    "from cnet.course.widgets import ControlExplorer\n"
    "from cnet.train import cache_data, load_base, load_controlnet\n"
    "pipe = load_base(repo_root() / 'models' / 'miniature-sd')\n"
    "net = load_controlnet(repo_root() / 'models' / 'controlnet-fill')\n"
    "data = cache_data(pipe, 'fill', 3, 'eval', seed=0)\n"
    "ControlExplorer(pipe, ControlledUNet(pipe.unet, net).eval(), data, steps=10)",
}

# the output of the notebook on screen (JupyterLab keeps other tabs in the page, hidden)
OUTPUT = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea"

# labels, readouts and captions whose text is wider than their box (cut or spilling over)
CLIPPED = f"""() => Array.from(document.querySelectorAll(
    '{OUTPUT} .widget-label, {OUTPUT} .widget-readout, {OUTPUT} .widget-label-basic'))
  .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1)
  .map(e => e.innerText)"""

PICTURE_CHANGED = f"""(src) => {{ const img = document.querySelector('{OUTPUT} img');
  return img && img.src !== src; }}"""


def _open(page, url: str, token: str, name: str) -> None:
    # a workspace of its own: JupyterLab would otherwise reopen the notebooks opened before
    page.goto(f"{url}/lab/workspaces/{name}/tree/{name}.ipynb?reset&token={token}")
    page.wait_for_function(
        "window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.sessionContext"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
        timeout=90_000,
    )
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.locator(f"{OUTPUT} .widget-image").first.wait_for(timeout=120_000)


def _controls(page) -> list[tuple[str, object]]:
    """Each control of the explorer on the page, once: every slider handle, every dropdown,
    and the first not-selected toggle button."""
    area = page.locator(OUTPUT)
    found = [
        (f"slider handle {i}", handle)
        for i, handle in enumerate(area.locator(".noUi-handle").all())
    ]
    found += [(f"dropdown {i}", select) for i, select in enumerate(area.locator("select").all())]
    toggles = area.locator(".widget-toggle-button:not(.mod-active)").all()
    found += [("toggle", toggles[0])] if toggles else []
    return found


def _move(control) -> None:
    if control.evaluate("e => e.tagName") == "SELECT":
        options = control.locator("option").all()
        current = control.evaluate("e => e.selectedIndex")
        control.select_option(index=(current + 1) % len(options))
    elif "toggle" in (control.get_attribute("class") or ""):
        control.click()
    else:  # a slider's handle: one step, as a person's key press, away from the end it is at
        control.click()
        at_end = control.get_attribute("aria-valuenow") == control.get_attribute("aria-valuemax")
        control.press("ArrowLeft" if at_end else "ArrowRight")


def test_every_explorer_redraws_on_each_control_and_cuts_no_label(lab, tmp_path):
    """Each explorer of the course in JupyterLab in Chromium at 1280×900: it draws; moving each
    of its controls once redraws the picture; no label or readout is cut. Screenshots of every
    state are kept in the test's folder (named in any failure)."""
    url, token = lab
    problems = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            for name, source in EXPLORERS.items():
                _write_notebook(tmp_path / f"{name}.ipynb", source)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                _open(page, url, token, name)
                page.screenshot(path=str(tmp_path / f"{name}-0.png"))
                if clipped := page.evaluate(CLIPPED):
                    problems.append(f"{name}: clipped {clipped}")
                controls = _controls(page)
                if not controls:
                    problems.append(f"{name}: no control found")
                for i, (what, control) in enumerate(controls, 1):
                    before = page.locator(f"{OUTPUT} img").first.get_attribute("src")
                    _move(control)
                    try:
                        page.wait_for_function(PICTURE_CHANGED, arg=before, timeout=90_000)
                    except playwright.TimeoutError:
                        problems.append(f"{name}: moving {what} did not redraw")
                    page.screenshot(path=str(tmp_path / f"{name}-{i}.png"))
                    if clipped := page.evaluate(CLIPPED):
                        problems.append(f"{name} after {what}: clipped {clipped}")
                page.close()
        finally:
            browser.close()
    assert not problems, (problems, f"screenshots in {tmp_path}")
