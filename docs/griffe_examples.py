"""A griffe extension: ``Example:`` sections of our docstrings render as examples.

mechkit's Google-style docstrings head their runnable examples ``Example:``; griffe knows only
``Examples:`` as the section of ``>>>`` blocks (it reads any other heading as an admonition of
Markdown, where ``x[0][1]`` is a broken link). This renames the heading before parsing; the code
is unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _HEADING.sub(r"\1Examples:", docstring.value)
