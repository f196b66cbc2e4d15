"""Path patching: the effect of a sender through chosen receivers only (Wang et al. 2022, App. B).

Activation patching a head measures all of its effects at once. Path patching isolates one
path: run the reference prompts with the sender's output replaced (by its value on the corrupt
prompts, or by the ablation's value) and **every other attention head frozen** at its reference
value (MLPs are recomputed), record what the receivers read (the queries, keys or values of
chosen heads, or the final residual stream), then run the reference prompts again with only the
receivers' inputs replaced by the recorded values and measure the metric. The difference from
the reference score is the effect of the sender on the metric through those receivers.

Senders are batched: every head (and MLP) is scored in a few staircase batches of the patching
engine (:mod:`mechkit.patching.engine`), not one forward per head. A result over heads is
``(layer, head)``, over MLPs ``(layer,)``, over a list of senders ``(site,)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mechkit.core.batching import check_budget, parse_budget, prompts_per_pass
from mechkit.core.inputs import Ablation, Direction, resolve_contrast
from mechkit.core.labels import metric_name
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import InvalidSiteError, did_you_mean
from mechkit.patching import engine
from mechkit.patching.activation import (
    choose,
    clean_and_corrupt,
    patch_in_batches,
    source_acts,
    tick_labels,
)
from mechkit.patching.result import PatchResult
from mechkit.sites import Site

if TYPE_CHECKING:
    from mechkit.distributed import RayExecutor

__all__ = ["path_patch", "FINAL_RESIDUAL"]

FINAL_RESIDUAL = "resid_final"
"""Receiver name for the final residual stream (the path into the logits)."""

_RECEIVER_COMPONENTS = ("q", "k", "v")


def path_patch(
    model: Model,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    senders: Literal["heads", "mlps", "all"] | Sequence[Site] = "heads",
    receivers: str | Site | Sequence[Site] = FINAL_RESIDUAL,
    direction: Direction | None = None,
    ablation: Ablation | None = None,
    reference: Any = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
    executor: RayExecutor | None = None,
) -> PatchResult:
    """Score each sender by its effect on the metric through ``receivers`` only.

    Args:
        model: a HookedTransformer.
        clean, corrupt: a :class:`PromptPairs` (``corrupt`` None), or two token batches of
            the same shape.
        metric: a mechkit Metric or a function of the logits; default: the pairs' logit
            difference.
        senders: ``"heads"`` (every attention head: a ``(layer, head)`` result), ``"mlps"``
            (``(layer,)``), ``"all"`` (heads then MLPs as a ``(site,)`` list), or a list of
            ``Site("z", layer=, head=)`` / ``Site("mlp_out", layer=)``.
        receivers: ``"resid_final"`` (the direct path to the logits), or sites
            ``Site("q" | "k" | "v", layer=, head=)`` (``head`` counts key/value heads for
            ``k`` and ``v`` in grouped-query models).
        direction: ``"noising"`` (the default: the clean run is the reference and the sender
            carries the ablation's value) or ``"denoising"`` (the corrupt run is the reference
            and the sender carries its clean value). Unlike :func:`activation_patch`, path
            patching noises by default, as Wang et al. define it: the question is which paths
            the clean behaviour needs.
        ablation: the sender's value when noising: ``"corrupt"`` (its value on the corrupt
            prompts, the default), ``"zero"``, ``"mean"`` (over ``reference``) or
            ``"resample"`` (a random ``reference`` prompt's; ``seed`` fixes the draw), as in
            :mod:`mechkit.core.inputs`.
        reference: the prompts of ``"mean"`` and ``"resample"``; by default the corrupt prompts.
        layers: restrict sender layers (None: all). As in :func:`activation_patch`, ``-1`` is
            the last layer (negative indices count from the end and are labelled by their
            positive index); a layer outside ``[-n_layers, n_layers)`` raises
            :class:`InvalidSiteError`.
        batch_size, memory_budget, progress: as for :func:`activation_patch` (``batch_size``
            prompts at a time, scores their size-weighted mean).
        executor: a :class:`~mechkit.distributed.RayExecutor`: each batch of ``batch_size``
            prompts is one task on its actors (each holds the model, shipped once); the scores
            are combined here as in one process.

    Returns:
        A :class:`PatchResult`; a sender at or after every receiver's layer cannot reach it and
        scores the reference value exactly.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> clean = torch.tensor([[1, 2, 3, 4, 2, 3]])
        >>> corrupt = torch.tensor([[1, 5, 3, 4, 5, 3]])
        >>> r = mk.path_patch(model, clean, corrupt, lambda logits: logits[:, -1, 4].mean(),
        ...                   receivers=[mk.Site("q", layer=1, head=0)], progress=False)
        >>> r.axes, tuple(r.scores.shape), r.method
        (('layer', 'head'), (2, 4), 'noising')
        >>> bool((r.scores[1] == r.clean_score).all())  # layer 1 cannot reach a layer-1 query
        True
    """
    check_budget(memory_budget)
    if direction is None and ablation in (None, "corrupt"):
        direction = "noising"  # Wang et al.'s path patching (docstring)
    contrast = resolve_contrast(
        model, clean, corrupt, metric, direction=direction, ablation=ablation, reference=reference
    )
    size = prompts_per_pass(contrast.n_prompts, batch_size, contrast.metric)
    kwargs: dict[str, Any] = {
        "senders": senders, "receivers": receivers, "reference": reference, "seed": seed,
        "layers": layers, "memory_budget": memory_budget,
    }  # fmt: skip
    if size < contrast.n_prompts:
        return patch_in_batches(
            path_patch, model, contrast, size, progress=progress, executor=executor, **kwargs
        )
    if executor is not None:  # one batch: one task
        given = dict(kwargs, direction=direction, ablation=ablation, progress=False)
        ((_, result),) = executor.each_batch(
            model, path_patch, 1, None, lambda rows: ((clean, corrupt, metric), given)
        )
        return result
    cfg = model.cfg
    n_batch, seq = contrast.base_tokens.shape
    receiver_sites = _receivers(model, receivers)
    axes, labels, sender_sites = _senders(model, senders, layers)
    sender_names = {s.hook_name for _, s in sender_sites}
    frozen_names = {f"blocks.{j}.attn.hook_z" for j in range(cfg.n_layers)}
    base = engine.run_base(model, contrast.base_tokens, sender_names | frozen_names)
    values, source_logits = source_acts(model, contrast, sender_names, base.acts, seed)
    # (batch, pos, ...) views: the ablations' values broadcast over the batch or positions
    source = {name: values[name].expand_as(base.acts[name]) for name in sender_names}
    reader = engine.MetricReader(contrast.metric, base)
    base_value, base_per_prompt = engine.base_score(reader, base)
    clean_score, corrupt_score = clean_and_corrupt(
        model, contrast, reader, base_value, source_logits
    )
    to_final = receiver_sites is None
    receiver_list = receiver_sites or []
    last_receiver = cfg.n_layers if to_final else max(_layer(s) for s in receiver_list)

    # step 1: sender patched, every other head frozen; record the receivers' inputs
    freeze = {j: base.acts[f"blocks.{j}.attn.hook_z"] for j in range(cfg.n_layers)}
    jobs, noop = [], []
    for index, site in sender_sites:
        start = engine.first_difference(
            base.acts[site.hook_name][
                site.with_(position=None).index(base.acts[site.hook_name].ndim)
            ],
            source[site.hook_name][site.with_(position=None).index(source[site.hook_name].ndim)],
            1,
        )
        if start is None or _layer(site) >= last_receiver:
            noop.append(index)
            continue
        capture = (
            ()
            if to_final
            else tuple(sorted({r.hook_name for r in receiver_list if _layer(r) > _layer(site)}))
        )
        job = _sender_job(
            index, site, start, source[site.hook_name], freeze, seq, cfg.n_layers, capture
        )
        if not to_final:  # the recording pass needs blocks up to the last receiver only
            job.stop = last_receiver + 1
        jobs.append(job)

    shape = tuple(len(labels[a]) for a in axes)
    scores = torch.full(shape, float(base_value))
    per_prompt = (
        None if base_per_prompt is None else base_per_prompt.expand(*shape, n_batch).clone()
    )
    budget = parse_budget(memory_budget, base.tokens.device)
    steps = len(jobs) * (1 if to_final else 2)
    bar = progress_bar(steps, "path patching", enabled=progress, unit="patch")
    try:
        recorded: dict[Any, tuple[dict[str, Tensor], int]] = {}
        for chunk in engine.run_jobs(model, base, jobs, reader, budget=budget, progress=bar):
            for res in chunk:
                if to_final:
                    _store(scores, per_prompt, res.key, res.score, res.per_prompt)
                else:
                    recorded[res.key] = (res.captured, res.captured_from)
        if not to_final:
            # step 2: the reference run with only the receivers' inputs replaced
            second = []
            for job in jobs:
                values, recorded_from = recorded[job.key]
                edits = _receiver_edits(receiver_list, values, recorded_from, job.layer)
                first = min(int(name.split(".")[1]) for name in edits)
                second.append(engine.PatchJob(job.key, first, job.start, edits))
            for chunk in engine.run_jobs(model, base, second, reader, budget=budget, progress=bar):
                for res in chunk:
                    _store(scores, per_prompt, res.key, res.score, res.per_prompt)
    finally:
        bar.close()
    if per_prompt is not None and torch.isnan(per_prompt).any():
        per_prompt = None
    return PatchResult(
        scores=scores,
        per_prompt=per_prompt,
        axes=axes,
        labels=labels,
        tick_labels=tick_labels(model, axes, labels, contrast.clean_tokens),
        clean_score=clean_score,
        corrupt_score=corrupt_score,
        method=contrast.method,
        site="path to "
        + (FINAL_RESIDUAL if to_final else ", ".join(r.label for r in receiver_list)),
        metric_name=metric_name(contrast.metric),
    )


def _layer(site: Site) -> int:
    """The layer of a resolved sender or receiver site (every one has a layer)."""
    assert site.layer is not None
    return site.layer


def _store(
    scores: Tensor, per_prompt: Tensor | None, key: Any, score: Tensor, pp: Tensor | None
) -> None:
    scores[key] = score
    if per_prompt is not None:
        per_prompt[key] = pp if pp is not None else float("nan")


def _receivers(model: Model, receivers: Any) -> list[Site] | None:
    if isinstance(receivers, str):
        if receivers != FINAL_RESIDUAL:
            raise InvalidSiteError(
                f"Expected receivers {FINAL_RESIDUAL!r} or a list of Site('q'|'k'|'v', layer=, "
                f"head=); got {receivers!r}."
            )
        return None
    items = [receivers] if isinstance(receivers, Site) else list(receivers)
    if not items:
        raise InvalidSiteError("Expected at least one receiver; got an empty list.")
    out = []
    for item in items:
        if not isinstance(item, Site) or item.component not in _RECEIVER_COMPONENTS:
            raise InvalidSiteError(
                f"Expected receivers as Site('q' | 'k' | 'v', layer=, head=) or "
                f"{FINAL_RESIDUAL!r}; got {item!r}."
            )
        if item.head is None or item.position is not None:
            raise InvalidSiteError(
                f"Expected a receiver with one head and no position (all positions); got "
                f"{item.label!r}. Hint: Site('q', layer=9, head=6)."
            )
        out.append(item.resolve(model))
    return out


def _senders(
    model: Model, senders: Any, layers: Sequence[int] | None
) -> tuple[tuple[str, ...], dict[str, list[Any]], list[tuple[tuple[int, ...], Site]]]:
    cfg = model.cfg
    cells: list[tuple[tuple[int, ...], Site]]
    if isinstance(senders, str) and senders not in ("heads", "mlps", "all"):
        raise InvalidSiteError(  # a choice of sites: the same error as a bad list of Sites
            f"Expected senders 'heads', 'mlps', 'all' or a list of Sites; got {senders!r}."
            + did_you_mean(senders, ["heads", "mlps", "all"])
        )
    layer_list = choose("layers", layers, cfg.n_layers)
    has_mlp = not getattr(cfg, "attn_only", False)
    if senders == "heads":
        cells = [
            ((li, h), Site("z", layer=layer, head=h))
            for li, layer in enumerate(layer_list)
            for h in range(cfg.n_heads)
        ]
        return ("layer", "head"), {"layer": layer_list, "head": list(range(cfg.n_heads))}, cells
    if senders == "mlps":
        if not has_mlp:
            raise InvalidSiteError(
                "Expected a model with MLPs for senders='mlps'; this one is attention-only."
            )
        cells = [((li,), Site("mlp_out", layer=layer)) for li, layer in enumerate(layer_list)]
        return ("layer",), {"layer": layer_list}, cells
    if senders == "all":
        sites = [Site("z", layer=layer, head=h) for layer in layer_list for h in range(cfg.n_heads)]
        if has_mlp:
            sites += [Site("mlp_out", layer=layer) for layer in layer_list]
    else:
        sites = [senders] if isinstance(senders, Site) else list(senders)
    cells = []
    for i, site in enumerate(sites):
        ok = isinstance(site, Site) and (
            (site.component == "z" and site.head is not None) or site.component == "mlp_out"
        )
        if not ok or site.position is not None:
            raise InvalidSiteError(
                f"Expected senders Site('z', layer=, head=) or Site('mlp_out', layer=), all "
                f"positions; got {site!r}."
            )
        cells.append(((i,), site.resolve(model)))
    return ("site",), {"site": [s.label for _, s in cells]}, cells


def _sender_job(
    key: tuple[int, ...],
    site: Site,
    start: int,
    source: Tensor,
    freeze: dict[int, Tensor],
    seq: int,
    n_layers: int,
    capture: tuple[str, ...],
) -> engine.PatchJob:
    """Sender at its source value; every attention head after it frozen at the reference."""
    index = site.with_(position=None).index(source.ndim)
    edits: dict[str, engine.Edit] = {}

    def set_sender(rows: Tensor, first: int) -> None:
        rows[index] = source.narrow(1, first, seq - first)[index]

    edits[site.hook_name] = set_sender
    for j in range(_layer(site) + 1, n_layers):

        def freeze_heads(rows: Tensor, first: int, frozen: Tensor = freeze[j]) -> None:
            rows.copy_(frozen.narrow(1, first, seq - first))

        edits[f"blocks.{j}.attn.hook_z"] = freeze_heads
    return engine.PatchJob(key, _layer(site), start, edits, capture)


def _receiver_edits(
    receivers: list[Site], recorded: dict[str, Tensor], recorded_from: int, sender_layer: int
) -> dict[str, engine.Edit]:
    """Edits writing the recorded inputs (positions ``recorded_from``..) into the receivers."""
    by_hook: dict[str, list[int]] = {}
    for r in receivers:
        if _layer(r) > sender_layer and r.head is not None:
            by_hook.setdefault(r.hook_name, []).append(r.head)
    edits: dict[str, engine.Edit] = {}
    for name, heads in by_hook.items():
        value = recorded[name]
        head_index = torch.tensor(sorted(set(heads)))

        def write(
            rows: Tensor, first: int, value: Tensor = value, heads: Tensor = head_index
        ) -> None:
            # rows cover positions first..; the recording covers recorded_from..; before the
            # sender's start both hold the reference values, so align on the later of the two
            skip_rows, skip_value = max(0, recorded_from - first), max(0, first - recorded_from)
            rows[:, skip_rows:, heads] = value[:, skip_value:, heads]

        edits[name] = write
    return edits
