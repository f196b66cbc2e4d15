"""One progress bar for every long loop of the package (tqdm: a widget in notebooks, a line on
the terminal in scripts)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


class _NoBar:
    """Stands in for a bar when progress is off: the same methods, doing nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(
    total: int,
    description: str,
    *,
    enabled: bool = True,
    unit: str = "it",
    initial: int = 0,
    leave: bool = False,
) -> Any:
    """A tqdm bar over ``total`` steps, or an object with the same methods that shows nothing
    when ``enabled`` is False or there is nothing to do. Close it (or use it in ``with``).

    Example:
        >>> with progress_bar(3, "patching", enabled=False) as bar:
        ...     bar.update(3)
        >>> bar.n
        3
    """
    if not enabled or total <= 0:
        bar = _NoBar()
        bar.n = initial
        return bar
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=description, unit=unit, leave=leave, file=sys.stderr
    )
