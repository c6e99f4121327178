"""Fixtures the test modules share."""

import pytest
from _tiny_unets import tiny_sd_pipeline


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A randomly initialised miniature Stable Diffusion saved as a pipeline folder (read only)."""
    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(path)
    return path
