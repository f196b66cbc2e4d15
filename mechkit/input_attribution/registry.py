"""The registry of input-attribution methods: one function per method, found by its name.

A method is a function ``(run, options) -> Scores`` registered under a key with
:func:`register`; :func:`mechkit.attribute_inputs` looks the key up (a typo gets "Did you
mean") and assembles the per-prompt scores into one :class:`~mechkit.InputAttribution`. Adding a
method is one function in one module and one decorator, never another branch of an ``if``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxtyping import Float
from torch import Tensor

from mechkit.errors import InvalidArgumentError

__all__ = ["Options", "Scores", "METHODS", "register", "READS"]


@dataclasses.dataclass(frozen=True)
class Options:
    """Every method's settings (each method reads its own; :data:`READS` says which).

    Example:
        >>> Options().n_steps, Options().quadrature
        (64, 'adaptive')
    """

    norm: str = "l2"  # saliency: the norm of the gradient over d_model
    baseline: Any = "pad"  # IG: no RMSNorm-of-zero jump at the baseline (docs page)
    n_steps: int = 64  # IG: gradient points (adaptive: the first ones, after n_steps + 1 forwards)
    quadrature: str = "adaptive"  # IG: nodes where F changes; measured gap on the docs page
    tolerance: float = 0.01  # IG adaptive: refine until |gap| <= tolerance * |F(x) - F(x')|
    max_steps: int = 1024  # IG adaptive: gradient points at most
    n_samples: int = 500  # LIME, KernelSHAP: coalitions drawn
    kernel_width: float = 0.25  # LIME: of the exponential kernel on the cosine distance
    alpha: float = 1.0  # LIME: the ridge penalty
    seed: int = 0  # LIME, KernelSHAP, random orders
    layer: int = -1  # attention: the layer read (-1: the last)
    head: int | None = None  # attention: one head, or None for the mean over heads
    max_features: int = 12  # shapley: 2**12 runs at most
    baseline_tokens: list[list[int]] | None = None  # IG: resolved baseline prompts, if any


READS: dict[str, tuple[str, ...]] = {}
"""The options each method reads, for the check that a given option is used."""


@dataclasses.dataclass(frozen=True, eq=False)
class Scores:
    """What a method returns for one prompt.

    Attributes:
        scores: ``(pos,)`` the attribution of the whole target to each prompt position.
        step_scores: ``(step, pos)`` the attribution of each step's target.
        extras: named numbers of this method (IG: ``baseline_value``, ``completeness_gap``).

    Example:
        >>> Scores(torch.zeros(3), torch.zeros(1, 3)).extras
        {}
    """

    scores: Float[Tensor, " pos"]
    step_scores: Float[Tensor, "step pos"]
    extras: dict[str, float] = dataclasses.field(default_factory=dict)


Method = Callable[..., Scores]
METHODS: dict[str, Method] = {}


def register(name: str, reads: tuple[str, ...] = ()) -> Callable[[Method], Method]:
    """Register a method under ``name`` (a duplicate key is an error), with the options it
    reads.

    Example:
        >>> "integrated_gradients" in METHODS or True
        True
    """

    def add(fn: Method) -> Method:
        if name in METHODS:
            raise InvalidArgumentError(f"Expected a new method name; {name!r} is registered.")
        METHODS[name] = fn
        READS[name] = reads
        return fn

    return add
