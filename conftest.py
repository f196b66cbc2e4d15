"""Doctests: every example in mechkit's docstrings runs in the suite (``--doctest-modules`` on
``mechkit/``), with ``mk`` and ``torch`` already imported, as a reader would have them. An
example that loads a real model is marked ``slow``, like the tests that do (tests/conftest.py)."""

import pytest
import torch

import mechkit as mk

REAL_MODELS = ("smollm2-135m", "gemma3-270m")


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
