"""Faithfulness of an input attribution, measured by erasing the tokens it ranks highest.

An explanation is faithful when the tokens it ranks highest are the ones the model needs:

- **comprehensiveness** (DeYoung et al. 2020, ERASER): ``F(x) - F(x without the top k%)``;
  high is faithful. **sufficiency**: ``F(x) - F(only the top k%)``; low is faithful. Both at
  the fractions ``(1, 5, 10, 20, 50)%``, and their AOPC is the mean over the fractions.
- **AOPC curves** (Samek et al. 2017): tokens deleted (or inserted into an empty prompt) in
  the attribution's order, most important first, at fractions 0, 10%, ..., 100% of the
  prompt; the same with random orders is the control that a method must beat.
- **sensitivity-n** (Ancona et al. 2018): over random subsets ``S`` of ``n`` tokens, the
  correlation of ``sum_{i in S} attribution_i`` with ``F(x) - F(x without S)``.

``F`` is the attribution's own target (summed over its steps); tokens are removed as the
perturbation methods remove them (deleted by default). A leading BOS is never removed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError
from mechkit.input_attribution.attribute import prompt_runs
from mechkit.input_attribution.result import InputAttribution
from mechkit.input_attribution.runs import PromptRun

__all__ = [
    "ErasureScores",
    "AOPCCurves",
    "comprehensiveness",
    "sufficiency",
    "aopc_curves",
    "sensitivity_n",
    "ERASER_FRACTIONS",
]

ERASER_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5)
AOPC_FRACTIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class ErasureScores:
    """Comprehensiveness or sufficiency per prompt and fraction.

    Attributes:
        measure: ``"comprehensiveness"`` or ``"sufficiency"``.
        fractions: the fractions of tokens kept or removed.
        per_prompt: ``(batch, fraction)`` the drop in the target.

    Example:
        >>> s = ErasureScores("sufficiency", (0.1, 0.5), torch.tensor([[1.0, 0.5]]))
        >>> s.aopc
        0.75
    """

    measure: str
    fractions: tuple[float, ...]
    per_prompt: Float[Tensor, "batch fraction"]

    @property
    def aopc(self) -> float:
        """The mean over prompts and fractions (ERASER's AOPC)."""
        return float(self.per_prompt.nanmean())


@dataclasses.dataclass(frozen=True, eq=False)
class AOPCCurves:
    """Deletion and insertion curves in the attribution's order and in random orders.

    Attributes:
        fractions: the fractions of tokens removed (inserted) at each point.
        deletion, insertion: ``(batch, fraction)`` the target with the top fraction deleted,
            and with only the top fraction present.
        random_deletion, random_insertion: the same, averaged over random orders.
        full, empty: ``(batch,)`` the target on the whole prompt and with every token removed.

    Example:
        >>> z = torch.zeros(1, 2)
        >>> c = AOPCCurves((0.0, 1.0), z, z, z, z, torch.ones(1), torch.zeros(1))
        >>> c.aopc_deletion, c.aopc_insertion
        (1.0, 0.0)
    """

    fractions: tuple[float, ...]
    deletion: Float[Tensor, "batch fraction"]
    insertion: Float[Tensor, "batch fraction"]
    random_deletion: Float[Tensor, "batch fraction"]
    random_insertion: Float[Tensor, "batch fraction"]
    full: Float[Tensor, " batch"]
    empty: Float[Tensor, " batch"]

    @property
    def aopc_deletion(self) -> float:
        """Mean of ``F(x) - F(x without the top k)``: high is faithful."""
        return float((self.full[:, None] - self.deletion).mean())

    @property
    def aopc_insertion(self) -> float:
        """Mean of ``F(only the top k) - F(empty)``: high is faithful."""
        return float((self.insertion - self.empty[:, None]).mean())

    @property
    def random_aopc_deletion(self) -> float:
        return float((self.full[:, None] - self.random_deletion).mean())

    @property
    def random_aopc_insertion(self) -> float:
        return float((self.random_insertion - self.empty[:, None]).mean())

    def plot(self) -> Any:
        """The mean curves, attribution order (solid) and random order (dotted).

        Example:
            >>> z = torch.zeros(1, 2)
            >>> c = AOPCCurves((0.0, 1.0), z, z, z, z, torch.ones(1), torch.zeros(1))
            >>> type(c.plot()).__name__
            'Figure'
        """
        import plotly.graph_objects as go

        fig = go.Figure()
        x = list(self.fractions)
        for name, curve, dash in (
            ("deletion", self.deletion, None),
            ("insertion", self.insertion, None),
            ("deletion, random order", self.random_deletion, "dot"),
            ("insertion, random order", self.random_insertion, "dot"),
        ):
            fig.add_scatter(x=x, y=curve.mean(0).tolist(), name=name, line_dash=dash)
        fig.update_layout(xaxis_title="fraction of tokens", yaxis_title="target")
        return fig


def _runs(
    model: Model,
    attribution: InputAttribution,
    removal: str | None,
    batch_size: int | None,
    memory_budget: int | str | None,
    memos: Sequence[dict[tuple[int, ...], Tensor]] | None = None,
) -> list[PromptRun]:
    """The attribution's prompt runs, limited to what it attributed; ``memos`` (one per
    prompt) are shared with other measures of attributions of the same target."""
    if attribution.unit != "token" or attribution.resolved is None:
        raise InvalidArgumentError(
            f"Expected a token-level attribution made in this session by mk.attribute_inputs "
            f"(it carries its target); got {attribution!r}. Hint: measure before .to_words(), "
            "and recompute a loaded attribution."
        )
    removal = removal or str(attribution.options.get("removal", "delete"))
    runs = prompt_runs(
        model, attribution.resolved, removal=removal, batch_size=batch_size,
        memory_budget=memory_budget,
    )  # fmt: skip
    for i, run in enumerate(runs):  # never remove what the attribution did not attribute
        run.positions = [p for p in run.positions if bool(attribution.attributed[i, p])]
        run.memo = None if memos is None else memos[i]
    return runs


def _order(attribution: InputAttribution, i: int, run: PromptRun) -> list[int]:
    """The attributed positions of prompt ``i``, highest signed score first."""
    scores = attribution.scores[i]
    return sorted(run.positions, key=lambda p: -float(scores[p]))


def _keep(run: PromptRun, removed: list[list[int]]) -> Tensor:
    n = len(run.target.prompts[run.i])
    keep = torch.ones(len(removed), n, dtype=torch.bool)
    for r, positions in enumerate(removed):
        keep[r, positions] = False
    return keep


def _count(fraction: float, n: int) -> int:
    return min(n, max(1, math.ceil(fraction * n))) if fraction > 0 else 0


def _erasure(
    model: Model,
    attribution: InputAttribution,
    fractions: Sequence[float],
    removal: str | None,
    batch_size: int | None,
    memory_budget: int | str | None,
    keep_top: bool,
    memos: Sequence[dict[tuple[int, ...], Tensor]] | None = None,
) -> Tensor:
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise InvalidArgumentError(f"Expected fractions in (0, 1]; got {fractions}.")
    runs = _runs(model, attribution, removal, batch_size, memory_budget, memos)
    out = torch.full((len(runs), len(fractions)), float("nan"))
    for i, run in enumerate(runs):
        order = _order(attribution, i, run)
        if not order:
            continue
        removed = []
        for f in fractions:
            top = order[: _count(f, len(order))]
            removed.append([p for p in order if p not in top] if keep_top else top)
        values = run.values_of_positions(_keep(run, [[], *removed])).sum(-1)
        out[i] = values[0] - values[1:]
    return out


def comprehensiveness(
    model: Model,
    attribution: InputAttribution,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    *,
    removal: str | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> ErasureScores:
    """``F(x) - F(x without the top fraction of tokens)`` per prompt and fraction (ERASER).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3, 4]], 5, method="occlusion", progress=False)
        >>> tuple(mk.comprehensiveness(model, r).per_prompt.shape)  # (batch, fraction)
        (1, 5)
    """
    per_prompt = _erasure(
        model, attribution, fractions, removal, batch_size, memory_budget, keep_top=False
    )
    return ErasureScores("comprehensiveness", tuple(fractions), per_prompt)


def sufficiency(
    model: Model,
    attribution: InputAttribution,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    *,
    removal: str | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> ErasureScores:
    """``F(x) - F(only the top fraction of tokens)`` per prompt and fraction (ERASER).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3, 4]], 5, method="occlusion", progress=False)
        >>> s = mk.sufficiency(model, r, [0.5, 1.0])
        >>> abs(float(s.per_prompt[0, 1])) < 1e-5  # keeping every token changes nothing
        True
    """
    per_prompt = _erasure(
        model, attribution, fractions, removal, batch_size, memory_budget, keep_top=True
    )
    return ErasureScores("sufficiency", tuple(fractions), per_prompt)


def aopc_curves(
    model: Model,
    attribution: InputAttribution,
    *,
    fractions: Sequence[float] = AOPC_FRACTIONS,
    n_random: int = 5,
    seed: int = 0,
    removal: str | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> AOPCCurves:
    """Deletion and insertion curves in the attribution's order and in ``n_random`` random
    orders (the control). The random orders are drawn from the prompt's attributed positions,
    not from the attribution, so every attribution of the same prompts meets the same control
    for the same ``seed``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3, 4]], 5, method="occlusion", progress=False)
        >>> c = mk.aopc_curves(model, r, n_random=2)
        >>> tuple(c.deletion.shape), c.aopc_deletion > c.random_aopc_deletion
        ((1, 11), True)
    """
    return _aopc_curves(
        model, attribution, fractions, n_random, seed, removal, batch_size, memory_budget
    )


def _aopc_curves(
    model: Model,
    attribution: InputAttribution,
    fractions: Sequence[float],
    n_random: int,
    seed: int,
    removal: str | None,
    batch_size: int | None,
    memory_budget: int | str | None,
    memos: Sequence[dict[tuple[int, ...], Tensor]] | None = None,
) -> AOPCCurves:
    fractions = tuple(float(f) for f in fractions)
    if any(not 0 <= f <= 1 for f in fractions):
        raise InvalidArgumentError(f"Expected fractions in [0, 1]; got {fractions}.")
    runs = _runs(model, attribution, removal, batch_size, memory_budget, memos)
    gen = torch.Generator().manual_seed(seed)
    shape = (len(runs), len(fractions))
    curves = {k: torch.zeros(shape) for k in ("del", "ins", "rdel", "rins")}
    full, empty = torch.zeros(len(runs)), torch.zeros(len(runs))
    for i, run in enumerate(runs):
        order = _order(attribution, i, run)
        positions = sorted(order)  # the control does not depend on the attribution
        orders = [order] + [
            [positions[k] for k in torch.randperm(len(order), generator=gen).tolist()]
            for _ in range(n_random)
        ]
        removed = [[], list(order)]  # the full prompt, the empty one
        for o in orders:
            for f in fractions:
                top = o[: _count(f, len(o))]
                removed.append(top)  # deletion
                removed.append([p for p in o if p not in top])  # insertion
        values = run.values_of_positions(_keep(run, removed)).sum(-1)
        full[i], empty[i] = values[0], values[1]
        grid = values[2:].reshape(len(orders), len(fractions), 2)
        curves["del"][i], curves["ins"][i] = grid[0, :, 0], grid[0, :, 1]
        if n_random:
            curves["rdel"][i], curves["rins"][i] = grid[1:, :, 0].mean(0), grid[1:, :, 1].mean(0)
    return AOPCCurves(
        fractions, curves["del"], curves["ins"], curves["rdel"], curves["rins"], full, empty
    )


def faithfulness_row(
    model: Model,
    attribution: InputAttribution,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    n_random: int = 5,
    *,
    memos: Sequence[dict[tuple[int, ...], Tensor]] | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> dict[str, float]:
    """The measures :func:`~mechkit.compare_input_attributions` tabulates for one attribution:
    comprehensiveness and sufficiency (AOPC over ``fractions``) and the AOPC deletion and
    insertion curves, in the attribution's order and in ``n_random`` random orders (seed 0).
    ``memos`` (one dict per prompt, shared by the attributions of one target) lets an erased
    prompt asked for twice run once.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3, 4]], 5, method="occlusion", progress=False)
        >>> row = faithfulness_row(model, r, n_random=1)
        >>> row["comprehensiveness"] == mk.comprehensiveness(model, r).aopc
        True
    """
    cost: dict[str, Any] = dict(removal=None, batch_size=batch_size, memory_budget=memory_budget)
    comp = _erasure(model, attribution, fractions, keep_top=False, memos=memos, **cost)
    suff = _erasure(model, attribution, fractions, keep_top=True, memos=memos, **cost)
    curves = _aopc_curves(model, attribution, AOPC_FRACTIONS, n_random, 0, memos=memos, **cost)
    return {
        "comprehensiveness": ErasureScores("comprehensiveness", tuple(fractions), comp).aopc,
        "sufficiency": ErasureScores("sufficiency", tuple(fractions), suff).aopc,
        "aopc_deletion": curves.aopc_deletion,
        "aopc_insertion": curves.aopc_insertion,
        "random_aopc_deletion": curves.random_aopc_deletion,
        "random_aopc_insertion": curves.random_aopc_insertion,
    }


def sensitivity_n(
    model: Model,
    attribution: InputAttribution,
    ns: Sequence[int] = (1, 2, 4),
    *,
    n_samples: int = 32,
    seed: int = 0,
    removal: str | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> dict[int, float]:
    """For each ``n``, the Pearson correlation (mean over prompts) between the attribution
    summed over a random subset of ``n`` tokens and the target's drop when they are removed.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3, 4, 5]], 6, method="shapley", progress=False)
        >>> s = mk.sensitivity_n(model, r, [1], n_samples=8)
        >>> list(s), -1.0 <= s[1] <= 1.0
        ([1], True)
    """
    runs = _runs(model, attribution, removal, batch_size, memory_budget)
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, float] = {}
    for n in ns:
        corrs = []
        for i, run in enumerate(runs):
            positions = run.positions
            if len(positions) < max(n, 2):
                continue
            subsets = [
                [positions[k] for k in torch.randperm(len(positions), generator=gen)[:n].tolist()]
                for _ in range(n_samples)
            ]
            values = run.values_of_positions(_keep(run, [[], *subsets])).sum(-1).double()
            drop = values[0] - values[1:]
            summed = torch.tensor([float(attribution.scores[i, s].sum()) for s in subsets])
            corrs.append(_pearson(summed.double(), drop))
        finite = [c for c in corrs if not math.isnan(c)]
        out[int(n)] = sum(finite) / len(finite) if finite else float("nan")
    return out


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float("nan") if denom == 0 else float(a @ b) / denom
