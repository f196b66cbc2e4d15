"""Attribution patching: every activation patch of a sweep estimated from one gradient.

Activation patching runs one forward pass per patched cell. Attribution patching (Nanda 2023;
Syed et al. 2023; Kramár et al. 2024) replaces each run by the first-order Taylor term around the
run being patched::

    M(patched) ~= M(base) + (a_source - a_base) . dM/da |base

so the whole sweep costs the source run, the base run and one backward pass. ``a_base`` is the
activation on the run that is patched (corrupt when denoising, clean when noising or ablating),
``a_source`` the value patched in (clean, corrupt, zero, the mean). The estimate is exact for
activations the metric depends on linearly and poor where it is not: the residual stream of
layer 0, MLP 0, and attention whose softmax saturates (Kramár et al.); :func:`compare_attribution`
measures, on the user's own task, how far the estimate is from the real patch.

:func:`attribution_patch` takes the arguments of :func:`mechkit.activation_patch` and returns a
:class:`~mechkit.PatchResult` with the same axes, the same clean and corrupt scores and the same
``normalized()``, so the two can be compared cell by cell.

    >>> est = mk.attribution_patch(model, pairs, site="z")  # (layer, head) as activation_patch
    >>> real = mk.activation_patch(model, pairs, site="z")
    >>> cmp = mk.compare_attribution(model, pairs, site="z")   # correlation, worst cells
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mechkit.errors import (
    InvalidArgumentError,
    InvalidSiteError,
    InvalidTypeError,
    ShapeError,
    check_batch_size,
)
from mechkit.hook_scope import hook_scope
from mechkit.patching.activation import (
    _metric_name,
    _plan_cells,
    _site_name,
    _source_acts,
    _tick_labels,
    activation_patch,
    resolve_inputs,
)
from mechkit.patching.result import PatchResult
from mechkit.sites import Site

__all__ = ["attribution_patch", "compare_attribution", "AttributionComparison"]


def attribution_patch(
    model: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    site: str | Site | Sequence[Site] = "resid_pre",
    positions: Literal["each", "all"] | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    direction: Literal["denoising", "noising"] | None = None,
    ablation: Literal["zero", "mean", "resample"] | None = None,
    reference: Any = None,
    seed: int = 0,
    batch_size: int | None = None,
) -> PatchResult:
    """Estimate every patch of a sweep by attribution patching (2 forward + 1 backward pass).

    Takes the arguments of :func:`mechkit.activation_patch` (``site``, ``positions``,
    ``layers``, ``heads``, ``neurons``, ``direction``, ``ablation``, ``reference``, ``seed``)
    and returns its layout; each score is ``M(base) + sum((a_source - a_base) * dM/da)`` over
    the cell's slice of the activation.

    Args:
        model: a HookedTransformer.
        clean, corrupt, metric: as for :func:`mechkit.activation_patch`. The metric must be
            differentiable (every mechkit metric is).
        batch_size: prompts per forward/backward pass (None: all at once). Scores are summed
            over batches exactly, weighted by their size.

    Returns:
        A :class:`PatchResult` with ``estimator="attribution patching"``.

    Example:
        >>> r = mk.attribution_patch(model, pairs, site="z")
        >>> r.scores.shape                      # (layer, head)
        >>> r.normalized().top(5)
    """
    batch_size = check_batch_size(batch_size)
    setup = resolve_inputs(model, clean, corrupt, metric, direction, ablation, reference)
    seq = setup.base_tokens.shape[1]
    axes, labels, cells = _plan_cells(model, site, positions, layers, heads, neurons, seq)
    names = sorted({cell.site.hook_name for cell in cells})
    n_batch = setup.base_tokens.shape[0]
    size = batch_size or n_batch

    products: dict[str, list[Tensor]] = {name: [] for name in names}  # (batch, ...) each
    base_values, other_values = [], []
    reader_metric = setup.metric
    for start in range(0, n_batch, size):
        rows = slice(start, min(start + size, n_batch))
        part = _select(setup, rows, reader_metric)
        grads, base_acts, base_per_prompt = _gradients(model, part, names)
        sources, other_logits = _source_acts(
            model, part, set(names), _ActsView(base_acts, part), seed
        )
        if other_logits is not None:
            with torch.no_grad():
                other_values.append(_metric_value(part.metric, other_logits)[1])
        for name in names:
            delta = sources[name].expand_as(base_acts[name]) - base_acts[name]
            # the metric is a mean over the batch: one prompt's own effect is n times its share
            products[name].append(delta * grads[name] * (rows.stop - rows.start))
        base_values.append(base_per_prompt)

    per_prompt_base = torch.cat(base_values)
    base_score = float(per_prompt_base.mean())
    shape = tuple(len(labels[a]) for a in axes)
    per_prompt = torch.full((*shape, n_batch), float("nan"))
    full = {name: torch.cat(parts).float().cpu() for name, parts in products.items()}
    for cell in cells:
        prod = full[cell.site.hook_name]
        selected = prod[cell.site.index(prod.ndim)]  # (batch, ...)
        per_prompt[cell.index] = selected.reshape(n_batch, -1).sum(-1) + per_prompt_base
    scores = per_prompt.mean(-1)
    other = float(torch.cat(other_values).mean()) if other_values else None
    clean_score, corrupt_score = _clean_and_corrupt_scores(model, setup, base_score, other)
    return PatchResult(
        scores=scores,
        per_prompt=per_prompt,
        axes=axes,
        labels=labels,
        tick_labels=_tick_labels(model, axes, labels, setup.clean_tokens),
        clean_score=clean_score,
        corrupt_score=corrupt_score,
        method=setup.method,
        site=_site_name(site),
        metric_name=_metric_name(setup.metric),
        estimator="attribution patching",
    )


# ----------------------------------------------------------------------------------- gradients


class _ActsView:
    """The part of a base run :func:`_source_acts` reads: its activations and token shape."""

    def __init__(self, acts: dict[str, Tensor], setup: Any) -> None:
        self.acts = acts
        self.tokens = setup.base_tokens


def _select(setup: Any, rows: slice, metric: Any) -> Any:
    """The setup restricted to ``rows`` of the batch (metric and reference prompts included)."""
    n = setup.base_tokens.shape[0]
    if rows.start == 0 and rows.stop == n:
        return setup
    from mechkit.metrics import Metric

    if not isinstance(metric, Metric):
        raise InvalidTypeError(
            "Expected a mechkit Metric (which can be restricted to a batch) when batch_size "
            f"splits the prompts; got {type(metric).__name__}. Hint: pass batch_size=None, or a "
            "metric built from the prompts (mk.LogitDiff.from_pairs(pairs))."
        )

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[rows]

    changes = {
        "base_tokens": setup.base_tokens[rows],
        "source_tokens": cut(setup.source_tokens),
        "clean_tokens": setup.clean_tokens[rows],
        "corrupt_tokens": cut(setup.corrupt_tokens),
        "metric": metric.select(rows),
    }
    if setup.method == "resample":
        raise InvalidArgumentError(
            "Expected batch_size=None for resample ablation (each prompt draws from the whole "
            "reference set); got a batch size that splits the prompts."
        )
    return dataclasses.replace(setup, **changes)


def _gradients(
    model: Any, setup: Any, names: list[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """dM/da at every hook of ``names`` on the base run, the activations, and the per-prompt
    metric of the base run. Parameters get no ``.grad``: only the hooked activations are
    differentiated (``torch.autograd.grad``)."""
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act

    def leaf(act: Tensor, hook: Any) -> Tensor:
        # frozen parameters (requires_grad=False) would leave nothing to differentiate
        return act if act.requires_grad else act.detach().requires_grad_(True)

    with (
        torch.enable_grad(),
        hook_scope(model, fwd_hooks=[("hook_embed", leaf)] + [(n, keep) for n in names]),
    ):
        logits = model(setup.base_tokens)
        value, per_prompt = _metric_value(setup.metric, logits)
        missing = [n for n in names if n not in acts]
        if missing:
            raise InvalidSiteError(f"Expected the forward pass to reach {missing}; it did not.")
        if not value.requires_grad:
            raise InvalidArgumentError(
                "Expected a differentiable metric (its value carries no gradient). Hint: compute "
                "it with torch operations on the logits, without .item() or numpy."
            )
        grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    out = {}
    for name, grad in zip(names, grads, strict=True):
        out[name] = torch.zeros_like(acts[name]) if grad is None else grad.detach()
    return out, {n: a.detach() for n, a in acts.items()}, per_prompt


def _metric_value(metric: Any, logits: Tensor) -> tuple[Tensor, Tensor]:
    """The scalar to differentiate and the per-prompt values (detached, float, CPU)."""
    from mechkit.metrics import Metric, check_metric_value

    if isinstance(metric, Metric):
        per_prompt = metric.per_prompt(logits)
        return per_prompt.mean(), per_prompt.detach().float().cpu()
    value = check_metric_value(metric(logits), logits.shape[0])
    if value.ndim == 1:
        return value.mean(), value.detach().float().cpu()
    if value.ndim != 0:
        raise ShapeError(
            f"Expected the metric to return a scalar or one value per prompt; got shape "
            f"{tuple(value.shape)}."
        )
    n = logits.shape[0]
    # a plain scalar metric: every prompt gets the mean (per-prompt values are unknown)
    return value, value.detach().float().cpu().expand(n).clone()


@torch.no_grad()
def _clean_and_corrupt_scores(
    model: Any, setup: Any, base_score: float, other: float | None
) -> tuple[float | None, float | None]:
    """The metric on the clean and corrupt runs, as :func:`activation_patch` reports them;
    ``other`` is the source run's score (denoising: clean; noising: corrupt)."""

    def score(tokens: Tensor) -> float:
        return float(_metric_value(setup.metric, model(tokens))[0])

    if setup.method == "denoising":
        return other, base_score
    if setup.method == "noising":
        return base_score, other
    corrupt = None
    if setup.corrupt_tokens is not None and setup.corrupt_tokens.shape == setup.clean_tokens.shape:
        corrupt = score(setup.corrupt_tokens)
    return base_score, corrupt


