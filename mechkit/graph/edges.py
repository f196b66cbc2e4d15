"""Edge attribution: a score for every edge of the model's graph.

The score of an edge ``u -> v`` estimates how the metric changes when the receiver ``v`` sees the
sender ``u``'s ablated output (corrupt, mean or zero) instead of its clean one, everything else
clean (noising). The methods live in :mod:`mechkit.graph.methods`, one module each, and are
looked up by name in :data:`~mechkit.graph.EDGE_METHODS`:

=======================  ===========================================================================
``"eap"``                gradient on the clean run times the sender's change (Syed et al. 2023)
``"eap-ig-inputs"``      the gradient integrated along the input embeddings (Hanna et al. 2024)
``"eap-ig-activations"`` the gradient integrated along each sender block's outputs in turn
``"exact"``              each edge ablated for real, one run per edge: small graphs and checks
=======================  ===========================================================================

A new method is one module there and one registry entry (:mod:`mechkit.graph.registry`).

Comparing with the reference implementation (hannamw/EAP-IG): ``"eap"``, ``"eap-ig-inputs"`` and
``"exact"`` give its numbers to float precision once two conventions are matched. mechkit
differentiates the metric's mean over the prompts, so a score is the mean over prompts of each
prompt's score; the reference sums each batch's gradients and divides by the number of prompts,
so give it a metric that sums over the batch. Its EAP-IG step grid may differ (see
:mod:`mechkit.graph.methods.eap_ig_inputs`). :meth:`CircuitGraph.to_eap_ig` writes its JSON.

Scores are ``(sender, receiver)`` in a :class:`~mechkit.graph.CircuitGraph` (zero where no edge
exists). Prompts of unequal length are right-padded and scored at their answer positions; with
``ablation="corrupt"`` the corrupt prompt of each pair must have its clean prompt's length.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

import mechkit.graph.methods  # noqa: F401  (registers the built-in methods)
from mechkit.core import (
    Model,
    check_budget,
    each_batch,
    metric_name,
    model_name,
    prompts_per_pass,
)
from mechkit.errors import (
    InvalidArgumentError,
    ShapeError,
    check_batch_size,
    check_choice,
    check_positive_int,
)
from mechkit.graph.circuit import CircuitGraph
from mechkit.graph.methods.eap_ig_activations import IG_AVERAGES
from mechkit.graph.registry import EDGE_METHODS
from mechkit.graph.setup import (
    EdgeSetup,
    all_ablated_score,
    batch_metric,
    edge_setup,
    mean_value,
    resolve_edge_contrast,
)
from mechkit.patching.activation import PaddedPrompts

if TYPE_CHECKING:
    from mechkit.core import Contrast
    from mechkit.distributed import RayExecutor

__all__ = ["edge_attribution", "EdgeSetup", "batch_metric", "mean_value", "each_batch"]


def edge_attribution(
    model: Model,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    method: str = "eap",
    ablation: str | None = None,
    direction: str | None = None,
    reference: Any = None,
    steps: int | None = None,
    ig_average: str | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
    executor: RayExecutor | None = None,
    **options: Any,
) -> CircuitGraph:
    """Score every edge of the model's graph.

    Args:
        model: a HookedTransformer (pre-norm; grouped-query attention supported).
        clean: a :class:`PromptPairs` (metric defaults to its logit difference) or clean
            prompts; ``corrupt`` then gives the corrupt prompts.
        metric: a mechkit :class:`Metric` or a differentiable function logits -> score.
        method: a name in :data:`~mechkit.graph.EDGE_METHODS`: ``"eap"`` (default),
            ``"eap-ig-inputs"``, ``"eap-ig-activations"``, ``"exact"``, or one registered since.
        ablation: what a dropped edge carries: the sender's output on the ``"corrupt"`` prompt
            (the default), its ``"mean"`` over the ``reference`` prompts (default: the corrupt
            ones, else the clean ones), or ``"zero"``.
        direction: ``"noising"`` only (the default for every ablation here, unlike the core's
            ``"denoising"`` for ``"corrupt"``): an edge score is defined as the change when it
            alone is ablated in the clean run, which is what a circuit is then evaluated by.
        steps: integration points of the EAP-IG methods (default 5).
        ig_average: ``"sender-runs"`` (default) or ``"all-runs"``, for
            ``"eap-ig-activations"`` (:mod:`mechkit.graph.methods.eap_ig_activations`).
        batch_size: prompts per pass (None: all).
        memory_budget: bytes (or ``"2GB"``) for the circuits ``"exact"`` runs side by side;
            None: 2 GiB on CPU, 60% of free memory on CUDA.
        progress: a progress bar for the multi-pass methods.
        executor: a :class:`~mechkit.distributed.RayExecutor`: each batch of ``batch_size``
            prompts is one task on its actors (each holds the model, shipped once), scored
            there against the whole reference set; the scores (means over prompts) are combined
            here, weighted by the batches' sizes. Needs a mechkit Metric when it splits.
        options: further options of a registered method.

    Returns:
        A :class:`CircuitGraph` with a score for every edge.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 9, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 0].mean()
        >>> graph = mk.edge_attribution(model, clean, corrupt, metric)
        >>> graph
        CircuitGraph(attn-only-2l, eap, 81 of 81 edges, ablation=corrupt)
        >>> [(name, round(score, 4)) for name, score in graph.top(2)]
        [('input->L0H0.v', -0.0076), ('input->L1H3.v', 0.0053)]
    """
    entry = EDGE_METHODS[method]
    given = {"steps": steps, "ig_average": ig_average, **options}
    given = {name: value for name, value in given.items() if value is not None}
    if "steps" in given:
        check_positive_int("steps", given["steps"])
        if "steps" not in entry.options:
            warnings.warn(
                f"steps has no effect with method {method!r} (it does not integrate); passing "
                "it will be refused in a later release.",
                DeprecationWarning,
                stacklevel=2,
            )
            del given["steps"]
    unknown = sorted(set(given) - set(entry.options))
    if unknown:
        raise InvalidArgumentError(
            f"Expected only the options of method {method!r} ({list(entry.options) or 'none'}); "
            f"got {unknown}. Hint: mk.graph.EDGE_METHODS[{method!r}].options lists them; "
            "ig_average is an option of 'eap-ig-activations'."
        )
    if "ig_average" in given:
        check_choice("ig_average", given["ig_average"], IG_AVERAGES)
    check_batch_size(batch_size)
    check_budget(memory_budget)
    contrast = resolve_edge_contrast(
        model, clean, corrupt, metric, direction=direction, ablation=ablation, reference=reference
    )
    if executor is not None:
        size = prompts_per_pass(contrast.n_prompts, batch_size, contrast.metric)
        given = dict(given, method=method, memory_budget=memory_budget)
        return _on_executor(executor, model, contrast, size, given)
    setup = edge_setup(model, contrast, batch_size=batch_size, memory_budget=memory_budget)
    layout = setup.layout
    result = entry.function(model, setup, progress=progress, **{**entry.options, **given})
    if tuple(result.scores.shape) != tuple(layout.valid.shape):
        raise ShapeError(
            f"Expected method {method!r} to return (sender, receiver) = "
            f"{tuple(layout.valid.shape)} scores; got {tuple(result.scores.shape)}."
        )
    scores = result.scores.detach().cpu().float()
    scores = torch.where(layout.valid, scores, torch.zeros((), dtype=scores.dtype))
    return CircuitGraph(
        layout=layout,
        scores=scores,
        mask=None,
        method=f"{method} ({result.detail})" if result.detail else method,
        ablation=contrast.ablation,
        metric_name=metric_name(contrast.metric),
        clean_score=float(result.clean_score),
        ablated_score=all_ablated_score(model, setup),
        model_name=model_name(model),
    )


def _on_executor(
    executor: RayExecutor, model: Model, contrast: Contrast, size: int, given: dict[str, Any]
) -> CircuitGraph:
    """Each batch one task: :func:`edge_attribution` of its prompts with the whole reference
    set; every score a mean over prompts, so the graph is the size-weighted mean of theirs."""
    n = contrast.n_prompts
    reference = None
    if contrast.reference_tokens is not None and contrast.reference_mask is not None:
        reference = PaddedPrompts(contrast.reference_tokens, contrast.reference_mask)
    kwargs = dict(given, ablation=contrast.ablation, reference=reference, progress=False)

    def inputs(rows: slice) -> tuple[tuple[Any, ...], dict[str, Any]]:
        corrupt = None
        if contrast.corrupt_tokens is not None and contrast.corrupt_mask is not None:
            corrupt = PaddedPrompts(contrast.corrupt_tokens[rows], contrast.corrupt_mask[rows])
        clean = PaddedPrompts(contrast.clean_tokens[rows], contrast.clean_mask[rows])
        return (clean, corrupt, batch_metric(contrast.metric, rows, n)), kwargs

    parts = executor.each_batch(model, edge_attribution, n, size, inputs)
    weights = [(rows.stop - rows.start) / n for rows, _ in parts]
    graphs: list[CircuitGraph] = [graph for _, graph in parts]

    def mean(values: list[float | None]) -> float | None:
        if any(v is None for v in values):
            return None
        return sum(w * float(v) for w, v in zip(weights, values, strict=True))  # type: ignore[arg-type]

    first = graphs[0]
    return CircuitGraph(
        layout=first.layout,
        scores=sum(w * g.scores.double() for w, g in zip(weights, graphs, strict=True)).float(),
        mask=None,
        method=first.method,
        ablation=first.ablation,
        metric_name=metric_name(contrast.metric),
        clean_score=mean([g.clean_score for g in graphs]),
        ablated_score=mean([g.ablated_score for g in graphs]),
        model_name=first.model_name,
    )
