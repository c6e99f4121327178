"""pytest settings for the whole suite, notebooks included (nbval starts their kernels with this
process's environment)."""

import os
import shutil
import tempfile

_figures = tempfile.mkdtemp(prefix="cnet-test-figures-")


def pytest_configure(config):
    # Figures drawn while testing go to a scratch folder: the test suite leaves the repository's
    # figures/ exactly as it found it.
    os.environ["CNET_FIGURES"] = _figures


def pytest_unconfigure(config):
    shutil.rmtree(_figures, ignore_errors=True)
