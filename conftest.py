"""Doctests: every example in mechkit's docstrings runs in the suite (``--doctest-modules`` on
``mechkit/``), with ``mk`` and ``torch`` already imported, as a reader would have them."""

import pytest
import torch

import mechkit as mk


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    doctest_namespace["mk"] = mk
    doctest_namespace["torch"] = torch