# ----------------------------------------------------------------------------------- comparison


@dataclasses.dataclass(frozen=True, eq=False)
class AttributionComparison:
    """Attribution patching beside activation patching on the same cells.

    Attributes:
        estimate: the attribution-patching result (every cell).
        actual: the activation-patching result on the compared cells (a list of sites, in the
            order of ``cells``).
        cells: the compared cells, as dicts of axis -> label.
        pearson, spearman: correlation of the estimated and the real normalized scores (of the
            change from the unpatched run when there is no corrupt run to normalize by).
        normalized: whether scores are normalized.
    """

    estimate: PatchResult
    actual: PatchResult
    cells: list[dict[str, Any]]
    estimated: Tensor
    real: Tensor
    pearson: float
    spearman: float
    normalized: bool

    def worst(self, n: int = 10) -> list[tuple[dict[str, Any], float, float]]:
        """The ``n`` cells where the estimate misses the real patch most: (cell, est, real)."""
        order = (self.estimated - self.real).abs().argsort(descending=True)[:n]
        return [(self.cells[i], float(self.estimated[i]), float(self.real[i])) for i in order]

    def to_dataframe(self) -> Any:
        """One row per compared cell: its axes, ``estimated``, ``actual``, ``error``."""
        import pandas as pd

        frame = pd.DataFrame(self.cells)
        frame["estimated"] = self.estimated.tolist()
        frame["actual"] = self.real.tolist()
        frame["error"] = (self.estimated - self.real).tolist()
        return frame

    def plot(self, *, title: str | None = None) -> Any:
        """A scatter plot of estimated against real scores, with the diagonal."""
        import plotly.graph_objects as go

        text = [", ".join(f"{k}={v}" for k, v in c.items()) for c in self.cells]
        lo = float(torch.minimum(self.estimated.min(), self.real.min()))
        hi = float(torch.maximum(self.estimated.max(), self.real.max()))
        fig = go.Figure()
        fig.add_scatter(
            x=self.real.tolist(), y=self.estimated.tolist(), mode="markers", text=text,
            name="cells",
        )  # fmt: skip
        fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line_dash="dot")
        what = "normalized score" if self.normalized else "change in metric"
        fig.update_layout(
            title=title
            or f"Attribution vs activation patching ({self.estimate.site}): "
            f"r = {self.pearson:.3f}, Spearman {self.spearman:.3f}",
            xaxis_title=f"activation patching ({what})",
            yaxis_title=f"attribution patching ({what})",
        )
        return fig

    def __repr__(self) -> str:
        return (
            f"AttributionComparison({self.estimate.site}, {len(self.cells)} cells, "
            f"pearson={self.pearson:.3f}, spearman={self.spearman:.3f})"
        )


