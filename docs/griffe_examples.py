"""A griffe extension: our docstrings, written for Sphinx-style readers, rendered by mkdocstrings.

Three rewrites before griffe parses a docstring; the code is unchanged:

- ``Example:`` sections become ``Examples:``. griffe knows only the latter as the section of
  ``>>>`` blocks and reads any other heading as an admonition of Markdown, where ``x[0][1]`` is
  a broken link.
- Sphinx roles (``:class:`~mechkit.PatchResult```, ``:func:`load_sae```) become inline code.
- reStructuredText simple tables (``====  ====`` borders) become Markdown tables; in Markdown a
  border line under text would make a heading.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")
_BORDER = re.compile(r"^(\s*)=+(?: +=+)+\s*$")


def _role(match: re.Match[str]) -> str:
    return f"`{match.group(1)}`"


def _cells(line: str, starts: list[int]) -> list[str]:
    """A row's cells: each run of words (split by two spaces or more) in the column it starts in
    (text may run past a column's border, as it does in our docstrings)."""
    cells = [""] * len(starts)
    for word in re.finditer(r"\S+(?: \S+)*", line):
        column = max([k for k, start in enumerate(starts) if start <= word.start()] or [0])
        cells[column] = f"{cells[column]} {word.group()}".strip()
    return cells


def _markdown_table(indent: str, header: list[str] | None, rows: list[list[str]]) -> list[str]:
    def row(cells: list[str]) -> str:
        return indent + "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    width = len(rows[0]) if rows else len(header or [])
    lines = [row(header or [""] * width), indent + "|" + "---|" * width]
    return lines + [row(cells) for cells in rows]


def rst_tables(text: str) -> str:
    """Every reStructuredText simple table in ``text`` as a Markdown table."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        match = _BORDER.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]
        groups: list[list[str]] = [[]]  # lines between borders
        j = i + 1
        while j < len(lines):
            if _BORDER.match(lines[j]):
                nxt = lines[j + 1] if j + 1 < len(lines) else ""
                if len(groups) == 1 and nxt.strip() and not _BORDER.match(nxt):
                    groups.append([])  # a header border: the body follows
                    j += 1
                    continue
                break
            groups[-1].append(lines[j])
            j += 1
        header = None
        if len(groups) == 2:
            cells = [_cells(line, starts) for line in groups[0]]
            header = [" ".join(column) for column in zip(*cells, strict=True)]
        rows: list[list[str]] = []
        for line in groups[-1]:
            if not line.strip():
                continue
            cells = _cells(line, starts)
            if rows and not cells[0]:  # a continuation line
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
        out.extend(["", *_markdown_table(match.group(1), header, rows), ""])
        i = j + 1
    return "\n".join(out)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is None:
            return
        value = _HEADING.sub(r"\1Examples:", docstring.value)
        value = _ROLE.sub(_role, value)
        if "==" in value:
            value = rst_tables(value)
        docstring.value = value
