"""Execute the tutorial notebooks for the documentation, keeping the executed copies.

``make docs`` runs this before ``mkdocs build``: each notebook of ``tutorials/`` that changed
since its copy in ``build/docs-notebooks/tutorials/`` was made is executed from the repository
root (as the test suite does) and saved there, recording the digest of its source; the docs
build (``docs/hooks.py``) shows an up-to-date copy with its outputs. The committed notebooks
stay without outputs: diffs stay readable, and outputs never go stale in the repository.

The first run executes every notebook (several minutes on CPU: the SmolLM2 notebooks take 30 s
or more each); later runs only the changed ones. Plotly figures are executed with plotly's
mimetype renderer and turned into the site's own figure snippet, drawn with the plotly.js the
site ships (no CDN).

    python docs/scripts/execute_tutorials.py              # the stale ones
    python docs/scripts/execute_tutorials.py --force      # all
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))

from hooks import EXECUTED, executed_copy, figure_html, source_digest  # noqa: E402

PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _inline_figures(notebook) -> None:
    """Plotly outputs become HTML that draws them with the site's plotly.js."""
    count = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME in data:
                count += 1
                figure = data.pop(PLOTLY_MIME)
                data.pop("text/html", None)
                name = f"{notebook.metadata['mechkit']['name']}-{count}"
                data["text/html"] = figure_html(name, figure)


def execute(source: Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    start = time.perf_counter()
    notebook = nbformat.read(source, as_version=4)
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype"  # the kernel inherits it
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    notebook.metadata["mechkit"] = {"source_sha256": source_digest(source), "name": source.stem}
    _inline_figures(notebook)
    target = EXECUTED / "tutorials" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".ipynb.tmp")
    nbformat.write(notebook, tmp)
    tmp.replace(target)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="execute every notebook")
    parser.add_argument("names", nargs="*", help="notebook stems (default: all)")
    args = parser.parse_args(argv)
    for source in sorted((ROOT / "tutorials").glob("*.ipynb")):
        if args.names and source.stem not in args.names:
            continue
        if not args.force and executed_copy(source) is not None:
            print(f"{source.name}: up to date")
            continue
        print(f"{source.name}: executed in {execute(source):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
