"""Doctests: every example in mechkit's docstrings runs in the suite (``--doctest-modules`` on
``mechkit/``), with ``mk`` and ``torch`` already imported, as a reader would have them. An
example that loads a real model or starts processes is marked ``slow``, like the tests that do
(tests/conftest.py).

Order: the files that took longest in a recorded run (tests/durations.json) run first, and
within a file its longest tests, so that the workers of ``pytest -n auto`` end together instead
of one of them finishing a long reproduction alone. With ``--dist loadgroup`` (the Makefile) a
worker takes a whole test file at a time, so that its module fixtures are built once; the
demo's and the tutorials' tests, which share only the session's model, go one at a time
(``SPREAD``). Refresh the record with ``benchmarks/test_times.py RUN.xml --write-durations
tests/durations.json``; files it does not know run after those it does, in pytest's order.
"""

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import mechkit as mk
import mechkit.models.loading as _loading

REAL_MODELS = ("smollm2-135m", "gemma3-270m")

STARTS_PROCESSES = ("spawn(",)
"""Examples that start processes (ranks joined in a process group) are slow as well."""

REAL_MODEL_BYTES = 10 * 1024**2
"""GGUF files larger than this are real models (the 135M one is ~90 MB); tests of broken or
hand-made files stay fast."""

_running: dict[str, pytest.Item] = {}


DURATIONS = Path(__file__).parent / "tests" / "durations.json"

FIRST = frozenset({"tests/models/test_gemma3.py"})
"""Files that run before the longest ones. xdist hands the first work unit to one worker and
the next to the other: Gemma's file first keeps that worker busy converting Gemma while the
other converts SmolLM2, which every other long test waits for."""

SPREAD = frozenset({"tests/test_readme_and_demo.py", "tests/test_tutorials.py"})
"""Test files whose tests the workers take one at a time. Under ``--dist loadgroup`` (``make
test``) every other test file is one work unit, so that its module fixtures (two spawned ranks,
a Ray cluster, a transformers reference model) are built once, not once per worker; these two
share nothing but the session's model, and are most of the time."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.dtest is not None:
            source = "".join(example.source for example in item.dtest.examples)
            if any(name in source for name in (*REAL_MODELS, *STARTS_PROCESSES)):
                item.add_marker(pytest.mark.slow)
    items[:] = longest_first(items, DURATIONS)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist must not refuse it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: a test file is one work unit (but those in ``SPREAD``, whose tests
    go one by one), in collection order with ``--no-loadscope-reorder``. xdist's own groups
    (``xdist_group`` marks) rename node ids, which pytest 9 no longer allows, so the groups are
    made here instead."""
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's scheduler for the mode asked
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::")[0]
            return file if file.startswith("tests/") and file not in SPREAD else nodeid

    return FileUnits(config, log)


def longest_first(items: list[pytest.Item], record: Path) -> list[pytest.Item]:
    """``items`` with the longest recorded files first (each file's tests together, its
    longest tests first); unknown files and tests keep pytest's order after the known ones."""
    try:
        seconds = json.loads(record.read_text())
        files, tests = dict(seconds["files"]), dict(seconds["tests"])
    except (OSError, ValueError, KeyError, TypeError):
        return items  # no usable record: pytest's order
    position = {item.nodeid: n for n, item in enumerate(items)}
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item.nodeid.split("::")[0], position[item.nodeid])

    def key(item: pytest.Item) -> tuple[bool, float, int, float, int]:
        file = item.nodeid.split("::")[0]
        return (file not in FIRST, -files.get(file, 0.0), first_seen[file],
                -tests.get(item.nodeid, 0.0), position[item.nodeid])  # fmt: skip

    return sorted(items, key=key)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    doctest_namespace["mk"] = mk
    doctest_namespace["torch"] = torch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    _running["item"] = item  # before its fixtures, so module fixtures that load count too
    yield


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and os.environ.get("PYTEST_XDIST_WORKER"):
        # each worker of ``pytest -n`` gets its share of the cores: two workers of two torch
        # threads each on two cores ran four demo tests in 306 s, of one thread each in 231 s
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        torch.set_num_threads(max(1, (cores or os.cpu_count() or 1) // int(workers)))
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
