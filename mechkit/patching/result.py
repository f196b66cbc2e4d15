"""PatchResult: the scores of a patching sweep, with their axes, labels and baselines."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.names import head_name, neuron_name
from mechkit.core.results import rank
from mechkit.errors import InvalidArgumentError, ShapeError

__all__ = ["PatchResult"]


@dataclasses.dataclass(frozen=True, eq=False)
class PatchResult:
    """Scores of patched runs, laid out like the matching ``transformer_lens.patching`` result.

    Attributes:
        scores: the metric after each patch, one axis per entry of ``axes`` (e.g.
            ``(layer, pos)`` for the residual stream, ``(layer, head)`` for heads over all
            positions).
        per_prompt: the same with a trailing ``prompt`` axis, or None when the metric gives
            only a mean.
        axes: the axis names, e.g. ``("layer", "pos")``.
        labels: for each axis, the value of each index (layer numbers, positions, heads...).
        tick_labels: for each axis, display labels (positions show their token).
        clean_score, corrupt_score: the metric on the unpatched clean and corrupt runs (None
            when the run has no such side, e.g. a zero ablation has no corrupt run).
        method: how values were patched: ``denoising``, ``noising``, ``zero``, ``mean`` or
            ``resample``.
        site: the component patched (``resid_pre``, ``z``...) or ``sites`` for a list.
        metric_name: the metric's name, for titles.
        estimator: ``"activation patching"`` (each cell run for real) or ``"attribution
            patching"`` (each cell's score estimated to first order from one gradient:
            :func:`mechkit.attribution_patch`).

    Example:
        >>> r = PatchResult(scores=torch.tensor([[0.2, 0.9]]), per_prompt=None,
        ...                 axes=("layer", "head"), labels={"layer": [1], "head": [0, 1]},
        ...                 tick_labels={"layer": ["L1"], "head": ["H0", "H1"]}, clean_score=1.0,
        ...                 corrupt_score=0.0, method="denoising", site="z", metric_name="m")
        >>> r
        PatchResult(activation patching: denoising z, layer=1, head=2, metric=m, clean=1, corrupt=0)
        >>> r.base_score, r.normalized().scores.tolist()
        (0.0, [[0.20000000298023224, 0.8999999761581421]])
    """

    scores: Float[Tensor, "*axes"]
    per_prompt: Float[Tensor, "*axes prompt"] | None
    axes: tuple[str, ...]
    labels: dict[str, list[Any]]
    tick_labels: dict[str, list[str]]
    clean_score: float | None
    corrupt_score: float | None
    method: str
    site: str
    metric_name: str
    estimator: str = "activation patching"

    def __post_init__(self) -> None:
        expected = tuple(len(self.labels[a]) for a in self.axes)
        if tuple(self.scores.shape) != expected:
            raise ShapeError(
                f"PatchResult scores have shape {tuple(self.scores.shape)}; the labels of axes "
                f"{self.axes} give {expected}."
            )

    @property
    def base_score(self) -> float | None:
        """The metric on the run that was patched (corrupt when denoising, clean otherwise)."""
        return self.corrupt_score if self.method == "denoising" else self.clean_score

    def normalized(self) -> PatchResult:
        """Scores as ``(s - corrupt) / (clean - corrupt)``: 1 = clean behaviour, 0 = corrupt.

        Raises:
            InvalidArgumentError: (a ValueError) there is no corrupt run, or clean and corrupt
                scores are equal.

        Example:
            >>> r = PatchResult(scores=torch.tensor([3.0, 5.0]), per_prompt=None,
            ...                 axes=("layer",), labels={"layer": [0, 1]},
            ...                 tick_labels={"layer": ["L0", "L1"]}, clean_score=5.0,
            ...                 corrupt_score=1.0, method="denoising", site="z", metric_name="m")
            >>> r.normalized().scores
            tensor([0.5000, 1.0000])
        """
        if self.clean_score is None or self.corrupt_score is None:
            raise InvalidArgumentError(
                f"Expected clean and corrupt scores to normalize by; this {self.method} result "
                "has no corrupt run. Hint: compare scores with result.clean_score instead."
            )
        span = self.clean_score - self.corrupt_score
        if span == 0:
            raise InvalidArgumentError(
                "Expected clean and corrupt scores that differ; they are equal, so normalized "
                "scores are undefined."
            )
        per_prompt = None
        if self.per_prompt is not None:
            per_prompt = (self.per_prompt - self.corrupt_score) / span
        return dataclasses.replace(
            self,
            scores=(self.scores - self.corrupt_score) / span,
            per_prompt=per_prompt,
            clean_score=1.0,
            corrupt_score=0.0,
            metric_name=f"normalized {self.metric_name}",
        )

    def top(
        self, n: int = 10, *, absolute: bool = True, by_abs: bool | None = None
    ) -> list[tuple[dict[str, Any], float]]:
        """The ``n`` cells that moved the metric most from the patched run's own score, as
        ``(cell, score)`` pairs: ``cell`` is a dict of the cell's labels (``{"layer": 1,
        "head": 5}``), ``score`` the metric after the patch.

        Cells are ranked by :func:`~mechkit.core.rank`'s rule applied to their effect,
        ``score - base_score`` (the change the patch made): by ``|effect|`` when ``absolute``,
        else by the signed effect, largest first; ties keep the grid's order, NaN comes last.
        ``by_abs`` is the old name of ``absolute`` (deprecated).

        Example:
            >>> r = PatchResult(scores=torch.tensor([0.5, 3.0, -1.0]), per_prompt=None,
            ...                 axes=("layer",), labels={"layer": [0, 1, 2]},
            ...                 tick_labels={"layer": ["L0", "L1", "L2"]}, clean_score=1.0,
            ...                 corrupt_score=0.0, method="noising", site="z", metric_name="m")
            >>> r.top(2)
            [({'layer': 1}, 3.0), ({'layer': 2}, -1.0)]
            >>> r.top(2, absolute=False)
            [({'layer': 1}, 3.0), ({'layer': 0}, 0.5)]
        """
        if by_abs is not None:
            warnings.warn(
                "PatchResult.top(by_abs=...) is deprecated; use absolute=...",
                DeprecationWarning,
                stacklevel=2,
            )
            absolute = by_abs
        base = self.base_score if self.base_score is not None else 0.0
        flat = self.scores.flatten()
        order = rank(range(flat.numel()), flat - base, n, absolute=absolute)
        return [(self.cell(index), float(flat[index])) for index, _ in order]

    def cell(self, index: int) -> dict[str, Any]:
        """The labels of the cell at ``index`` of the flattened scores.

        Example:
            >>> r = PatchResult(scores=torch.zeros(2, 3), per_prompt=None, axes=("layer", "head"),
            ...                 labels={"layer": [0, 1], "head": [0, 1, 2]},
            ...                 tick_labels={"layer": ["L0", "L1"], "head": ["H0", "H1", "H2"]},
            ...                 clean_score=None, corrupt_score=None, method="zero", site="z",
            ...                 metric_name="m")
            >>> r.cell(4)
            {'layer': 1, 'head': 1}
        """
        where = torch.unravel_index(torch.tensor(index), self.scores.shape)
        return {a: self.labels[a][int(i)] for a, i in zip(self.axes, where, strict=True)}

    def to_dataframe(self) -> Any:
        """One row per cell: a column per axis, ``name`` for cells of one head or neuron
        (``L1H5``, ``L3N12``), ``score``, and ``prompt_<i>`` columns.

        Example:
            >>> r = PatchResult(scores=torch.tensor([[0.5, 2.0]]), per_prompt=None,
            ...                 axes=("layer", "head"), labels={"layer": [1], "head": [0, 5]},
            ...                 tick_labels={"layer": ["L1"], "head": ["H0", "H5"]},
            ...                 clean_score=None, corrupt_score=None, method="zero", site="z",
            ...                 metric_name="m")
            >>> r.to_dataframe()
               layer  head  name  score
            0      1     0  L1H0    0.5
            1      1     5  L1H5    2.0
        """
        import pandas as pd

        grids = torch.meshgrid(
            *[torch.arange(len(self.labels[a])) for a in self.axes], indexing="ij"
        )
        data: dict[str, Any] = {}
        for axis, grid in zip(self.axes, grids, strict=True):
            data[axis] = [self.labels[axis][i] for i in grid.flatten().tolist()]
            if axis in ("pos", "dest_pos", "src_pos"):
                data[f"{axis}_label"] = [self.tick_labels[axis][i] for i in grid.flatten().tolist()]
        if "layer" in data and ("head" in data or "neuron" in data):  # the one naming scheme
            inner = "head" if "head" in data else "neuron"
            write = head_name if inner == "head" else neuron_name
            data["name"] = [write(a, b) for a, b in zip(data["layer"], data[inner], strict=True)]
        data["score"] = self.scores.flatten().tolist()
        if self.per_prompt is not None:
            flat = self.per_prompt.reshape(-1, self.per_prompt.shape[-1])
            for i in range(flat.shape[1]):
                data[f"prompt_{i}"] = flat[:, i].tolist()
        return pd.DataFrame(data)

    def plot(self, *, title: str | None = None) -> Any:
        """A plotly figure: a bar chart (one axis), a heatmap (two), frames over the rest.

        Example:
            >>> r = PatchResult(scores=torch.zeros(2, 3), per_prompt=None, axes=("layer", "head"),
            ...                 labels={"layer": [0, 1], "head": [0, 1, 2]},
            ...                 tick_labels={"layer": ["L0", "L1"], "head": ["H0", "H1", "H2"]},
            ...                 clean_score=None, corrupt_score=None, method="zero", site="z",
            ...                 metric_name="m")
            >>> r.plot().data[0].type
            'heatmap'
        """
        import plotly.express as px

        name = title or f"{self.method} {self.site}: {self.metric_name}"
        if title is None and self.estimator != "activation patching":
            name = f"{self.estimator}, {name}"
        z = self.scores.float()
        base = self.base_score
        color = {"color_continuous_scale": "RdBu", "color_continuous_midpoint": base or 0.0}
        if z.ndim == 0:
            return px.bar(x=[self.site], y=[float(z)], title=name)
        if z.ndim == 1:
            axis = self.axes[0]
            fig = px.bar(x=self.tick_labels[axis], y=z.numpy(), title=name)
            fig.update_layout(xaxis_title=axis, yaxis_title=self.metric_name)
            if base is not None:
                fig.add_hline(y=base, line_dash="dot", annotation_text="unpatched")
            return fig
        rows, cols = self.axes[0], self.axes[-1]
        extra = self.axes[1:-1]
        if not extra:
            fig = px.imshow(
                z.numpy(),
                x=self.tick_labels[cols],
                y=self.tick_labels[rows],
                labels={"x": cols, "y": rows, "color": self.metric_name},
                aspect="auto",
                title=name,
                **color,
            )
            return fig
        # three or more axes: the first and last as the heatmap, frames over the middle one
        # (flattened when there are several), e.g. (layer, pos, head) -> layer x head per pos
        middle = z.movedim(0, -2).reshape(-1, z.shape[0], z.shape[-1])  # (frames, rows, cols)
        frames = [" ".join(str(t) for t in combo) for combo in _product(self.tick_labels, extra)]
        fig = px.imshow(
            middle.numpy(),
            x=self.tick_labels[cols],
            y=self.tick_labels[rows],
            animation_frame=0,
            labels={"x": cols, "y": rows, "color": self.metric_name, "animation_frame": extra[0]},
            aspect="auto",
            title=name,
            **color,
        )
        for step, label in zip(fig.layout.sliders[0].steps, frames, strict=False):
            step.label = label
        return fig

    def __repr__(self) -> str:
        shape = ", ".join(f"{a}={len(self.labels[a])}" for a in self.axes)
        return (
            f"PatchResult({self.estimator}: {self.method} {self.site}, {shape}, "
            f"metric={self.metric_name}, "
            f"clean={_fmt(self.clean_score)}, corrupt={_fmt(self.corrupt_score)})"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _product(tick_labels: dict[str, list[str]], axes: tuple[str, ...]) -> list[tuple[str, ...]]:
    return list(itertools.product(*[tick_labels[a] for a in axes]))
