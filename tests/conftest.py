"""Shared fixtures, and the e2e marker: a test that runs a training entry point (itself or through a fixture)
is marked e2e, so `pytest -m "not e2e and not slow"` is the quick loop while editing."""
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from helpers import make_dataset  # noqa: E402

# what starts a training run: the scripts' entry point in-process or as a subprocess, or compare.py
TRAINING_ENTRIES = ("train_in_process(", "run_script(", "trainer.main(", "compare.main(", "train(", "main_job")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small learnable dataset (helpers.make_text), made once per test module."""
    return make_dataset(tmp_path_factory.mktemp("data"))


def _runs_training(fn, seen):
    if fn in seen:
        return False
    seen.add(fn)
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return any(entry in src for entry in TRAINING_ENTRIES)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        seen = set()
        uses = [fn] + [fd.func for defs in getattr(item, "_fixtureinfo").name2fixturedefs.values() for fd in defs]
        if any(f is not None and _runs_training(f, seen) for f in uses):
            item.add_marker(pytest.mark.e2e)
