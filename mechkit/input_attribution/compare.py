"""Every input-attribution method on the same prompts: faithfulness and agreement side by side.

:func:`compare_input_attributions` runs each method, measures comprehensiveness, sufficiency
(their AOPC over ERASER's fractions), the AOPC deletion and insertion curves against random
orders, and the rank correlation (Spearman, over each prompt's attributed tokens, averaged over
prompts) between every two methods.

Every method explains the same resolved target, so an erased prompt that several measures or
methods ask for (the full and the empty prompt, the random control, the same top tokens) runs
once; the numbers are those of the measures called one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, check_choice
from mechkit.input_attribution.attribute import attribute_inputs
from mechkit.input_attribution.faithfulness import ERASER_FRACTIONS, faithfulness_row
from mechkit.input_attribution.registry import METHODS
from mechkit.input_attribution.result import InputAttribution

__all__ = ["InputAttributionComparison", "compare_input_attributions", "DEFAULT_METHODS"]

DEFAULT_METHODS: tuple[str, ...] = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "occlusion",
    "kernel_shap",
    "lime",
    "attention",
)
MEASURES: tuple[str, ...] = (
    "comprehensiveness",
    "sufficiency",
    "aopc_deletion",
    "aopc_insertion",
    "random_aopc_deletion",
    "random_aopc_insertion",
)


@dataclasses.dataclass(frozen=True, eq=False)
class InputAttributionComparison:
    """Methods compared on the same prompts.

    Attributes:
        methods: the method names, in order.
        attributions: ``method -> InputAttribution``.
        table: ``method -> {measure: value}`` (comprehensiveness and sufficiency as AOPC over
            the ERASER fractions; AOPC deletion and insertion; the same in random orders).
        correlations: ``(method, method)`` mean Spearman correlation of the token rankings.

    Example:
        >>> table = {"a": {"comprehensiveness": 0.1}, "b": {"comprehensiveness": 0.3}}
        >>> c = InputAttributionComparison(["a", "b"], {}, table, torch.eye(2))
        >>> c.top(1)
        [('b', 0.3)]
    """

    methods: list[str]
    attributions: dict[str, InputAttribution]
    table: dict[str, dict[str, float]]
    correlations: Float[Tensor, "method method"]

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The methods ranked by comprehensiveness (the most faithful first)."""
        scores = [self.table[m].get("comprehensiveness", float("nan")) for m in self.methods]
        return rank(self.methods, scores, n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per method, one column per measure.

        Example:
            >>> c = InputAttributionComparison(["a"], {}, {"a": {"sufficiency": 0.2}},
            ...                                torch.eye(1))
            >>> float(c.to_dataframe().loc["a", "sufficiency"])
            0.2
        """
        import pandas as pd

        frame = pd.DataFrame([self.table[m] for m in self.methods], index=self.methods)
        frame.index.name = "method"
        return frame

    def plot(self) -> Any:
        """Two panels: the measures per method (bars) and the rank correlations (heatmap).

        Example:
            >>> c = InputAttributionComparison(["a"], {}, {"a": {"sufficiency": 0.2}},
            ...                                torch.eye(1))
            >>> type(c.plot()).__name__
            'Figure'
        """
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1, cols=2, subplot_titles=("faithfulness", "Spearman between methods")
        )
        measures = [m for m in MEASURES if any(m in self.table[k] for k in self.methods)]
        for measure in measures:
            fig.add_bar(
                x=self.methods, y=[self.table[k].get(measure) for k in self.methods],
                name=measure, row=1, col=1,
            )  # fmt: skip
        fig.add_heatmap(
            z=self.correlations.tolist(), x=self.methods, y=self.methods, zmin=-1, zmax=1,
            colorscale="RdBu", reversescale=True, row=1, col=2, showscale=False,
        )  # fmt: skip
        fig.update_layout(barmode="group", title="Input attribution methods compared")
        return fig

    def __repr__(self) -> str:
        return f"InputAttributionComparison({self.methods})"


def compare_input_attributions(
    model: Model,
    prompts: Any,
    target: Any = None,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    n_random: int = 5,
    removal: str = "delete",
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
) -> InputAttributionComparison:
    """Run each method of ``methods`` on the same prompts and target and compare them.

    Args:
        model, prompts, target: as for :func:`~mechkit.attribute_inputs`.
        methods: registered method names.
        options: per method, more keyword arguments of :func:`~mechkit.attribute_inputs`
            (``{"lime": {"n_samples": 200}}``).
        fractions: comprehensiveness and sufficiency fractions (ERASER's by default).
        n_random: random orders of the AOPC control.
        removal: how tokens are removed, by the methods and by the measures.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> c = mk.compare_input_attributions(model, [[1, 2, 3, 4]], 5,
        ...     methods=["occlusion", "saliency"], progress=False)
        >>> tuple(c.correlations.shape), sorted(c.table["occlusion"])[:2]
        ((2, 2), ['aopc_deletion', 'aopc_insertion'])
    """
    methods = list(methods)
    if not methods:
        raise InvalidArgumentError("Expected at least one method to compare; got none.")
    for m in methods:
        check_choice("methods", m, list(METHODS))
    options = dict(options or {})
    for m in options:
        check_choice("options", m, methods)
    found: dict[str, InputAttribution] = {}
    table: dict[str, dict[str, float]] = {}
    cost: dict[str, Any] = dict(batch_size=batch_size, memory_budget=memory_budget)
    memos: list[dict[tuple[int, ...], Tensor]] = []  # per prompt: erased prompt -> target
    with progress_bar(len(methods), "methods", enabled=progress, unit="method") as bar:
        for m in methods:
            bar.set_description(m)
            r = attribute_inputs(
                model, prompts, target, method=m, removal=removal, progress=False,
                **cost, **dict(options.get(m, {})),
            )  # fmt: skip
            if not found:  # the first method resolves the target; the others explain it
                target = r.resolved
                memos = [{} for _ in range(r.n_prompts)]
            found[m] = r
            table[m] = faithfulness_row(model, r, fractions, n_random, memos=memos, **cost)
            bar.update(1)
    corr = torch.eye(len(methods), dtype=torch.float64)
    for a in range(len(methods)):
        for b in range(a + 1, len(methods)):
            corr[a, b] = corr[b, a] = rank_correlation(found[methods[a]], found[methods[b]])
    return InputAttributionComparison(methods, found, table, corr)


def rank_correlation(a: InputAttribution, b: InputAttribution) -> float:
    """Spearman's correlation of two attributions' scores over each prompt's attributed tokens,
    averaged over prompts (prompts with fewer than 2 tokens, or a constant score, are skipped).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3, 4]], 5, method="occlusion", progress=False)
        >>> rank_correlation(r, r)
        1.0
    """
    from scipy.stats import spearmanr  # type: ignore[import-untyped]

    values = []
    for i in range(a.n_prompts):
        keep = a.attributed[i] & b.attributed[i]
        x, y = a.scores[i][keep], b.scores[i][keep]
        if x.numel() < 2 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
            continue
        values.append(float(spearmanr(x.tolist(), y.tolist()).statistic))
    return sum(values) / len(values) if values else float("nan")
