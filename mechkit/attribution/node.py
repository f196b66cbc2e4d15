"""Attribution patching: every activation patch of a sweep estimated from one gradient.

Activation patching runs one forward pass per patched cell. Attribution patching (Nanda 2023;
Syed et al. 2023; Kramár et al. 2024) replaces each run by the first-order Taylor term around the
run being patched::

    M(patched) ~= M(base) + (a_source - a_base) . dM/da |base

so the whole sweep costs the source run, the base run and one backward pass. ``a_base`` is the
activation on the run that is patched (corrupt when denoising, clean when noising), ``a_source``
the value patched in (clean, corrupt, zero, the mean). The estimate is exact for activations the
metric depends on linearly and poor where it is not: the residual stream of layer 0, MLP 0, and
attention whose softmax saturates (Kramár et al.); :func:`compare_attribution` measures, on the
user's own task, how far the estimate is from the real patch.

:func:`attribution_patch` takes the arguments of :func:`mechkit.activation_patch` and returns a
:class:`~mechkit.PatchResult` with the same axes, clean and corrupt scores and ``normalized()``,
so the two can be compared cell by cell.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.batching import each_batch, prompts_per_pass
from mechkit.core.inputs import Ablation, Contrast, Direction, resolve_contrast
from mechkit.core.labels import metric_name
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import (
    InvalidArgumentError,
    InvalidSiteError,
    ShapeError,
)
from mechkit.hook_scope import hook_scope
from mechkit.metrics import Metric, check_metric_value
from mechkit.patching.activation import (
    activation_patch,
    plan_cells,
    site_name,
    source_acts,
    tick_labels,
)
from mechkit.patching.result import PatchResult
from mechkit.sites import Component, Site

__all__ = ["attribution_patch", "compare_attribution", "AttributionComparison"]


def attribution_patch(
    model: Model,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    site: str | Site | Sequence[Site] = "resid_pre",
    positions: Literal["each", "all"] | Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    direction: Direction | None = None,
    ablation: Ablation | None = None,
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
        direction, ablation, reference, seed: as for :func:`mechkit.activation_patch`: every
            direction and ablation of the core's vocabulary is supported, since the estimate
            is a Taylor expansion around the run that is patched (the corrupt run when
            denoising, the clean run when noising) and needs only the value put in, whatever
            it is.
        batch_size: the one cost knob: prompts per pass (None: all at once; splitting needs
            a mechkit Metric). Each batch costs one forward and one backward pass of the run
            that is patched, plus one forward for the values put in (none for
            ``ablation="zero"``), whatever the number of cells. Scores are summed over batches
            exactly, weighted by their size. A batch that runs out of memory is split in two
            and retried.

    There is no ``memory_budget``: :func:`mechkit.activation_patch` and
    :func:`mechkit.path_patch` use theirs to pack their many patched runs (one per cell) into
    chunks, but here every cell is read off the same gradient, so there are no runs to pack;
    the memory is one backward pass over a batch (the activations at the swept sites and their
    gradients), and ``batch_size`` is what lowers it.

    Returns:
        A :class:`PatchResult` with ``estimator="attribution patching"``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> clean = torch.tensor([[1, 2, 3, 4, 2, 3]])
        >>> corrupt = torch.tensor([[1, 5, 3, 4, 5, 3]])
        >>> r = mk.attribution_patch(model, clean, corrupt,
        ...                          lambda logits: logits[:, -1, 4].mean(), site="z")
        >>> r.axes, tuple(r.scores.shape), r.estimator
        (('layer', 'head'), (2, 4), 'attribution patching')
    """
    contrast = resolve_contrast(
        model, clean, corrupt, metric, direction=direction, ablation=ablation, reference=reference
    )
    seq = contrast.base_tokens.shape[1]
    axes, labels, cells = plan_cells(model, site, positions, layers, heads, neurons, seq)
    names = sorted({cell.site.hook_name for cell in cells})
    n_batch = contrast.n_prompts
    size = prompts_per_pass(n_batch, batch_size, contrast.metric)
    if size < n_batch and contrast.ablation == "resample":
        raise InvalidArgumentError(
            "Expected batch_size=None for resample ablation (each prompt draws from the whole "
            f"reference set); got batch_size={batch_size}, which splits the {n_batch} prompts."
        )

    products: dict[str, list[Tensor]] = {name: [] for name in names}  # (batch, ...) each
    base_values: list[Tensor] = []
    other_values: list[Tensor] = []

    def work(rows: slice) -> None:
        part = _select(contrast, rows)
        grads, base_acts, base_per_prompt = _gradients(model, part, names)
        sources, other_logits = source_acts(model, part, set(names), base_acts, seed)
        found = {}
        for name in names:
            delta = sources[name].expand_as(base_acts[name]) - base_acts[name]
            # the metric is a mean over the batch: one prompt's own effect is n times its share
            found[name] = delta * grads[name] * (rows.stop - rows.start)
        if other_logits is not None:
            with torch.no_grad():
                other_values.append(_metric_value(part.metric, other_logits)[1])
        for name in names:  # kept only once the whole batch succeeded (each_batch retries)
            products[name].append(found[name])
        base_values.append(base_per_prompt)

    each_batch(n_batch, size, work)

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
    clean_score, corrupt_score = _clean_and_corrupt_scores(model, contrast, base_score, other)
    return PatchResult(
        scores=scores,
        per_prompt=per_prompt,
        axes=axes,
        labels=labels,
        tick_labels=tick_labels(model, axes, labels, contrast.clean_tokens),
        clean_score=clean_score,
        corrupt_score=corrupt_score,
        method=contrast.method,
        site=site_name(site),
        metric_name=metric_name(contrast.metric),
        estimator="attribution patching",
    )


