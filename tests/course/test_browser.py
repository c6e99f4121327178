"""A learner's view: JupyterLab in a real browser (Debian's Chromium, headless, driven by
playwright) runs a notebook holding one of the course's explorers, a slider is moved with the
keyboard as a person would, and the drawn figure and its numbers change. The screenshots are
kept under the test's temporary folder (printed on failure).

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


def _write_notebook(path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from cnet.course.widgets import ScalesExplorer\n\n"
            "explorer = ScalesExplorer()\nexplorer"
        )
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


def test_moving_a_slider_in_jupyterlab_redraws_the_explorer(lab, tmp_path):
    url, token = lab
    _write_notebook(tmp_path / "explorer.ipynb")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"{url}/lab/tree/explorer.ipynb?token={token}")
            page.wait_for_function(
                "window.jupyterapp && window.jupyterapp.shell.currentWidget"
                " && window.jupyterapp.shell.currentWidget.sessionContext"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
                timeout=90_000,
            )
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            picture = page.locator(".jp-OutputArea img").first
            picture.wait_for(timeout=90_000)
            summary = page.locator(".widget-html-content").first
            before_src, before_text = picture.get_attribute("src"), summary.inner_text()
            page.screenshot(path=str(tmp_path / "before.png"))
            handle = page.locator(".widget-slider .noUi-handle, .widget-slider .ui-slider-handle")
            handle.first.click()
            page.keyboard.press("ArrowRight")  # one step of 0.05: scale 1.00 -> 1.05
            page.wait_for_function(
                "([src, text]) => { const img = document.querySelector('.jp-OutputArea img');"
                " const html = document.querySelector('.widget-html-content');"
                " return img && html && img.src !== src && html.innerText !== text; }",
                arg=[before_src, before_text],
                timeout=60_000,
            )
            page.screenshot(path=str(tmp_path / "after.png"))
            after_text = summary.inner_text()
        finally:
            browser.close()
    assert "residual 0 × 1," in before_text and "residual 0 × 1.05," in after_text, (
        before_text,
        after_text,
        f"screenshots in {tmp_path}",
    )
