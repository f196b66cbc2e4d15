"""Activation patching: how much of a behaviour one activation carries.

Run the model on one input, overwrite one activation with another value, and measure the metric
(Vig et al. 2020; Meng et al. 2022; Heimersheim & Nanda 2024). The vocabulary is the core's
(:mod:`mechkit.core.inputs`): **denoising** patches clean values into the corrupt run (does this
activation suffice?), **noising** patches the ablation's value into the clean run (is it
necessary?): the corrupt run's (``ablation="corrupt"``), zero, the reference mean, or a resampled
reference prompt's.

Results use the axes of the matching ``transformer_lens.patching`` function and equal its
numbers (within 1e-4 in the tests), while many patches share each batched forward pass
(:mod:`mechkit.patching.engine`). Four or more pairs of unequal lengths run one length at a time,
so no padding is computed.

=============================  ======================  ======================================
``site``                       ``positions="each"``    ``positions="all"``
=============================  ======================  ======================================
``resid_pre/mid/post``,        ``(layer, pos)``        ``(layer,)``
``attn_out``, ``mlp_out``      (the default)
``z q k v``                    ``(layer, pos, head)``  ``(layer, head)`` (the default)
``pattern``, ``attn_scores``   ``(layer, head, pos)``  ``(layer, head)`` (the default)
``mlp_pre``, ``mlp_post``      ``(layer, pos, neuron)``  ``(layer, neuron)`` (the default)
a list of :class:`Site`        ``(site,)``: each site as given (its own head/position)
=============================  ======================  ======================================

``k`` and ``v`` of grouped-query models have one head per shared key/value head.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.core.batching import check_budget, each_batch, parse_budget, prompts_per_pass
from mechkit.core.inputs import Ablation, Contrast, Direction, reference_mean, resolve_contrast
from mechkit.core.labels import metric_name
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import (
    InvalidArgumentError,
    InvalidSiteError,
    ShapeError,
    check_choice,
)
from mechkit.hook_scope import hook_scope
from mechkit.metrics import Metric
from mechkit.patching import engine
from mechkit.patching.result import PatchResult
from mechkit.prompts import PromptPairs
from mechkit.sites import Component, Site

if TYPE_CHECKING:
    from mechkit.distributed import RayExecutor

__all__ = [
    "activation_patch",
    "plan_patch",
    "PatchPlan",
    "PATCHABLE",
    "PaddedPrompts",
    "RESIDUAL_SITES",
    "HEAD_SITES",
    "NEURON_SITES",
]

RESIDUAL_SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
"""Components with one value per position: swept as ``(layer, pos)``."""
HEAD_SITES: tuple[str, ...] = ("z", "q", "k", "v", "pattern", "attn_scores")
"""Components with a head axis: the ``heads`` argument applies to these."""
NEURON_SITES: tuple[str, ...] = ("mlp_pre", "mlp_post")
"""Components with a neuron axis: the ``neurons`` argument applies to these."""
PATCHABLE: tuple[str, ...] = RESIDUAL_SITES + HEAD_SITES + NEURON_SITES
"""The components :func:`activation_patch` sweeps."""


@dataclasses.dataclass
class Cell:
    """One patch of a sweep: its index in the result and the (resolved) site it patches.

    Example:
        >>> Cell((0, 1), mk.Site("z", layer=0, head=1)).site.head
        1
    """

    index: tuple[int, ...]
    site: Site  # resolved; position None means all positions


def activation_patch(
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
    memory_budget: int | str | None = None,
    progress: bool = True,
    executor: RayExecutor | None = None,
) -> PatchResult:
    """Patch each activation of a sweep and measure the metric.

    Args:
        model: a HookedTransformer.
        clean: a :class:`PromptPairs` (then ``corrupt`` stays None and the metric defaults to
            its logit difference), or clean prompts (strings or a ``(batch, pos)`` tensor).
        corrupt: corrupt prompts with the clean prompts' token lengths (not needed for the
            ``"zero"``, ``"mean"`` and ``"resample"`` ablations).
        metric: a mechkit :class:`Metric` (fast: only the answer positions are unembedded) or any
            function ``logits (batch, pos, d_vocab) -> scalar or (batch,)``.
        site: a component (see the module docstring), a :class:`Site`, or a list of sites.
        positions: ``"each"`` (one patch per position), ``"all"`` (all positions at once), or a
            list of positions (one patch each); None picks the component's usual choice.
        layers, heads, neurons: restrict the sweep (None means all).
        direction: ``"denoising"`` (clean values into the corrupt run; the default with
            ``ablation="corrupt"``) or ``"noising"`` (values into the clean run; the default for
            the other ablations), as in :mod:`mechkit.core.inputs`.
        ablation: the value noising puts in: ``"corrupt"`` (the corrupt run's, the default),
            ``"zero"``, ``"mean"`` (over ``reference``, :func:`~mechkit.core.reference_mean`) or
            ``"resample"`` (each prompt gets the activation of a random ``reference`` prompt;
            ``seed`` fixes the draw).
        reference: prompts for mean and resample ablation; by default the corrupt prompts (or
            the clean ones when there are none).
        batch_size: prompts per sweep (None: all at once; splitting needs a mechkit Metric).
            Each cell's score is the mean over all prompts (batches weighted by their size);
            mean ablation averages over the whole reference set; resample ablation cannot be
            split (each prompt draws from the whole reference set).
        memory_budget: bytes (or ``"2GB"``) a batch may use; None: 2 GiB on CPU, 60% of free
            memory on CUDA. A batch that still runs out of memory is split and retried.
        progress: show a progress bar.
        executor: a :class:`~mechkit.distributed.RayExecutor`: the cells run as tasks on its
            actors (the model is shipped to each once), the reference runs and the result here.

    Returns:
        A :class:`PatchResult` with ``scores`` laid out like TransformerLens's function.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> clean = torch.tensor([[1, 2, 3, 4, 2, 3]])
        >>> corrupt = torch.tensor([[1, 5, 3, 4, 5, 3]])
        >>> r = mk.activation_patch(model, clean, corrupt, lambda logits: logits[:, -1, 4].mean(),
        ...                         site="z", progress=False)
        >>> r.axes, tuple(r.scores.shape), r.method
        (('layer', 'head'), (2, 4), 'denoising')
    """
    check_budget(memory_budget)
    contrast = resolve_contrast(
        model, clean, corrupt, metric, direction=direction, ablation=ablation, reference=reference
    )
    size = prompts_per_pass(contrast.n_prompts, batch_size, contrast.metric)
    kwargs: dict[str, Any] = {
        "site": site, "positions": positions, "layers": layers, "heads": heads,
        "neurons": neurons, "direction": direction, "ablation": ablation,
        "reference": reference, "seed": seed,
    }  # fmt: skip
    if size < contrast.n_prompts:
        return patch_in_batches(
            activation_patch,
            model,
            contrast,
            size,
            memory_budget=memory_budget,
            progress=progress,
            executor=executor,
            **kwargs,
        )
    if executor is not None:
        return _on_executor(executor, model, (clean, corrupt, metric, kwargs), memory_budget)
    if corrupt is None and isinstance(clean, PromptPairs):
        buckets = _length_buckets(clean, contrast.metric, site, positions, contrast.ablation)
        if buckets is not None:
            return _bucketed(model, clean, contrast, buckets, kwargs, memory_budget, progress)
    plan = plan_patch(model, clean, corrupt, metric, **kwargs)
    done: dict[tuple[int, ...], tuple[float, list[float] | None]] = {}
    for chunk in plan.run(memory_budget=memory_budget, progress=progress):
        done.update(chunk)
    return plan.result(done)


def _on_executor(
    executor: RayExecutor, model: Model, inputs: tuple, memory_budget: int | str | None
) -> PatchResult:
    """The plan made here (arguments checked, labels); its cells run in ranges on the actors."""
    clean, corrupt, metric, kwargs = inputs
    plan = plan_patch(model, clean, corrupt, metric, **kwargs)
    n = len(plan.cells)
    parts = executor.chunks(n, 1)
    shared = executor.share(inputs)
    call = uuid.uuid4().hex  # the actors keep one plan per call
    tasks = [(call, shared, slice(k * n // parts, (k + 1) * n // parts), memory_budget)
             for k in range(parts)]  # fmt: skip
    done: dict[tuple[int, ...], tuple[float, list[float] | None]] = {}
    for _, chunk in executor.map(model, _cells_on_actor, tasks):
        done.update(chunk)
    return plan.result(done)


def _cells_on_actor(
    model: Model, cache: dict, call: str, inputs: tuple, cells: slice, memory_budget: Any
) -> dict[tuple[int, ...], tuple[float, list[float] | None]]:
    """On an actor: the scores of the plan's cells in range ``cells``."""
    if call not in cache:
        cache.clear()  # one plan (its reference activations) at a time
        clean, corrupt, metric, kwargs = inputs
        cache[call] = plan_patch(model, clean, corrupt, metric, **kwargs)
    plan = cache[call]
    wanted = set(plan.cells[cells])
    done: dict[tuple[int, ...], tuple[float, list[float] | None]] = {}
    for chunk in plan.run(
        skip=set(plan.cells) - wanted, memory_budget=memory_budget, progress=False
    ):
        done.update(chunk)
    return done


@dataclasses.dataclass(frozen=True)
class PaddedPrompts:
    """Token ids of right-padded prompts with their mask, taken wherever prompts are (as
    :func:`mechkit.tokens.token_batch` reads them): a batch cut from a larger one, or a
    reference set whose padding must be known.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> prompts = PaddedPrompts(torch.tensor([[1, 2, 3], [1, 4, 0]]),
        ...                         torch.tensor([[True, True, True], [True, True, False]]))
        >>> c = mk.core.resolve_contrast(model, prompts, ablation="mean", needs_metric=False)
        >>> c.reference_mask.sum().item()
        5
    """

    clean_tokens: Int[Tensor, "batch pos"]
    clean_mask: Bool[Tensor, "batch pos"]


def patch_in_batches(
    method: Callable[..., PatchResult],
    model: Model,
    contrast: Contrast,
    size: int,
    **kwargs: Any,
) -> PatchResult:
    """``method(model, clean, corrupt, metric, **kwargs)`` (a patching function such as
    :func:`activation_patch`) run on ``size`` prompts of ``contrast`` at a time, at the full
    padded width so that a position means the same in every batch; each cell's score is the
    size-weighted mean of the batches' (the metric's mean over all prompts), per-prompt scores
    are joined, and mean ablation averages over the whole reference set. With an ``executor``
    in ``kwargs`` each batch is one task on its actors
    (:meth:`~mechkit.distributed.RayExecutor.each_batch`).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> pairs = mk.PromptPairs.from_tokens([[1, 2, 3], [1, 4, 5], [1, 6, 7]],
        ...                                    [[1, 8, 3], [1, 9, 5], [1, 10, 7]], [2, 3, 4],
        ...                                    [5, 6, 7])
        >>> c = mk.core.resolve_contrast(model, pairs)
        >>> r = patch_in_batches(activation_patch, model, c, 2, site="z", progress=False)
        >>> whole = activation_patch(model, pairs, site="z", progress=False)
        >>> bool(torch.allclose(r.scores, whole.scores, atol=1e-5)), tuple(r.per_prompt.shape)
        (True, (2, 4, 3))
    """
    if contrast.ablation == "resample":
        raise InvalidArgumentError(
            "Expected batch_size=None for resample ablation (each prompt draws from the whole "
            f"reference set); got batch_size={size}, which splits the {contrast.n_prompts} "
            "prompts."
        )
    n = contrast.n_prompts
    sub_kwargs = dict(kwargs, direction=contrast.direction, ablation=contrast.ablation)
    sub_kwargs.pop("batch_size", None)
    if contrast.reference_tokens is not None and contrast.reference_mask is not None:
        sub_kwargs["reference"] = PaddedPrompts(contrast.reference_tokens, contrast.reference_mask)
    executor = sub_kwargs.pop("executor", None)
    parts: list[tuple[int, PatchResult]] = []

    def inputs(rows: slice) -> tuple[PaddedPrompts, PaddedPrompts | None, Any]:
        corrupt = None
        if contrast.corrupt_tokens is not None and contrast.corrupt_mask is not None:
            corrupt = PaddedPrompts(contrast.corrupt_tokens[rows], contrast.corrupt_mask[rows])
        clean = PaddedPrompts(contrast.clean_tokens[rows], contrast.clean_mask[rows])
        return clean, corrupt, contrast.metric.select(rows)

    def work(rows: slice) -> None:
        parts.append((rows.stop - rows.start, method(model, *inputs(rows), **sub_kwargs)))

    if executor is None:
        each_batch(n, size, work)
    else:  # each batch one task on the executor's actors
        remote_kwargs = dict(sub_kwargs, progress=False)
        done = executor.each_batch(model, method, n, size, lambda r: (inputs(r), remote_kwargs))
        parts = [(rows.stop - rows.start, part) for rows, part in done]
    first = parts[0][1]

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        if len(known) < len(values):
            return None
        return sum(v * k for v, (k, _) in zip(known, parts, strict=True)) / n

    tensors = [part.per_prompt for _, part in parts if part.per_prompt is not None]
    per_prompt = torch.cat(tensors, dim=-1) if len(tensors) == len(parts) else None
    return dataclasses.replace(
        first,
        scores=torch.stack([part.scores * k for k, part in parts]).sum(0) / n,
        per_prompt=per_prompt,
        clean_score=mean([part.clean_score for _, part in parts]),
        corrupt_score=mean([part.corrupt_score for _, part in parts]),
    )


def _bucketed(
    model: Model,
    pairs: PromptPairs,
    contrast: Contrast,
    buckets: list[list[int]],
    kwargs: dict[str, Any],
    memory_budget: Any,
    progress: bool,
) -> PatchResult:
    """The sweep run on the prompts of one length at a time (no padding computed): each cell's
    per-prompt scores gathered from the buckets, its score their mean (the metric's own mean);
    cells at positions past a bucket's prompts are its unpatched values there."""
    seq = contrast.base_tokens.shape[1]
    axes, labels, cells = plan_cells(
        model,
        kwargs["site"],
        kwargs["positions"],
        kwargs["layers"],
        kwargs["heads"],
        kwargs["neurons"],
        seq,
    )
    n_batch = len(pairs)
    per_prompt = {cell.index: [0.0] * n_batch for cell in cells}
    scores = {"clean": 0.0, "corrupt": 0.0}
    for rows in buckets:
        sub = plan_patch(model, pairs[rows], None, contrast.metric.select(rows), **kwargs)
        found: dict[tuple[int, ...], list[float] | None] = {}
        for chunk in sub.run(memory_budget=memory_budget, progress=progress):
            found.update({cell: prompts for cell, (_, prompts) in chunk.items()})
        full_index = _cell_map(sub, axes, labels)
        for cell in cells:
            values = found.get(full_index.get(cell.index, ()), sub.base_per_prompt)
            assert values is not None  # a Metric gives per-prompt scores (_length_buckets)
            for i, row in enumerate(rows):
                per_prompt[cell.index][row] = values[i]
        for name, value in (("clean", sub.clean_score), ("corrupt", sub.corrupt_score)):
            scores[name] += float("nan") if value is None else value * len(rows) / n_batch
    shape = tuple(len(labels[a]) for a in axes)
    grid = torch.full(shape, float("nan"))
    grid_per_prompt = torch.full((*shape, n_batch), float("nan"))
    for index, values in per_prompt.items():
        grid[index] = sum(values) / n_batch
        grid_per_prompt[index] = torch.tensor(values)
    return PatchResult(
        scores=grid,
        per_prompt=grid_per_prompt,
        axes=axes,
        labels=labels,
        tick_labels=tick_labels(model, axes, labels, contrast.clean_tokens),
        clean_score=scores["clean"],
        corrupt_score=scores["corrupt"],
        method=contrast.method,
        site=site_name(kwargs["site"]),
        metric_name=metric_name(contrast.metric),
    )


_MIN_BUCKETED = 4
"""Prompts from which a sweep over prompts of unequal lengths runs one length at a time."""


def _length_buckets(
    clean: PromptPairs, metric: Any, site: Any, positions: Any, ablation: str | None
) -> list[list[int]] | None:
    """Rows of each clean prompt length, when the sweep can run one length at a time and give
    the same numbers: aligned pairs of unequal lengths, a metric that is the mean of its
    per-prompt values, a component sweep, and no ablation that mixes prompts. None otherwise."""
    if len(clean) < _MIN_BUCKETED or not clean.is_aligned:
        return None
    if not isinstance(metric, Metric) or type(metric).__call__ is not Metric.__call__:
        return None
    if ablation not in ("corrupt", "zero") or not isinstance(site, str) or site not in PATCHABLE:
        return None
    if not (positions is None or positions in ("each", "all")):
        return None
    lengths = clean.clean_lengths.tolist()
    if len(set(lengths)) == 1:
        return None
    return [[i for i, n in enumerate(lengths) if n == length] for length in sorted(set(lengths))]


def _cell_map(
    sub: PatchPlan, axes: tuple[str, ...], labels: dict[str, list[Any]]
) -> dict[tuple[int, ...], tuple[int, ...]]:
    """``{full cell: sub cell}`` for the cells both sweeps have (matched by their labels)."""
    out = {}
    for cell in sub.cells:
        values = tuple(sub.labels[axis][i] for axis, i in zip(sub.axes, cell, strict=True))
        index = tuple(labels[axis].index(v) for axis, v in zip(axes, values, strict=True))
        out[index] = cell
    return out


@dataclasses.dataclass(eq=False)
class PatchPlan:
    """A patching sweep prepared to run: reference runs done, every cell's patch decided.

    :func:`activation_patch` is ``plan_patch(...)`` then :meth:`run` then :meth:`result`; a
    resumable sweep (``mechkit sweep``) runs the cells it has not stored yet with ``skip``.

    Attributes:
        axes, labels: the result's axes and the value of each index.
        cells: the index of every cell, in order.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> plan = plan_patch(model, torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]]),
        ...                   lambda logits: logits[:, -1, 3].mean(), site="resid_pre")
        >>> done = {}
        >>> for chunk in plan.run(progress=False):
        ...     done.update(chunk)
        >>> plan.result(done).axes, len(plan.cells)
        (('layer', 'pos'), 8)
    """

    model: Model
    contrast: Contrast
    axes: tuple[str, ...]
    labels: dict[str, list[Any]]
    cells: list[tuple[int, ...]]
    site_name: str
    base: engine.BaseRun
    reader: engine.MetricReader
    jobs: list[engine.PatchJob]
    noop: list[tuple[int, ...]]
    base_value: float
    base_per_prompt: list[float] | None
    clean_score: float | None
    corrupt_score: float | None

    def run(
        self,
        *,
        skip: set[tuple[int, ...]] | frozenset = frozenset(),
        memory_budget: int | str | None = None,
        progress: bool = True,
    ) -> Iterator[dict[tuple[int, ...], tuple[float, list[float] | None]]]:
        """Run the cells not in ``skip``; yields ``{cell: (score, per-prompt scores)}`` per batch.

        Cells whose patch changes nothing (the patched value equals the run's own) are yielded
        first, with the unpatched score, without running anything (the class's example).
        """
        noop = {c: (self.base_value, self.base_per_prompt) for c in self.noop if c not in skip}
        if noop:
            yield noop
        jobs = [job for job in self.jobs if job.key not in skip]
        budget = parse_budget(memory_budget, self.base.tokens.device)
        bar = progress_bar(len(jobs), f"patching {self.site_name}", enabled=progress, unit="patch")
        try:
            for chunk in engine.run_jobs(
                self.model, self.base, jobs, self.reader, budget=budget, progress=bar
            ):
                yield {
                    res.key: (
                        float(res.score),
                        None if res.per_prompt is None else res.per_prompt.tolist(),
                    )
                    for res in chunk
                }
        finally:
            bar.close()

    def result(self, done: dict[tuple[int, ...], tuple[float, list[float] | None]]) -> PatchResult:
        """The :class:`PatchResult` from every cell's ``(score, per-prompt scores)`` (the
        class's example)."""
        missing = [c for c in self.cells if c not in done]
        if missing:
            raise InvalidArgumentError(
                f"Expected a score for every cell of the sweep; {len(missing)} of "
                f"{len(self.cells)} are missing (first {missing[0]})."
            )
        shape = tuple(len(self.labels[a]) for a in self.axes)
        scores = torch.full(shape, float("nan"))
        n_batch = self.base.batch
        per_prompt: Tensor | None = torch.full((*shape, n_batch), float("nan"))
        for cell in self.cells:
            score, prompts = done[cell]
            scores[cell] = score
            if prompts is None:
                per_prompt = None
            elif per_prompt is not None:
                per_prompt[cell] = torch.tensor(prompts)
        return PatchResult(
            scores=scores,
            per_prompt=per_prompt,
            axes=self.axes,
            labels=self.labels,
            tick_labels=tick_labels(self.model, self.axes, self.labels, self.contrast.clean_tokens),
            clean_score=self.clean_score,
            corrupt_score=self.corrupt_score,
            method=self.contrast.method,
            site=self.site_name,
            metric_name=metric_name(self.contrast.metric),
        )


def plan_patch(
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
) -> PatchPlan:
    """Check the arguments, run the reference passes, and decide every cell's patch.

    Takes the arguments of :func:`activation_patch` (less the running ones).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> plan = plan_patch(model, torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]]),
        ...                   lambda logits: logits[:, -1, 3].mean(), site="z")
        >>> plan.axes, len(plan.cells), len(plan.jobs) + len(plan.noop)
        (('layer', 'head'), 8, 8)
    """
    contrast = resolve_contrast(
        model, clean, corrupt, metric, direction=direction, ablation=ablation, reference=reference
    )
    seq = contrast.base_tokens.shape[1]
    axes, labels, cells = plan_cells(model, site, positions, layers, heads, neurons, seq)
    hook_names = {cell.site.hook_name for cell in cells}
    base = engine.run_base(model, contrast.base_tokens, hook_names)
    sources, other_logits = source_acts(model, contrast, hook_names, base.acts, seed)
    reader = engine.MetricReader(contrast.metric, base)
    base_value, base_per_prompt = engine.base_score(reader, base)
    clean_score, corrupt_score = clean_and_corrupt(
        model, contrast, reader, base_value, other_logits
    )
    jobs, noop = [], []
    for cell in cells:
        job = _job_for(cell, base.acts[cell.site.hook_name], sources[cell.site.hook_name], seq)
        if job is None:
            noop.append(cell.index)
        else:
            jobs.append(job)
    return PatchPlan(
        model=model,
        contrast=contrast,
        axes=axes,
        labels=labels,
        cells=[cell.index for cell in cells],
        site_name=site_name(site),
        base=base,
        reader=reader,
        jobs=jobs,
        noop=noop,
        base_value=float(base_value),
        base_per_prompt=None if base_per_prompt is None else base_per_prompt.tolist(),
        clean_score=clean_score,
        corrupt_score=corrupt_score,
    )


# ----------------------------------------------------------------------------------- planning


def site_name(site: str | Site | Sequence[Site]) -> str:
    """How a result names what was patched: the component, a site's label, or ``"sites"``.

    Example:
        >>> site_name("z"), site_name(mk.Site("z", layer=1, head=2))
        ('z', 'L1H2 z')
    """
    return site if isinstance(site, str) else site.label if isinstance(site, Site) else "sites"


def plan_cells(
    model: Model,
    site: str | Site | Sequence[Site],
    positions: Literal["each", "all"] | Sequence[int] | None,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    neurons: Sequence[int] | None,
    seq: int,
) -> tuple[tuple[str, ...], dict[str, list[Any]], list[Cell]]:
    """The result's axes, their labels, and one cell per patch of a sweep over prompts of
    ``seq`` tokens, every site checked on the model first (nothing runs).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> axes, labels, cells = plan_cells(model, "z", None, [1], None, None, 6)
        >>> axes, labels["layer"], len(cells), cells[0].site.label
        (('layer', 'head'), [1], 4, 'L1H0 z')
    """
    cfg = model.cfg
    if isinstance(site, Site):
        site = [site]
    if not isinstance(site, str):
        sites = list(site)
        if not sites or not all(isinstance(s, Site) for s in sites):
            raise InvalidSiteError(
                "Expected site to be a component name, a Site or a non-empty list of Sites."
            )
        cells = []
        for i, s in enumerate(sites):
            resolved = s.resolve(model)
            _check_patchable(resolved.component)
            if isinstance(resolved.position, tuple):
                raise InvalidSiteError(
                    f"Expected one position (or None) on {resolved.label!r}; per-prompt "
                    "positions are not supported for patching."
                )
            if resolved.position is not None and not 0 <= resolved.position % seq < seq:
                raise InvalidSiteError(f"Expected a position below {seq}; got {resolved.position}.")
            if resolved.position is not None:
                resolved = resolved.with_(position=resolved.position % seq)
            cells.append(Cell((i,), resolved))
        return ("site",), {"site": [s.label for s in sites]}, cells

    _check_patchable(site)
    component = cast(Component, site)
    if positions is None:
        positions = "each" if site in RESIDUAL_SITES else "all"
    layer_list = choose("layers", layers, cfg.n_layers)
    if isinstance(positions, str):
        check_choice("positions", positions, ["each", "all"], also="a list of positions")
        pos_list = list(range(seq)) if positions == "each" else None
    else:
        pos_list = choose("positions", positions, seq)
    axes: list[str] = ["layer"]
    labels: dict[str, list[Any]] = {"layer": layer_list}
    if pos_list is not None:
        axes.append("pos")
        labels["pos"] = pos_list
    inner: list[tuple[str, int]] = []  # (field, value) for the last axis
    if site in HEAD_SITES:
        n_heads = (cfg.n_key_value_heads or cfg.n_heads) if site in ("k", "v") else cfg.n_heads
        head_list = choose("heads", heads, n_heads)
        axes.append("head")
        labels["head"] = head_list
        inner = [("head", h) for h in head_list]
    elif site in NEURON_SITES:
        neuron_list = choose("neurons", neurons, cfg.d_mlp or 0)
        axes.append("neuron")
        labels["neuron"] = neuron_list
        inner = [("neuron", n) for n in neuron_list]
    # attention patterns put the (query) position last, as TransformerLens's by-pos function
    pattern_order = site in ("pattern", "attn_scores") and pos_list is not None
    if pattern_order:
        axes = ["layer", "head", "pos"]
    cells = []
    for li, layer in enumerate(layer_list):
        Site(component, layer=layer).resolve(model)  # the hook exists (MLP on attn-only models...)
        for pi, pos in enumerate(pos_list if pos_list is not None else [None]):
            prefix = (li, pi) if pos_list is not None else (li,)
            if not inner:
                cells.append(Cell(prefix, Site(component, layer=layer, position=pos)))
            for ii, (field, value) in enumerate(inner):
                s = Site(component, layer=layer, position=pos, **{field: value})
                index = (li, ii, pi) if pattern_order else (*prefix, ii)
                cells.append(Cell(index, s))
    return tuple(axes), labels, cells


def _check_patchable(component: str) -> None:
    if component not in PATCHABLE:
        raise InvalidSiteError(
            f"Expected a component that activation patching sweeps ({', '.join(PATCHABLE)}); "
            f"got {component!r}. Hint: patch embeddings as resid_pre of layer 0."
        )


def choose(name: str, given: Sequence[int] | None, size: int) -> list[int]:
    """``given`` as indices in ``[0, size)`` (negative ones count from the end), or all of them
    when None; an index out of range is an :class:`InvalidSiteError` naming ``name``.

    Example:
        >>> choose("layers", [0, -1], 2), choose("heads", None, 3)
        ([0, 1], [0, 1, 2])
    """
    if given is None:
        return list(range(size))
    values = [int(v) for v in given]
    bad = [v for v in values if not -size <= v < size]
    if bad or not values:
        raise InvalidSiteError(
            f"Expected {name} in [0, {size}); got {list(given)}. Hint: the model has {size}."
        )
    return [v % size for v in values]


# ----------------------------------------------------------------------------------- sources


def source_acts(
    model: Model,
    contrast: Contrast,
    hook_names: set[str],
    base_acts: dict[str, Tensor],
    seed: int,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """The values patched in at each hook, ``(batch or 1, ...)`` broadcastable to the base run's
    ``base_acts``, and the logits of the other run (clean or corrupt) when they come from one:
    the source run's activations, zeros, the reference mean
    (:func:`~mechkit.core.reference_mean`) or a resampled reference prompt's.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> c = mk.core.resolve_contrast(model, torch.tensor([[1, 2, 3]]), ablation="zero",
        ...                              needs_metric=False)
        >>> acts = {"blocks.0.hook_resid_pre": torch.ones(1, 3, model.cfg.d_model)}
        >>> values, logits = source_acts(model, c, set(acts), acts, 0)
        >>> float(values["blocks.0.hook_resid_pre"].abs().sum()), logits
        (0.0, None)
    """
    names = sorted(hook_names)
    if contrast.source_tokens is not None:
        return run_acts(model, contrast.source_tokens, names)
    if contrast.ablation == "zero":
        return {name: torch.zeros_like(base_acts[name][:1]) for name in names}, None
    assert contrast.reference_tokens is not None and contrast.reference_mask is not None
    ref_acts, _ = run_acts(model, contrast.reference_tokens, names)
    mask = contrast.reference_mask
    n_batch, seq = contrast.base_tokens.shape
    per_position = bool(mask.all()) and mask.shape[1] == seq
    out = {}
    for name in names:
        acts = ref_acts[name]
        pattern = name.endswith(("hook_pattern", "hook_attn_scores"))  # (batch, head, q, k)
        if contrast.ablation == "mean":
            if not pattern:
                out[name] = reference_mean(acts, mask, seq)
            elif per_position:  # the query position to axis 1 and back
                out[name] = reference_mean(acts.movedim(2, 1), mask, seq).movedim(1, 2)
            else:
                raise ShapeError(
                    "Expected reference prompts of the patched prompts' length, without "
                    "padding, for mean-ablating attention patterns; got reference tokens of "
                    f"shape {tuple(mask.shape)} vs {seq} positions. Hint: pass reference= "
                    "prompts of one length."
                )
        else:  # resample
            if not per_position:
                padded = (~mask.all(1)).nonzero()[:, 0].tolist()
                raise ShapeError(
                    f"Expected reference prompts of {seq} tokens without padding for resample "
                    f"ablation (each prompt takes another's activation position by position); "
                    f"got reference tokens of shape {tuple(mask.shape)} with padding in rows "
                    f"{padded}. Hint: use prompts of one length, or pass reference= prompts "
                    "of the patched prompts' length."
                )
            generator = torch.Generator().manual_seed(seed)
            draw = torch.randint(0, acts.shape[0], (n_batch,), generator=generator)
            out[name] = acts[draw.to(acts.device)]
    return out, None


@torch.no_grad()
def run_acts(
    model: Model, tokens: Int[Tensor, "batch pos"], names: list[str]
) -> tuple[dict[str, Tensor], Float[Tensor, "batch pos d_vocab"]]:
    """The activations at hooks ``names`` and the logits of one forward pass on ``tokens``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> acts, logits = run_acts(model, torch.tensor([[1, 2, 3]]), ["blocks.0.hook_resid_pre"])
        >>> tuple(acts["blocks.0.hook_resid_pre"].shape), tuple(logits.shape)
        ((1, 3, 128), (1, 3, 500))
    """
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act.detach().clone()

    with hook_scope(model, fwd_hooks=[(n, keep) for n in names]):
        logits = model(tokens)
    return acts, logits


def clean_and_corrupt(
    model: Model,
    contrast: Contrast,
    reader: engine.MetricReader,
    base_value: Tensor,
    other_logits: Tensor | None,
) -> tuple[float | None, float | None]:
    """The metric on the clean and the corrupt run; the other run's logits are reused when the
    source values came from it, so only ablations with corrupt prompts run one more pass.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> c = mk.core.resolve_contrast(model, torch.tensor([[1, 2, 3]]),
        ...                              metric=lambda logits: logits[:, -1, 0].mean(),
        ...                              ablation="zero")
        >>> base = engine.run_base(model, c.base_tokens)
        >>> reader = engine.MetricReader(c.metric, base)
        >>> clean, corrupt = clean_and_corrupt(model, c, reader, engine.base_score(reader, base)[0],
        ...                                    None)
        >>> isinstance(clean, float), corrupt
        (True, None)
    """
    if contrast.method == "denoising":
        assert other_logits is not None
        return float(engine.score_logits(reader, other_logits)[0]), float(base_value)
    if contrast.method == "noising":
        assert other_logits is not None
        return float(base_value), float(engine.score_logits(reader, other_logits)[0])
    corrupt = None
    tokens = contrast.corrupt_tokens
    if tokens is not None and tokens.shape == contrast.clean_tokens.shape:
        with torch.no_grad():
            corrupt = float(engine.score_logits(reader, model(tokens))[0])
    return float(base_value), corrupt


# ----------------------------------------------------------------------------------- jobs


def _job_for(cell: Cell, base_act: Tensor, source: Tensor, seq: int) -> engine.PatchJob | None:
    """The patch of one cell, or None when the source equals the base there (a no-op)."""
    site = cell.site
    assert site.layer is not None and not isinstance(site.position, tuple)  # plan_cells' sites
    axis, layer, position = site.position_axis, site.layer, site.position
    assert axis is not None
    select = site.with_(position=None).index(base_act.ndim)
    src_full = source.expand_as(base_act)
    base_sel, src_sel = base_act[select], src_full[select]  # position axis is now 1
    if position is not None:
        p = position
        if torch.equal(base_sel[:, p], src_sel[:, p]):
            return None
        start = p
    else:
        first = engine.first_difference(base_sel, src_sel, 1)
        if first is None:
            return None
        start = first
    ndim = base_act.ndim

    def edit(rows: Tensor, first: int) -> None:
        # rows cover positions first.. (first <= start); earlier source values equal the base's
        src = src_full.narrow(axis, first, seq - first)
        at = None if position is None else position - first
        index = site.with_(position=at).index(ndim)
        rows[index] = src[index]

    return engine.PatchJob(cell.index, layer, start, {site.hook_name: edit})


# ----------------------------------------------------------------------------------- display


def tick_labels(
    model: Model,
    axes: tuple[str, ...],
    labels: dict[str, list[Any]],
    tokens: Int[Tensor, "batch pos"],
) -> dict[str, list[str]]:
    """Display labels of each axis of a result: ``L3`` (layer), ``H5`` (head), ``N7`` (neuron),
    ``"4 ' the'"`` (position and its token in the first prompt).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tick_labels(model, ("layer", "head"), {"layer": [1], "head": [0, 5]},
        ...             torch.tensor([[1, 2]]))
        {'layer': ['L1'], 'head': ['H0', 'H5']}
    """
    out: dict[str, list[str]] = {}
    for axis in axes:
        values = labels[axis]
        if axis == "layer":
            out[axis] = [f"L{v}" for v in values]
        elif axis == "head":
            out[axis] = [f"H{v}" for v in values]
        elif axis == "neuron":
            out[axis] = [f"N{v}" for v in values]
        elif axis == "pos":
            out[axis] = [f"{v} {_token_text(model, tokens, v)}" for v in values]
        else:
            out[axis] = [str(v) for v in values]
    return out


def _token_text(model: Model, tokens: Tensor, position: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    token = int(tokens[0, position])
    if tokenizer is None:
        return f"#{token}"
    return repr(tokenizer.decode([token]))