# ----------------------------------------------------------------------------------- gradients


def _select(contrast: Contrast, rows: slice) -> Contrast:
    """The contrast restricted to ``rows`` of the batch (its metric too; the reference set
    stays whole)."""
    if rows.start == 0 and rows.stop == contrast.n_prompts:
        return contrast

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[rows]

    assert isinstance(contrast.metric, Metric)  # prompts_per_pass refused other metrics
    return dataclasses.replace(
        contrast,
        clean_tokens=contrast.clean_tokens[rows],
        clean_mask=contrast.clean_mask[rows],
        corrupt_tokens=cut(contrast.corrupt_tokens),
        corrupt_mask=cut(contrast.corrupt_mask),
        metric=contrast.metric.select(rows),
        pairs=None,
    )


def _gradients(
    model: Model, contrast: Contrast, names: list[str]
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
        logits = model(contrast.base_tokens)
        value, per_prompt = _metric_value(contrast.metric, logits)
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
    model: Model, contrast: Contrast, base_score: float, other: float | None
) -> tuple[float | None, float | None]:
    """The metric on the clean and corrupt runs, as :func:`activation_patch` reports them;
    ``other`` is the source run's score (denoising: clean; noising: corrupt)."""

    def score(tokens: Tensor) -> float:
        return float(_metric_value(contrast.metric, model(tokens))[0])

    if contrast.method == "denoising":
        return other, base_score
    if contrast.method == "noising":
        return base_score, other
    corrupt = None
    tokens = contrast.corrupt_tokens
    if tokens is not None and tokens.shape == contrast.clean_tokens.shape:
        corrupt = score(tokens)
    return base_score, corrupt


# ----------------------------------------------------------------------------------- comparison


@dataclasses.dataclass(frozen=True, eq=False)
class AttributionComparison:
    """Attribution patching beside activation patching on the same cells
    (:func:`compare_attribution` makes one; its example shows one in use).

    Attributes:
        estimate: the attribution-patching result (every cell).
        actual: the activation-patching result on the compared cells (a list of sites, in the
            order of ``cells``).
        cells: the compared cells, as dicts of axis -> label.
        pearson, spearman: correlation of the estimated and the real normalized scores (of the
            change from the unpatched run when there is no corrupt run to normalize by).
        normalized: whether scores are normalized.

    Example:
        >>> cmp = AttributionComparison(
        ...     estimate=None, actual=None, cells=[{"layer": 0}, {"layer": 1}],
        ...     estimated=torch.tensor([0.5, 0.1]), real=torch.tensor([0.4, 0.9]),
        ...     pearson=-1.0, spearman=-1.0, normalized=True)
        >>> cmp.worst(1)
        [({'layer': 1}, 0.10000000149011612, 0.8999999761581421)]
    """

    estimate: PatchResult
    actual: PatchResult
    cells: list[dict[str, Any]]
    estimated: Float[Tensor, " cell"]
    real: Float[Tensor, " cell"]
    pearson: float
    spearman: float
    normalized: bool

    def worst(self, n: int = 10) -> list[tuple[dict[str, Any], float, float]]:
        """The ``n`` cells where the estimate misses the real patch most: (cell, est, real)."""
        order = (self.estimated - self.real).abs().argsort(descending=True)[:n]
        return [(self.cells[i], float(self.estimated[i]), float(self.real[i])) for i in order]

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[dict[str, Any], float]]:
        """The ``n`` cells ranked by the attribution error, ``estimated - real`` (the same
        quantity as :meth:`worst`), as ``(cell, error)`` pairs, by :func:`~mechkit.core.rank`'s
        rule: by ``|error|`` when ``absolute`` (the cells the estimate misses most), else by the
        signed error (the cells it overestimates most); NaN last.

        Example:
            >>> cmp = AttributionComparison(
            ...     estimate=None, actual=None, cells=[{"layer": 0}, {"layer": 1}],
            ...     estimated=torch.tensor([0.5, 0.1]), real=torch.tensor([0.4, 0.9]),
            ...     pearson=float("nan"), spearman=float("nan"), normalized=True)
            >>> [(cell, round(error, 2)) for cell, error in cmp.top(2)]
            [({'layer': 1}, -0.8), ({'layer': 0}, 0.1)]
        """
        return rank(self.cells, self.estimated - self.real, n, absolute=absolute)

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
    model: Model,
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
        >>> model = mk.load_model("attn-only-2l")
        >>> clean = torch.tensor([[1, 2, 3, 4, 2, 3]])
        >>> corrupt = torch.tensor([[1, 5, 3, 4, 5, 3]])
        >>> cmp = mk.compare_attribution(model, clean, corrupt,
        ...                              lambda logits: logits[:, -1, 4].mean(), site="z",
        ...                              progress=False)
        >>> len(cmp.cells), -1.0 <= cmp.pearson <= 1.0, len(cmp.top(3))
        (8, True, 3)
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
    clean_score, corrupt_score = estimate.clean_score, estimate.corrupt_score
    normalized = clean_score is not None and corrupt_score is not None
    if clean_score is not None and corrupt_score is not None and clean_score != corrupt_score:
        span = clean_score - corrupt_score
        est = (est - corrupt_score) / span
        real = (real - corrupt_score) / span
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
        cast(Component, component),
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
