"""The registry of edge-attribution methods, as auto-circuit registers its pruning algorithms.

A method is one function in its own module under :mod:`mechkit.graph.methods`, registered with
:func:`register_edge_method`; :func:`mechkit.edge_attribution` looks it up by name in
:data:`EDGE_METHODS` (unknown names get a "Did you mean"). To add a method (CD-T, another EAP
variant), write ``mechkit/graph/methods/my_method.py``::

    @register_edge_method("my-method", description="...", paper="...", options={"steps": 5})
    def my_method(model, setup, *, progress, steps):
        ...  # score every edge of setup.layout on setup's prompts
        return EdgeScores(scores, clean_score, detail=f"{steps} steps")

and import it in ``mechkit/graph/methods/__init__.py``. The function gets the model, an
:class:`~mechkit.graph.setup.EdgeSetup` (the clean prompts, the metric, every sender's clean and
ablated output, batch size and memory budget), ``progress``, and its options (the defaults
given at registration, or the user's values); it returns an :class:`EdgeScores`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jaxtyping import Float
from torch import Tensor

from mechkit.errors import InvalidArgumentError, check_choice

__all__ = [
    "EdgeScores",
    "EdgeMethod",
    "EdgeMethodRegistry",
    "EDGE_METHODS",
    "register_edge_method",
    "unregister_edge_method",
]


@dataclasses.dataclass(frozen=True)
class EdgeScores:
    """What a method returns.

    Attributes:
        scores: ``(sender, receiver)`` estimated change of the metric when the edge alone
            carries the ablated value (entries that are no edge are zeroed afterwards).
        clean_score: the metric on the clean prompts.
        detail: shown after the method's name in the graph's ``method`` (``"5 steps"``).

    Example:
        >>> EdgeScores(torch.zeros(2, 3), 1.5).clean_score
        1.5
    """

    scores: Float[Tensor, "sender receiver"]
    clean_score: float
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class EdgeMethod:
    """A registered method: its name, the function, a one-line description, the paper, and its
    options with their defaults.

    Example:
        >>> EDGE_METHODS["eap"].paper
        'Syed et al. 2023, Attribution Patching Outperforms Automated Circuit Discovery'
    """

    name: str
    function: Callable[..., EdgeScores]
    description: str
    paper: str = ""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class EdgeMethodRegistry(Mapping[str, EdgeMethod]):
    """Name -> :class:`EdgeMethod`, in registration order. A duplicate name is refused; an
    unknown one raises with the registered names and a "Did you mean".

    Example:
        >>> list(EDGE_METHODS)
        ['cd-t', 'eap', 'eap-ig-activations', 'eap-ig-inputs', 'exact']
        >>> EDGE_METHODS["eap-ig"]
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidArgumentError: Expected method to be one of ...
    """

    def __init__(self) -> None:
        self._methods: dict[str, EdgeMethod] = {}

    def __getitem__(self, name: str) -> EdgeMethod:
        check_choice("method", name, list(self._methods))
        return self._methods[name]

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def add(self, method: EdgeMethod) -> None:
        if not isinstance(method.name, str) or not method.name:
            raise InvalidArgumentError(f"Expected a method name (a string); got {method.name!r}.")
        if method.name in self._methods:
            raise InvalidArgumentError(
                f"Expected a new edge-attribution method name; {method.name!r} is registered "
                f"already ({self._methods[method.name].description}). Hint: "
                "unregister_edge_method first to replace it."
            )
        self._methods[method.name] = method

    def remove(self, name: str) -> EdgeMethod:
        method = self[name]
        del self._methods[name]
        return method

    def to_dataframe(self) -> Any:
        """One row per method: name, description, paper, options.

        Example:
            >>> EDGE_METHODS.to_dataframe()["name"].tolist()
            ['cd-t', 'eap', 'eap-ig-activations', 'eap-ig-inputs', 'exact']
        """
        import pandas as pd

        return pd.DataFrame([
            {"name": m.name, "description": m.description, "paper": m.paper,
             "options": dict(m.options)}
            for m in self._methods.values()
        ])  # fmt: skip

    def __repr__(self) -> str:
        return f"EdgeMethodRegistry({list(self._methods)})"


EDGE_METHODS = EdgeMethodRegistry()
"""Every edge-attribution method :func:`mechkit.edge_attribution` knows, by name."""


def register_edge_method(
    name: str,
    *,
    description: str,
    paper: str = "",
    options: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., EdgeScores]], Callable[..., EdgeScores]]:
    """A decorator that registers an edge-attribution method under ``name`` (module docstring).

    Args:
        name: what users pass as ``method=``.
        description: one line on what it computes.
        paper: the paper it follows.
        options: the keyword options the function takes, with their defaults.

    Example:
        >>> @register_edge_method("constant", description="every edge scores 1")
        ... def constant(model, setup, *, progress):
        ...     return EdgeScores(torch.ones(setup.layout.valid.shape), 0.0)
        >>> "constant" in EDGE_METHODS
        True
        >>> _ = unregister_edge_method("constant")
    """

    def register(function: Callable[..., EdgeScores]) -> Callable[..., EdgeScores]:
        EDGE_METHODS.add(EdgeMethod(name, function, description, paper, dict(options or {})))
        return function

    return register


def unregister_edge_method(name: str) -> EdgeMethod:
    """Remove a method from :data:`EDGE_METHODS` and return it.

    Example:
        >>> _ = register_edge_method("zeros", description="no edge matters")(
        ...     lambda model, setup, *, progress: EdgeScores(0 * setup.layout.valid, 0.0))
        >>> unregister_edge_method("zeros").description, "zeros" in EDGE_METHODS
        ('no edge matters', False)
    """
    return EDGE_METHODS.remove(name)