def compare_attribution(
    model: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    site: str = "z",
    sample: int | None = None,
    seed: int = 0,
    progress: bool = True,
    **sweep: Any,
) -> AttributionComparison:
    """Run attribution patching on a sweep and activation patching on (a sample of) its cells.

    Args:
        model, clean, corrupt, metric: as for :func:`attribution_patch`.
        site: the component swept.
        sample: compare only this many cells, drawn at random (``seed``); None: every cell.
        **sweep: more arguments of both functions (``positions``, ``layers``, ``heads``,
            ``direction``, ``ablation``, ``reference``...).

    Returns:
        An :class:`AttributionComparison` with the correlations, ``worst(n)`` and a scatter
        ``plot()``.

    Example:
        >>> cmp = mk.compare_attribution(model, pairs, site="z")
        >>> cmp.pearson, cmp.worst(3)
    """
    estimate = attribution_patch(model, clean, corrupt, metric, site=site, seed=seed, **sweep)
    grids = torch.meshgrid(*[torch.arange(n) for n in estimate.scores.shape], indexing="ij")
    flat = torch.stack([g.flatten() for g in grids], -1)  # (cells, axes)
    if sample is not None:
        if sample < 1:
            raise InvalidArgumentError(f"Expected sample >= 1 (or None); got {sample}.")
        order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))
        flat = flat[order[:sample].sort().values]
    cells = [
        {a: estimate.labels[a][int(i)] for a, i in zip(estimate.axes, idx, strict=True)}
        for idx in flat
    ]
    sites = [_site_of(site, cell) for cell in cells]
    keep = {k: v for k, v in sweep.items() if k in ("direction", "ablation", "reference")}
    actual = activation_patch(
        model, clean, corrupt, metric, site=sites, seed=seed, progress=progress, **keep
    )
    est = torch.stack([estimate.scores[tuple(i)] for i in flat])
    real = actual.scores.clone()
    normalized = estimate.clean_score is not None and estimate.corrupt_score is not None
    if normalized and estimate.clean_score != estimate.corrupt_score:
        span = estimate.clean_score - estimate.corrupt_score
        est = (est - estimate.corrupt_score) / span
        real = (real - estimate.corrupt_score) / span
    else:
        normalized = False
        est = est - (estimate.base_score or 0.0)
        real = real - (estimate.base_score or 0.0)
    return AttributionComparison(
        estimate=estimate,
        actual=actual,
        cells=cells,
        estimated=est,
        real=real,
        pearson=_pearson(est, real),
        spearman=_pearson(_ranks(est), _ranks(real)),
        normalized=normalized,
    )


def _site_of(component: str, cell: dict[str, Any]) -> Site:
    return Site(
        component,
        layer=cell.get("layer"),
        head=cell.get("head"),
        position=cell.get("pos"),
        neuron=cell.get("neuron"),
    )


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.norm() * b.norm()).item()
    return float("nan") if denom == 0 else float((a @ b).item() / denom)


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = x.argsort()
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
