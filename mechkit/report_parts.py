"""The parts every report page is built from: a plotly figure written beside the page and
linked, and an escaped HTML table. ``make demo``'s sections, the method families' demo sections
and the paper reproductions' reports use them (``mechkit.demo`` re-exports both).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from mechkit.atomic_io import write_atomically

__all__ = ["figure_link", "html_table"]


def figure_link(out: Path, name: str, fig: Any) -> str:
    """Write plotly ``fig`` to ``out/name`` and return an HTML link to it.

    Example:
        >>> import tempfile
        >>> import plotly.graph_objects as go
        >>> figure_link(Path(tempfile.mkdtemp()), "bar.html", go.Figure(go.Bar(y=[1, 2])))
        '<a href="bar.html">bar.html</a>'
    """
    # "directory": the page loads plotly.min.js from its folder (written beside it once), so
    # the report opens offline without each figure carrying 4 MB of JavaScript.
    write_atomically(out / name, lambda tmp: fig.write_html(tmp, include_plotlyjs="directory"))
    return f'<a href="{name}">{html.escape(name)}</a>'


def html_table(rows: list[list[Any]], header: list[str]) -> str:
    """An HTML table of ``rows`` under ``header``, every cell escaped.

    Example:
        >>> html_table([[1, "<b>"]], ["n", "tag"])
        '<table><tr><th>n</th><th>tag</th></tr><tr><td>1</td><td>&lt;b&gt;</td></tr></table>'
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
