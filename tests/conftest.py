"""Fixtures the test modules share."""

import pytest
import torch
from _tiny_unets import tiny_sd_pipeline

THREADS_AT_START = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_as_found():
    """Commands and fixtures under test set torch's thread count (``--threads``, pretraining's
    ``threads``); every test after them runs with the count the suite started with."""
    yield
    torch.set_num_threads(THREADS_AT_START)


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A randomly initialised miniature Stable Diffusion saved as a pipeline folder (read only)."""
    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(path)
    return path
