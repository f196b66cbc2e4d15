"""Edge attribution: a score for every edge of the graph (EAP, EAP-IG, exact patching).

The score of an edge ``u -> v`` estimates how the metric changes when the receiver ``v`` sees the
sender ``u``'s ablated output (corrupt, mean or zero) instead of its clean one, everything else
clean (noising):

* ``"eap"`` (Syed et al. 2023): ``(a'_u - a_u) . dM/d(input_v)`` with the gradient on the clean
  run; every edge from one forward and one backward pass per batch.
* ``"eap-ig-inputs"`` (Hanna et al. 2024): the gradient averaged over ``steps`` runs whose input
  embeddings move in a straight line from the ablated to the clean ones (points k/steps,
  k = 1..steps, so ``steps=1`` is EAP).
* ``"eap-ig-activations"``: the same integral taken per component block: for the senders of one
  block (the input, the heads of layer L, the MLP of layer L) their outputs move from ablated to
  clean while the rest of the model runs clean; (2 n_layers + 1) x steps runs. Which runs an
  edge's gradient is averaged over is ``ig_average``:

  - ``"sender-runs"`` (the default): only the runs that move the edge's own sender block. This
    is the integrated-gradients estimate of the edge's path from the sender's ablated to its
    clean output, the other blocks held clean, which is what an edge score claims to be;
    gradients from runs that move some other block measure a different path. It is also
    cheaper: a run that moves block L starts at block L from the cached clean residual, so its
    forward and backward passes cover only the layers from L on.
  - ``"all-runs"``: every edge's gradient averaged over all the blocks' runs, as Hanna et al.'s
    reference code (hannamw/EAP-IG, ``ig-activations``) does; use it to compare with published
    scores (the two agree only roughly: Pearson r about 0.95 on attn-only-2l). The gradients
    the runs of block L send into the clean layers before L are carried back to those layers'
    receivers in one backward pass of the clean run, so it costs little more than the default.

  The points of one block run as one batch (``steps`` stacked copies of the prompts).
* ``"exact"``: each edge patched for real (one run per edge, batched): for small graphs and to
  check the others.

Comparing with the reference implementation (hannamw/EAP-IG): ``"eap"``, ``"eap-ig-inputs"`` and
``"exact"`` give its numbers to float precision once two conventions are matched.

* Per-prompt division: mechkit differentiates the metric's mean over the prompts, so a score
  is the mean over prompts of each prompt's score. The reference sums each batch's gradients
  and divides the total by the number of prompts; with a metric that already averages over the
  batch (its ``mean=True``) its scores are ours divided by the batch size, so give it a metric
  that sums over the batch (or multiply its scores by the batch size).
* Step grid: mechkit's points are ``k / steps`` for ``k = 1..steps`` (the clean end included,
  so ``steps=1`` is EAP); the reference's ``ig-activations`` uses the same grid. Its EAP-IG on
  inputs has, in the version read (``get_scores_eap_ig``), ``k = 0..steps-1``: the ablated end
  included and the clean one left out, a grid no ``steps`` of mechkit's reproduces. Check the
  version you compare with; where it differs, compare the two at many steps (both tend to the
  same integral) or put the reference's loop on ``k = 1..steps``.

Scores are ``(sender, receiver)`` in a :class:`~mechkit.graph.CircuitGraph` (zero where no edge
exists). Prompts of unequal length are right-padded and scored at their answer positions;
clean and corrupt prompts of a pair must have the same length (the corrupt value of each
position is patched).

    >>> graph = mk.edge_attribution(model, pairs, method="eap-ig-inputs", steps=5)
    >>> circuit = graph.top_edges(200).prune()
    >>> mk.evaluate_circuit(model, circuit, pairs).faithfulness
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from mechkit.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    OutOfMemoryError,
    PromptLengthError,
    ShapeError,
    check_batch_size,
    check_choice,
    check_positive_int,
)
from mechkit.graph.circuit import CircuitGraph
from mechkit.graph.layout import GraphLayout
from mechkit.graph.runs import (
    _receiver_hook_names,
    graph_mode,
    masked_logits,
    receiver_gradients,
    sender_outputs,
)
from mechkit.hook_scope import hook_scope
from mechkit.metrics import Metric, check_metric_value
from mechkit.patching.engine import _is_oom
from mechkit.prompts import PromptPairs
from mechkit.tokens import token_batch

__all__ = ["edge_attribution", "EdgeSetup", "prepare"]

Method = Literal["eap", "eap-ig-inputs", "eap-ig-activations", "exact"]
METHODS: tuple[str, ...] = ("eap", "eap-ig-inputs", "eap-ig-activations", "exact")
Ablation = Literal["corrupt", "mean", "zero"]
IgAverage = Literal["sender-runs", "all-runs"]
IG_AVERAGES: tuple[str, ...] = ("sender-runs", "all-runs")


@dataclasses.dataclass(frozen=True, eq=False)
class EdgeSetup:
    """Checked inputs of a graph run: tokens, metric, ablated sender outputs."""

    layout: GraphLayout
    clean_tokens: Tensor
    corrupt_tokens: Tensor | None
    metric: Any
    ablation: str
    ablated: Tensor  # (batch or 1, pos or 1, sender, d_model)
    clean_senders: Tensor  # (batch, pos, sender, d_model)
    batch_size: int


def prepare(
    model: Any,
    clean: Any,
    corrupt: Any,
    metric: Any,
    *,
    ablation: str,
    reference: Any = None,
    batch_size: int | None = None,
    need_aligned: bool = True,
) -> EdgeSetup:
    """Tokens, metric and the ablated sender outputs, all checked before the long work."""
    batch_size = check_batch_size(batch_size)
    layout = GraphLayout.from_model(model)
    check_choice("ablation", ablation, ["corrupt", "mean", "zero"])
    ref_tokens = ref_mask = None
    if isinstance(clean, PromptPairs):
        pairs = clean
        if corrupt is not None:
            raise InvalidArgumentError(
                "Expected corrupt=None when clean is a PromptPairs (it holds both runs); got "
                f"{type(corrupt).__name__}."
            )
        pairs.check_fits(model)
        clean_tokens, corrupt_tokens = pairs.clean_tokens, pairs.corrupt_tokens
        if need_aligned and ablation == "corrupt" and not pairs.is_aligned:
            raise PromptLengthError(
                "Expected each corrupt prompt to have its clean prompt's token length (edges "
                "carry the corrupt value of the same position); some pairs differ. Hint: "
                "ablation='mean' or 'zero' needs no aligned corruptions."
            )
        if metric is None:
            from mechkit.metrics import LogitDiff

            metric = LogitDiff.from_pairs(pairs)
        if reference is None:
            ref_tokens, ref_mask = pairs.corrupt_tokens, pairs.corrupt_mask
    else:
        clean_tokens = token_batch(model, clean)[0]
        corrupt_tokens = None if corrupt is None else token_batch(model, corrupt)[0]
        if reference is None and corrupt is not None:
            ref_tokens, ref_mask = token_batch(model, corrupt)
    if metric is None or not callable(metric):
        raise InvalidTypeError(
            "Expected a metric: a mechkit Metric or a differentiable function logits -> score; "
            f"got {metric!r}. Hint: mk.LogitDiff.from_pairs(pairs)."
        )
    if reference is not None:
        ref_tokens, ref_mask = token_batch(model, reference)
    device = model.cfg.device
    clean_tokens = clean_tokens.to(device)
    corrupt_tokens = None if corrupt_tokens is None else corrupt_tokens.to(device)
    n_batch = clean_tokens.shape[0]
    size = batch_size or n_batch
    if size < n_batch and not isinstance(metric, Metric):
        raise InvalidTypeError(
            "Expected a mechkit Metric (it can be restricted to a batch) when batch_size splits "
            f"the prompts; got {type(metric).__name__}. Hint: batch_size=None."
        )
    clean_senders = _senders_in_batches(model, layout, clean_tokens, size)
    if ablation == "corrupt":
        if corrupt_tokens is None:
            raise InvalidArgumentError(
                "Expected corrupt prompts for ablation='corrupt'; got None. Hint: ablation="
                "'mean' (over reference prompts) or 'zero'."
            )
        if corrupt_tokens.shape != clean_tokens.shape:
            raise PromptLengthError(
                f"Expected clean and corrupt token batches of one shape; got "
                f"{tuple(clean_tokens.shape)} and {tuple(corrupt_tokens.shape)}."
            )
        ablated = _senders_in_batches(model, layout, corrupt_tokens, size)
    elif ablation == "zero":
        ablated = torch.zeros_like(clean_senders[:1, :1])
    else:
        if ref_tokens is None:
            ref_tokens = clean_tokens
            ref_mask = torch.ones_like(clean_tokens, dtype=torch.bool)
        ref = _senders_in_batches(model, layout, ref_tokens.to(device), size)
        mask = ref_mask.to(device)
        if bool(mask.all()) and mask.shape[1] == clean_tokens.shape[1]:
            ablated = ref.mean(0, keepdim=True)  # per position
        else:
            weights = mask.to(ref.dtype)[:, :, None, None]
            ablated = ((ref * weights).sum((0, 1)) / weights.sum())[None, None]
    return EdgeSetup(
        layout, clean_tokens, corrupt_tokens, metric, ablation, ablated, clean_senders, size
    )


def _senders_in_batches(model: Any, layout: GraphLayout, tokens: Tensor, size: int) -> Tensor:
    parts: list[Tensor] = []
    each_batch(
        len(tokens), size, lambda rows: parts.append(sender_outputs(model, layout, tokens[rows]))
    )
    return torch.cat(parts)


def each_batch(
    n_batch: int, size: int, work: Callable[[slice], None], can_split: bool = True
) -> None:
    """``work(rows)`` for consecutive slices of at most ``size`` prompts. A slice that runs out
    of memory is retried in halves (``work`` must keep nothing from a failed call)."""
    size = check_batch_size(size) or max(1, n_batch)  # a size below 1 would loop forever
    start = 0
    while start < n_batch:
        stop = min(start + size, n_batch)
        try:
            work(slice(start, stop))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not _is_oom(exc):
                raise
            if stop - start == 1 or not can_split:
                raise OutOfMemoryError(
                    f"Out of memory on {stop - start} prompt(s) of the graph run. Hint: fewer or "
                    "shorter prompts, or a mechkit Metric so batches can be split."
                ) from exc
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = (stop - start) // 2
            continue
        start = stop


def edge_attribution(
    model: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    method: Method = "eap",
    steps: int = 5,
    ablation: Ablation = "corrupt",
    reference: Any = None,
    batch_size: int | None = None,
    progress: bool = True,
    ig_average: IgAverage = "sender-runs",
) -> CircuitGraph:
    """Score every edge of the model's graph.

    Args:
        model: a HookedTransformer (pre-norm; grouped-query attention supported).
        clean: a :class:`PromptPairs` (metric defaults to its logit difference) or clean
            prompts; ``corrupt`` then gives the corrupt prompts (same token lengths).
        metric: a mechkit :class:`Metric` or a differentiable function logits -> score.
        method: ``"eap"``, ``"eap-ig-inputs"``, ``"eap-ig-activations"`` or ``"exact"``.
        steps: integration points of the EAP-IG methods (5 is typical).
        ablation: what a dropped edge carries: the sender's output on the ``"corrupt"`` prompt,
            its ``"mean"`` over ``reference`` prompts (default: the corrupt ones; per position
            when they are unpadded and as long as the clean ones), or ``"zero"``.
        batch_size: prompts per pass (None: all); exact runs also split edges to fit.
        progress: a progress bar for the multi-pass methods.
        ig_average: which runs ``"eap-ig-activations"`` averages an edge's gradient over:
            ``"sender-runs"`` (the runs that interpolate the sender's own block) or
            ``"all-runs"`` (every block's runs, as Hanna et al.'s reference code does); see
            the module docstring.

    Returns:
        A :class:`CircuitGraph` with a score for every edge.

    Example:
        >>> graph = mk.edge_attribution(model, pairs, method="eap")
        >>> graph.top_edges(5).edge_names()
    """
    check_choice("method", method, METHODS)
    check_positive_int("steps", steps)
    check_batch_size(batch_size)
    check_choice("ig_average", ig_average, IG_AVERAGES)
    if ig_average != "sender-runs" and method != "eap-ig-activations":
        raise InvalidArgumentError(
            f"Expected ig_average='sender-runs' (the only meaning) for method {method!r}; got "
            f"{ig_average!r}. Hint: ig_average chooses between estimators of "
            "method='eap-ig-activations' only."
        )
    setup = prepare(
        model,
        clean,
        corrupt,
        metric,
        ablation=ablation,
        reference=reference,
        batch_size=batch_size,
        need_aligned=True,
    )
    layout = setup.layout
    if method == "exact":
        scores, clean_score = _exact(model, setup, progress)
    else:
        scores, clean_score = _gradient_scores(model, setup, method, steps, ig_average, progress)
    scores = torch.where(layout.valid, scores.cpu(), torch.zeros((), dtype=scores.dtype))
    ablated_score = _ablated_score(model, setup)
    return CircuitGraph(
        layout=layout,
        scores=scores.float(),
        mask=None,
        method=_method_label(method, steps, ig_average),
        ablation=ablation,
        metric_name=_metric_name(setup.metric),
        clean_score=clean_score,
        ablated_score=ablated_score,
        model_name=str(model.cfg.model_name),
    )


def _method_label(method: str, steps: int, ig_average: str) -> str:
    if method in ("eap", "exact"):
        return method
    if method == "eap-ig-activations" and ig_average == "all-runs":
        return f"{method} ({steps} steps, all runs)"
    return f"{method} ({steps} steps)"


def _metric_name(metric: Any) -> str:
    return type(metric).__name__ if isinstance(metric, Metric) else getattr(metric, "__name__", "")


def batch_metric(metric: Any, rows: slice, n_batch: int) -> Any:
    if rows.start == 0 and rows.stop == n_batch:
        return metric
    return metric.select(rows)


def mean_value(metric: Any, logits: Tensor) -> Tensor:
    """The metric as a differentiable scalar (mean over prompts)."""
    value = metric.per_prompt(logits).mean() if isinstance(metric, Metric) else metric(logits)
    value = check_metric_value(value, logits.shape[0])  # ShapeError on a vector of another length
    if value.ndim == 1:
        value = value.mean()
    if value.ndim != 0:
        raise ShapeError(
            f"Expected the metric to return a scalar or one value per prompt; got shape "
            f"{tuple(value.shape)}."
        )
    return value


def _gradient_scores(
    model: Any, setup: EdgeSetup, method: str, steps: int, ig_average: str, progress: bool
) -> tuple[Tensor, float]:
    """Gradient-times-difference scores. The integration points of one block (or of the input)
    run as one batch of ``steps`` stacked copies of the prompts, and a run that interpolates a
    block starts at that block from the clean residual (everything before it runs clean), so
    its forward and backward passes cover only the layers from the block on."""
    layout = setup.layout
    n_batch = setup.clean_tokens.shape[0]
    scores = torch.zeros(len(layout.senders), len(layout.receivers), device=setup.ablated.device)
    groups = _sender_groups(layout) if method == "eap-ig-activations" else [(0, 1)]
    n_points = 1 if method == "eap" else steps
    alphas = torch.arange(1, n_points + 1, device=setup.ablated.device) / n_points
    total = (n_batch + setup.batch_size - 1) // setup.batch_size * len(groups)
    bar = _bar(total, f"{method} edges", progress and total > 1)
    totals = {"clean": 0.0}
    all_runs = method == "eap-ig-activations" and ig_average == "all-runs"

    def work(rows: slice) -> None:
        weight = (rows.stop - rows.start) / n_batch
        metric = batch_metric(setup.metric, rows, n_batch)
        tokens = setup.clean_tokens[rows]
        clean = setup.clean_senders[rows]
        ablated = setup.ablated if setup.ablated.shape[0] == 1 else setup.ablated[rows]
        ablated = ablated.expand_as(clean)
        delta = ablated - clean  # (batch, pos, sender, d_model)
        local = torch.zeros_like(scores)
        values: list[float] = []
        starts = _clean_block_inputs(model, layout, tokens, method, graph=all_runs)
        summed = None  # all-runs: the receiver gradients summed over every run
        for first, stop in groups:
            layer, residual, overrides = _interpolation(
                layout, clean, ablated, alphas, (first, stop), starts
            )
            if all_runs:
                residual.requires_grad_(True)

            def value_of(logits: Tensor, m: Any = metric) -> Tensor:
                # the sum over the stacked points of the mean metric: its gradient is the sum
                # of each point's gradient
                parts = [mean_value(m, part) for part in logits.chunk(len(alphas))]
                values.append(float(parts[-1].detach()))  # the last point (alpha = 1)
                return torch.stack(parts).sum()

            grads, _, _ = receiver_gradients(
                model, layout, tokens, value_of, overrides=overrides, residual=residual,
                start_layer=layer, repeats=len(alphas),
            )  # fmt: skip
            if all_runs:
                summed = grads if summed is None else summed + grads
                # (alpha * batch, pos, d_model) -> summed over the points
                pushed = residual.grad.reshape(len(alphas), *tokens.shape, -1).sum(0)
                starts["grads"][layer] = starts["grads"].get(layer, 0) + pushed
            else:
                scored = slice(first, stop) if len(groups) > 1 else slice(None)
                _add_scores(local, delta, grads / len(alphas), scored)
            if bar is not None:
                bar.update(1)
        if all_runs:
            summed = summed + _prefix_gradients(starts)  # type: ignore[operator]
            _add_scores(local, delta, summed / (len(groups) * len(alphas)), slice(None))
        scores.add_(local * weight)  # only once the whole batch has run
        totals["clean"] += values[0] * weight

    try:
        each_batch(n_batch, setup.batch_size, work, isinstance(setup.metric, Metric))
    finally:
        if bar is not None:
            bar.close()
    return scores, totals["clean"]


def _add_scores(local: Tensor, delta: Tensor, grads: Tensor, senders: slice) -> None:
    """``local[senders] += delta[senders] . grads`` summed over (batch, pos, d_model), as one
    matrix product: (sender, b * p * d) x (b * p * d, receiver)."""
    d_part = delta[:, :, senders].permute(2, 0, 1, 3)  # (sender, batch, pos, d_model)
    g_part = grads.permute(2, 0, 1, 3)  # (receiver, batch, pos, d_model)
    local[senders] += d_part.reshape(d_part.shape[0], -1) @ g_part.reshape(g_part.shape[0], -1).T


def _clean_block_inputs(
    model: Any, layout: GraphLayout, tokens: Tensor, method: str, *, graph: bool
) -> dict[str, Any]:
    """The clean residual entering each block, ``{"resid": {layer: (batch, pos, d_model)}}``.

    With ``graph`` the run keeps its autograd graph and receiver inputs (``"inputs"``), so
    that gradients arriving at a block's input can be carried back to the receivers before it
    in one backward pass (:func:`_prefix_gradients`)."""
    out: dict[str, Any] = {"resid": {}, "inputs": {}, "grads": {}}
    if method != "eap-ig-activations":
        return out
    hooks = []
    for layer in range(layout.n_layers):

        def keep(act: Tensor, hook: Any, layer: int = layer) -> Tensor:
            if layer == 0 and graph:
                act = act.detach().requires_grad_(True)
            out["resid"][layer] = act
            return act

        hooks.append((f"blocks.{layer}.hook_resid_pre", keep))
    if graph:
        for name, first, _ in _receiver_hook_names(layout):

            def keep_input(act: Tensor, hook: Any, first: int = first) -> None:
                out["inputs"][first] = act

            hooks.append((name, keep_input))
    with torch.set_grad_enabled(graph), graph_mode(model), hook_scope(model, fwd_hooks=hooks):
        model(tokens, stop_at_layer=layout.n_layers)
    out["shape"] = (tokens.shape[0], tokens.shape[1], len(layout.receivers), layout.d_model)
    return out


def _prefix_gradients(starts: dict[str, Any]) -> Tensor:
    """The receivers' gradients through the clean part of each run: the gradients that reached
    each block's input, sent back through the clean run in one backward pass."""
    out = torch.zeros(starts["shape"], device=starts["resid"][0].device)
    pushed = [(starts["resid"][layer], g) for layer, g in starts["grads"].items() if layer > 0]
    if not pushed:
        return out
    firsts = sorted(starts["inputs"])
    grads = torch.autograd.grad(
        [r for r, _ in pushed], [starts["inputs"][f] for f in firsts],
        grad_outputs=[g.to(r.dtype) for r, g in pushed], allow_unused=True,
    )  # fmt: skip
    for first, grad in zip(firsts, grads, strict=True):
        if grad is None:
            continue
        grad = grad if grad.ndim == 4 else grad[:, :, None]
        out[:, :, first : first + grad.shape[2]] = grad.detach()
    return out


def _sender_groups(layout: GraphLayout) -> list[tuple[int, int]]:
    """``(first, stop)`` sender index ranges: the input, each layer's heads, each MLP."""
    groups = [(0, 1)]
    index = 1
    for _ in range(layout.n_layers):
        groups.append((index, index + layout.n_heads))
        index += layout.n_heads
        if layout.has_mlp:
            groups.append((index, index + 1))
            index += 1
    return groups


def _interpolation(
    layout: GraphLayout,
    clean: Tensor,
    ablated: Tensor,
    alphas: Tensor,
    group: tuple[int, int],
    starts: dict[str, Any],
) -> tuple[int, Tensor, dict[str, Any]]:
    """``(start layer, residual, overrides)`` of the run that moves one block's senders (or the
    input) each alpha of the way from ablated to clean, one stacked copy of the batch per
    alpha: ``residual`` is ``(alpha * batch, pos, d_model)``."""
    n_alpha = len(alphas)
    a = alphas[:, None, None, None]  # (alpha, 1, 1, 1) against (1, batch, pos, d_model)
    first, stop = group
    if group == (0, 1):
        point = clean[None, :, :, 0] + (1 - a) * (ablated[None, :, :, 0] - clean[None, :, :, 0])
        return 0, point.flatten(0, 1), {}  # (alpha * batch, pos, d_model)
    layer = layout.senders[first].layer
    residual = starts["resid"][layer].detach().repeat(n_alpha, 1, 1)
    if stop - first == 1 and layout.has_mlp and _is_mlp(layout, first):
        value = clean[None, :, :, first] + (1 - a) * (ablated - clean)[None, :, :, first]
        value = value.flatten(0, 1)

        def mlp(act: Tensor, hook: Any) -> Tensor:
            return value.to(act.dtype)

        return layer, residual, {f"blocks.{layer}.hook_mlp_out": mlp}
    # head outputs are linear in z, so moving every head's z from ablated to clean moves
    # attn_out by (1 - alpha) * sum over heads of (ablated - clean) output
    diff = (1 - a) * (ablated[None, :, :, first:stop] - clean[None, :, :, first:stop]).sum(3)
    diff = diff.flatten(0, 1)  # (alpha * batch, pos, d_model)

    def attn_out(act: Tensor, hook: Any) -> Tensor:
        # the block's output is set, not computed: its own inputs get no gradient in this run,
        # as when each head's output is replaced (what matters for ig_average="all-runs")
        return act.detach() + diff.to(act.dtype)

    return layer, residual, {f"blocks.{layer}.hook_attn_out": attn_out}


def _is_mlp(layout: GraphLayout, index: int) -> bool:
    return layout.senders[index].kind == "mlp"


@torch.no_grad()
def _exact(model: Any, setup: EdgeSetup, progress: bool) -> tuple[Tensor, float]:
    """Every edge patched alone: M(clean, edge ablated) - M(clean)."""
    layout = setup.layout
    edges = layout.valid.nonzero().tolist()
    n_batch = setup.clean_tokens.shape[0]
    scores = torch.zeros(len(layout.senders), len(layout.receivers))
    bar = _bar(len(edges), "exact edges", progress)
    totals = {"clean": 0.0}

    def work(rows: slice) -> None:
        weight = (rows.stop - rows.start) / n_batch
        metric = batch_metric(setup.metric, rows, n_batch)
        tokens = setup.clean_tokens[rows]
        ablated = setup.ablated if setup.ablated.shape[0] == 1 else setup.ablated[rows]
        base = float(mean_value(metric, model(tokens)))
        keeps = []
        for s, r in edges:
            keep = layout.valid.clone()
            keep[s, r] = False
            keeps.append(keep)
        values = circuit_values(model, setup, tokens, ablated, metric, keeps, bar)
        local = torch.zeros_like(scores)
        for (s, r), value in zip(edges, values.tolist(), strict=True):
            local[s, r] = value - base
        scores.add_(local * weight)
        totals["clean"] += base * weight

    try:
        each_batch(n_batch, setup.batch_size, work, isinstance(setup.metric, Metric))
    finally:
        if bar is not None:
            bar.close()
    return scores, totals["clean"]


def circuit_values(
    model: Any,
    setup: EdgeSetup,
    tokens: Tensor,
    ablated: Tensor,
    metric: Any,
    keeps: list[Tensor],
    bar: Any = None,
) -> Tensor:
    """The mean metric on ``tokens`` of each kept-edge mask in ``keeps``: ``(circuit,)``.

    Circuits share batched runs, as many as fit the memory budget; a run that does not fit is
    split in two and retried.
    """
    layout = setup.layout
    n_batch, seq = tokens.shape
    per_circuit = n_batch * seq * (len(layout.senders) * layout.d_model * 4 * 3
                                   + model.cfg.d_vocab * 4)  # fmt: skip
    size = max(1, int(_budget(tokens.device) // max(1, per_circuit)))
    out = torch.zeros(len(keeps), dtype=torch.float64)
    first = 0
    while first < len(keeps):
        part = keeps[first : first + size]
        try:
            n_circ = len(part)
            values = masked_logits(
                model, layout, tokens, ablated, torch.stack(part).to(tokens.device),
                lambda lg, m=metric, c=n_circ: _per_circuit(m, lg, c),
            )  # fmt: skip
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not _is_oom(exc) or len(part) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(1, len(part) // 2)
            continue
        out[first : first + len(part)] = values[:, 0, 0].double().cpu()
        if bar is not None:
            bar.update(len(part))
        first += len(part)
    return out


def _budget(device: torch.device) -> int:
    from mechkit.patching.engine import parse_budget

    return parse_budget(None, device)


def _per_circuit(metric: Any, logits: Tensor, n_circuits: int) -> Tensor:
    """The mean metric of each circuit's rows: logits are ``(circuit * batch, ...)``; returns
    ``(circuit * 1,)`` laid out as ``(circuit, 1)`` after the caller's reshape."""
    n_batch = logits.shape[0] // n_circuits
    values = []
    for c in range(n_circuits):
        values.append(mean_value(metric, logits[c * n_batch : (c + 1) * n_batch]))
    out = torch.stack(values)  # (circuit,)
    return out.repeat_interleave(n_batch)[:, None]


@torch.no_grad()
def _ablated_score(model: Any, setup: EdgeSetup) -> float:
    """The metric with every edge ablated (the corrupt run itself for corrupt ablation)."""
    return float(batched_circuit_values(model, setup, [torch.zeros_like(setup.layout.valid)])[0])


@torch.no_grad()
def batched_circuit_values(model: Any, setup: EdgeSetup, keeps: list[Tensor]) -> Tensor:
    """The metric over all prompts for each kept-edge mask: ``(circuit,)`` float64."""
    n_batch = setup.clean_tokens.shape[0]
    totals = torch.zeros(len(keeps), dtype=torch.float64)

    def work(rows: slice) -> None:
        metric = batch_metric(setup.metric, rows, n_batch)
        ablated = setup.ablated if setup.ablated.shape[0] == 1 else setup.ablated[rows]
        values = circuit_values(model, setup, setup.clean_tokens[rows], ablated, metric, keeps)
        totals.add_(values * (rows.stop - rows.start) / n_batch)

    each_batch(n_batch, setup.batch_size, work, isinstance(setup.metric, Metric))
    return totals


def _bar(total: int, description: str, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False)
