"""Shared fixtures. The e2e marker (a test that runs a training entry point, itself or through a fixture) is set
explicitly on each such test; `pytest -m "not e2e and not slow"` is the quick loop while editing, and
tests/test_layout.py checks that every test that trains carries the mark and that the causality tests stay in the
quick loop."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from helpers import make_dataset  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small learnable dataset (helpers.make_text), made once per test module."""
    return make_dataset(tmp_path_factory.mktemp("data"))
