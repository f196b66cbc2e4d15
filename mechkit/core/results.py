"""The conventions every result object follows.

- ``.top(n=10, *, absolute=True)`` returns the ``n`` highest-ranked ``(label, score)`` pairs,
  ranked by :func:`rank`: by ``|score|`` (largest first) when ``absolute``, else by the signed
  score (largest first); ties keep their order in the result; NaN scores come last. The label is
  what identifies an entry in that result: a name from :mod:`mechkit.core.names` (``"L9H6"``),
  or for a grid of patching scores a dict of its coordinates (``{"layer": 3, "pos": 5}``).
- ``.to_dataframe()`` gives one row per entry (pandas), ``.plot()`` a plotly figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

from torch import Tensor

from mechkit.errors import InvalidArgumentError

__all__ = ["rank"]

Label = TypeVar("Label")


def rank(
    labels: Sequence[Label],
    scores: Tensor | Sequence[float],
    n: int | None = 10,
    *,
    absolute: bool = True,
) -> list[tuple[Label, float]]:
    """The ``n`` best ``(label, score)`` pairs by the rule of every ``.top`` (module docstring).

    Example:
        >>> rank(["L0H1", "L1H0", "L1H1"], [0.5, -2.0, 1.0], 2)
        [('L1H0', -2.0), ('L1H1', 1.0)]
        >>> rank(["L0H1", "L1H0", "L1H1"], [0.5, -2.0, 1.0], 2, absolute=False)
        [('L1H1', 1.0), ('L0H1', 0.5)]
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise InvalidArgumentError(
            f"Expected n to be a non-negative integer (how many entries to return); got {n!r}."
        )
    values = [
        float(v) for v in (scores.flatten().tolist() if isinstance(scores, Tensor) else scores)
    ]
    if len(values) != len(labels):
        raise InvalidArgumentError(
            f"Expected one score per label; got {len(values)} scores for {len(labels)} labels."
        )

    def key(i: int) -> tuple[int, float]:
        v = values[i]
        if math.isnan(v):
            return (1, 0.0)
        return (0, -abs(v) if absolute else -v)

    order = sorted(range(len(values)), key=key)  # sorted() is stable: ties keep their order
    if n is not None:
        order = order[:n]
    return [(labels[i], values[i]) for i in order]
