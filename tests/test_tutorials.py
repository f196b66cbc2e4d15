"""Every tutorial notebook runs from top to bottom without an error.

Most run in this test process, cell by cell, as a Jupyter kernel would run them: each cell's
code executed in the notebook's own namespace, and a cell ending in an expression has that value
rendered by IPython's display formatter (so the results' ``_repr_html_`` and the plotly
figures are built as in a notebook). That saves each notebook a kernel start and the import of
mechkit and TransformerLens (about 10 s of CPU each). What a notebook changes process-wide
(gradient mode, default dtype, random states, threads, working folder, environment, warning
filters, plotly's renderer) is put back afterwards. The notebooks in ``KERNEL`` run in a real
Jupyter kernel instead: ``scale`` starts a Ray cluster and worker processes, and running one
notebook that way keeps the kernel path tested (``make docs`` executes all of them so too).
"""

from __future__ import annotations

import ast
import contextlib
import gc
import os
import random
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
KERNEL = frozenset({"scale"})
"""Notebooks run through a Jupyter kernel (see the module docstring)."""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, session_cache):
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    # MECHKIT_CACHE_DIR is session_cache's: the model converted once for the whole run
    if path.stem in KERNEL:
        _run_in_kernel(notebook)
    else:
        _run_in_process(notebook, path)


def test_every_kernel_notebook_exists():
    assert {p.stem for p in NOTEBOOKS} >= KERNEL


def _run_in_kernel(notebook) -> None:
    from nbclient import NotebookClient

    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors


def _run_in_process(notebook, path: Path) -> None:
    from IPython.core.formatters import DisplayFormatter

    formatter = DisplayFormatter()
    namespace: dict = {"__name__": "__main__"}
    with _process_state_restored():
        os.chdir(ROOT)  # where nbclient starts the kernel (resources' path)
        for number, cell in enumerate(notebook.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            name = f"{path.name}, cell {number}"
            tree = ast.parse(cell.source, filename=name)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            try:
                exec(compile(tree, name, "exec"), namespace)
                if last is not None:
                    value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
                    if value is not None:
                        formatter.format(value)  # what the notebook would show
            except Exception as exc:
                raise AssertionError(f"{name} failed:\n{cell.source}") from exc
    namespace.clear()
    gc.collect()


@contextlib.contextmanager
def _process_state_restored():
    """Undo what a notebook changes for the whole process."""
    import numpy as np
    import plotly.io as pio
    import torch

    saved = (
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
        torch.get_num_threads(),
        torch.random.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
        os.getcwd(),
        dict(os.environ),
        list(sys.path),
        pio.renderers.default,
    )
    try:
        with warnings.catch_warnings():  # the filters come back on exit
            yield
    finally:
        grad, dtype, threads, torch_rng, np_rng, py_rng, cwd, env, path, renderer = saved
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(torch_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
        pio.renderers.default = renderer
