"""Doctests: every example in mechkit's docstrings runs in the suite (``--doctest-modules`` on
``mechkit/``), with ``mk`` and ``torch`` already imported, as a reader would have them. An
example that loads a real model is marked ``slow``, like the tests that do (tests/conftest.py)."""

import functools
from pathlib import Path

import pytest
import torch

import mechkit as mk
import mechkit.models.loading as _loading

REAL_MODELS = ("smollm2-135m", "gemma3-270m")

REAL_MODEL_BYTES = 10 * 1024**2
"""GGUF files larger than this are real models (the 135M one is ~90 MB); tests of broken or
hand-made files stay fast."""

_running: dict[str, pytest.Item] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.dtest is not None:
            source = "".join(example.source for example in item.dtest.examples)
            if any(name in source for name in REAL_MODELS):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    doctest_namespace["mk"] = mk
    doctest_namespace["torch"] = torch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    _running["item"] = item  # before its fixtures, so module fixtures that load count too
    yield


def pytest_configure(config: pytest.Config) -> None:
    real = _loading.load_gguf

    @functools.wraps(real)
    def load_gguf(path, *args, **kwargs):
        item = _running.get("item")
        real_model = Path(path).is_file() and Path(path).stat().st_size > REAL_MODEL_BYTES
        if real_model and item is not None and item.get_closest_marker("slow") is None:
            pytest.fail(
                f"{item.nodeid} loads a real model ({path}) but is not marked slow. "
                "Hint: add @pytest.mark.slow (make test-fast skips slow tests), or use the toy "
                "model (fixture `toy`).",
                pytrace=False,
            )
        return real(path, *args, **kwargs)

    _loading.load_gguf = load_gguf
    config.add_cleanup(lambda: setattr(_loading, "load_gguf", real))
