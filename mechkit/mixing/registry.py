"""The registry of context-mixing methods: one module per method registers its function here
under the name users pass as ``method=`` (a duplicate name is an error, as in sae-lens).

A method is a function ``(model, run) -> LayerMaps``: it reads the prompts, the options and the
model from a :class:`MixingRun` and returns its per-layer maps and their aggregate over layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError

__all__ = ["MixingRun", "LayerMaps", "MixingMethod", "METHODS", "register"]


@dataclasses.dataclass(frozen=True, eq=False)
class MixingRun:
    """What a method reads: one slice of the prompts and the checked options.

    Attributes:
        tokens, mask: ``(batch, pos)`` ids and True at real tokens, on the model's device.
        head: the head of ``method="attention"`` (None: the mean over heads).
        answer, wrong: ``(batch,)`` token ids of the target logit (difference), or None.
        queries: the query positions wanted (flow computes only these).
        memory_budget: bytes one chunk of work may take.
        progress: show a bar on long loops.
        batch_size: copies per pass where a method runs the model on copies (value zeroing).

    Example:
        >>> run = MixingRun(tokens=torch.tensor([[1, 2]]), mask=torch.ones(1, 2, dtype=torch.bool))
        >>> run.n_pos, run.head
        (2, None)
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    head: int | None = None
    answer: Int[Tensor, " batch"] | None = None
    wrong: Int[Tensor, " batch"] | None = None
    queries: tuple[int, ...] | None = None
    memory_budget: int = 2 * 1024**3
    progress: bool = False
    batch_size: int | None = None

    @property
    def n_pos(self) -> int:
        """The prompts' padded length."""
        return int(self.tokens.shape[1])


@dataclasses.dataclass(frozen=True, eq=False)
class LayerMaps:
    """A method's answer on one slice of prompts.

    Attributes:
        maps: ``(layer, batch, query, key)`` one map per layer (``layers`` says which).
        aggregated: ``(batch, query, key)`` the map over all layers.
        aggregation: how ``aggregated`` was made, in words.
        cumulative: whether ``maps[l]`` already covers layers ``0..l`` (rollout-like).
        layers: the layer of each map.
        logit: ``(batch, query, key)`` contributions to the target logit (ALTI-Logit,
            DecompX), else None.
        logit_rest: ``(batch, query)`` the part of the logit no token carries (biases).

    Example:
        >>> lm = LayerMaps(maps=torch.ones(2, 1, 3, 3), aggregated=torch.ones(1, 3, 3),
        ...                aggregation="mean", cumulative=False, layers=(0, 1))
        >>> lm.maps.shape       # (layer, batch, query, key)
        torch.Size([2, 1, 3, 3])
    """

    maps: Float[Tensor, "layer batch query key"]
    aggregated: Float[Tensor, "batch query key"]
    aggregation: str
    cumulative: bool
    layers: tuple[int, ...]
    logit: Float[Tensor, "batch query key"] | None = None
    logit_rest: Float[Tensor, "batch query"] | None = None


MixingMethod = Callable[[Model, MixingRun], LayerMaps]

METHODS: dict[str, MixingMethod] = {}
"""Every registered method by name, in the order of registration."""


def register(name: str) -> Callable[[MixingMethod], MixingMethod]:
    """Register a method under ``name`` (a decorator); a name already taken is an error.

    Example:
        >>> @register("attention")  # doctest: +ELLIPSIS
        ... def again(model, run): ...
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidArgumentError: Expected a new method name; 'attention' is ...
    """

    def add(function: MixingMethod) -> MixingMethod:
        if name in METHODS:
            raise InvalidArgumentError(
                f"Expected a new method name; {name!r} is already registered (by "
                f"{METHODS[name].__module__}). Hint: pick another name."
            )
        METHODS[name] = function
        return function

    return add
