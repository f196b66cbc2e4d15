"""Gradient-times-difference edge scores, shared by EAP and both EAP-IG variants.

An edge ``u -> v`` scores ``(a'_u - a_u) . g_v`` summed over prompts' positions and ``d_model``,
with ``a`` the sender's clean output ``(batch, pos, sender, d_model)``, ``a'`` its ablated one,
and ``g_v`` the metric's gradient at the receiver's input, averaged over integration points
(one point, the clean run, for EAP). The points of one block (or of the input) run as one batch
of ``steps`` stacked copies of the prompts, and a run that interpolates a block starts at that
block from the clean residual (everything before it runs clean), so its forward and backward
passes cover only the layers from the block on. With ``ig_average="sender-runs"`` every block's
last point (alpha = 1) is the clean run itself: it runs once for all blocks. For mechkit's
metrics that read one position per prompt only those positions are unembedded
(:func:`answer_positions`), and the q/k/v receivers' gradients are taken without per-head copies
of the residual (:func:`~mechkit.graph.runs.fused_qkv`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.core import Model, progress_bar
from mechkit.graph.layout import GraphLayout
from mechkit.graph.registry import EdgeScores
from mechkit.graph.runs import graph_mode, receiver_gradients, receiver_hook_names
from mechkit.graph.setup import EdgeSetup, batch_metric, mean_value
from mechkit.hook_scope import hook_scope
from mechkit.metrics import CrossEntropy, KLDivergence, LogitDiff, Normalized, ProbDiff

__all__ = ["gradient_scores", "sender_groups", "answer_positions"]


def gradient_scores(
    model: Model,
    setup: EdgeSetup,
    *,
    n_points: int,
    per_block: bool,
    all_runs: bool = False,
    progress: bool,
    description: str,
) -> EdgeScores:
    """Scores with the gradient averaged over ``n_points`` points ``k / n_points``
    (``k = 1..n_points``) between the ablated and the clean values: of the input embeddings
    (``per_block=False``), or of each sender block's outputs in turn (``per_block=True``), an
    edge's gradient then averaged over its sender block's runs, or over every block's runs
    (``all_runs``).

    Example:
        >>> from mechkit.graph.setup import edge_setup, resolve_edge_contrast
        >>> model = mk.load_model("attn-only-2l")
        >>> setup = edge_setup(model, resolve_edge_contrast(model, torch.tensor([[1, 2, 3]]),
        ...     torch.tensor([[1, 7, 3]]), lambda logits: logits[:, -1, 0].mean()))
        >>> result = gradient_scores(model, setup, n_points=1, per_block=False, progress=False,
        ...                          description="eap")
        >>> tuple(result.scores.shape)
        (9, 25)
    """
    layout = setup.layout
    n_prompts = setup.n_prompts
    device = setup.ablated.device
    scores = torch.zeros(len(layout.senders), len(layout.receivers), device=device)
    groups = sender_groups(layout) if per_block else [(0, 1)]
    alphas = torch.arange(1, n_points + 1, device=device) / n_points
    total = -(-n_prompts // setup.batch_size) * len(groups)
    totals = {"clean": 0.0}

    def work(rows: slice, bar: Any) -> None:
        weight = (rows.stop - rows.start) / n_prompts
        metric = batch_metric(setup.metric, rows, n_prompts)
        tokens = setup.clean_tokens[rows]
        clean = setup.clean_senders[rows]
        ablated = setup.ablated_rows(rows).expand_as(clean)
        delta = ablated - clean  # (batch, pos, sender, d_model)
        local = torch.zeros_like(scores)
        values: list[float] = []
        at = answer_positions(metric, tokens)
        # sender-runs: the last point (alpha = 1) of every block is the clean run itself, so it
        # runs once, for all blocks, and each block runs only its other points
        shared = per_block and not all_runs
        points = alphas[:-1] if shared else alphas
        if shared:
            clean_grads, value, _ = receiver_gradients(
                model, layout, tokens, lambda logits: mean_value(metric, logits),
                positions=at,
            )  # fmt: skip
            values.append(float(value))
            # every sender's share of the clean point: one product for all blocks
            _add_scores(local, delta, clean_grads / len(alphas), slice(None))
        if not len(points):  # one step: every block's one point is the clean run
            bar.update(len(groups))
        starts = _clean_block_inputs(model, layout, tokens, per_block, graph=all_runs)
        summed = None  # all-runs: the receiver gradients summed over every run
        for first, stop in groups if len(points) else []:
            layer, residual, overrides = _interpolation(
                layout, clean, ablated, points, (first, stop), starts
            )
            if all_runs:
                residual.requires_grad_(True)

            def value_of(logits: Tensor, m: Any = metric) -> Tensor:
                # the sum over the stacked points of the mean metric: its gradient is the sum
                # of each point's gradient
                parts = [mean_value(m, part) for part in logits.chunk(len(points))]
                values.append(float(parts[-1].detach()))  # the last point (alpha = 1)
                return torch.stack(parts).sum()

            grads, _, _ = receiver_gradients(
                model, layout, tokens, value_of, overrides=overrides, residual=residual,
                start_layer=layer, repeats=len(points),
                positions=None if at is None else at.repeat(len(points)),
            )  # fmt: skip
            if all_runs:
                summed = grads if summed is None else summed + grads
                assert residual.grad is not None
                # (alpha * batch, pos, d_model) -> summed over the points
                pushed = residual.grad.reshape(len(points), *tokens.shape, -1).sum(0)
                starts["grads"][layer] = starts["grads"].get(layer, 0) + pushed
            else:
                scored = slice(first, stop) if len(groups) > 1 else slice(None)
                _add_scores(local, delta, grads / len(alphas), scored)
            bar.update(1)
        if all_runs:
            assert summed is not None
            summed = summed + _prefix_gradients(starts)
            _add_scores(local, delta, summed / (len(groups) * len(alphas)), slice(None))
        if shared:
            # the clean point's gradients reach receivers before a block, which the block's
            # own runs do not: no edge leads there
            local.masked_fill_(~layout.valid.to(local.device), 0.0)
        scores.add_(local * weight)  # only once the whole batch has run
        totals["clean"] += values[0] * weight

    with progress_bar(total, f"{description} edges", enabled=progress and total > 1) as bar:
        setup.each_batch(lambda rows: work(rows, bar))
    return EdgeScores(scores, totals["clean"])


def answer_positions(metric: Any, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"] | None:
    """The one position each prompt's metric reads, for mechkit's metrics that read one
    (:class:`~mechkit.LogitDiff`, ``ProbDiff``, ``CrossEntropy``, ``KLDivergence``, and these
    :class:`~mechkit.metrics.Normalized`), whose ``per_prompt`` also takes the logits at those
    positions, ``(batch, d_vocab)``; None for any other metric (the full logits are computed).

    Example:
        >>> answer_positions(mk.LogitDiff(torch.tensor([1]), torch.tensor([2])),
        ...                  torch.tensor([[5, 6, 7]]))
        tensor([2])
        >>> answer_positions(lambda logits: logits[:, -1, 0].mean(), torch.tensor([[5, 6, 7]]))
    """
    base = metric.metric if type(metric) is Normalized else metric
    if not isinstance(base, LogitDiff | ProbDiff | CrossEntropy | KLDivergence):
        return None
    if type(base) not in (LogitDiff, ProbDiff, CrossEntropy, KLDivergence):
        return None  # a subclass may read other positions
    n_batch, seq = tokens.shape
    if base.positions is None:  # the last position
        return torch.full((n_batch,), seq - 1, dtype=torch.long, device=tokens.device)
    return base.positions.to(tokens.device)


def _add_scores(local: Tensor, delta: Tensor, grads: Tensor, senders: slice) -> None:
    """``local[senders] += delta[senders] . grads`` summed over (batch, pos, d_model), as one
    matrix product: (sender, b * p * d) x (b * p * d, receiver)."""
    d_part = delta[:, :, senders].permute(2, 0, 1, 3)  # (sender, batch, pos, d_model)
    g_part = grads.permute(2, 0, 1, 3)  # (receiver, batch, pos, d_model)
    local[senders] += d_part.reshape(d_part.shape[0], -1) @ g_part.reshape(g_part.shape[0], -1).T


def _clean_block_inputs(
    model: Model, layout: GraphLayout, tokens: Tensor, per_block: bool, *, graph: bool
) -> dict[str, Any]:
    """The clean residual entering each block, ``{"resid": {layer: (batch, pos, d_model)}}``.

    With ``graph`` the run keeps its autograd graph and receiver inputs (``"inputs"``), so
    that gradients arriving at a block's input can be carried back to the receivers before it
    in one backward pass (:func:`_prefix_gradients`)."""
    out: dict[str, Any] = {"resid": {}, "inputs": {}, "grads": {}}
    if not per_block:
        return out
    hooks: list[tuple[str, Callable[..., Any]]] = []
    for layer in range(layout.n_layers):

        def keep(act: Tensor, hook: Any, layer: int = layer) -> Tensor:
            if layer == 0 and graph:
                act = act.detach().requires_grad_(True)
            out["resid"][layer] = act
            return act

        hooks.append((f"blocks.{layer}.hook_resid_pre", keep))
    if graph:
        for name, first, _ in receiver_hook_names(layout):

            def keep_input(act: Tensor, hook: Any, first: int = first) -> None:
                out["inputs"][first] = act

            hooks.append((name, keep_input))
    # per-head input copies only where the receivers' inputs are kept
    with (
        torch.set_grad_enabled(graph),
        graph_mode(model, split_qkv=graph),
        hook_scope(model, fwd_hooks=hooks),
    ):
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


def sender_groups(layout: GraphLayout) -> list[tuple[int, int]]:
    """``(first, stop)`` sender index ranges: the input, each layer's heads, each MLP.

    Example:
        >>> from mechkit.graph import GraphLayout
        >>> sender_groups(GraphLayout.build(n_layers=1, n_heads=2, n_kv_heads=2, d_model=4,
        ...                                 has_mlp=True))
        [(0, 1), (1, 3), (3, 4)]
    """
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
    clean: Float[Tensor, "batch pos sender d_model"],
    ablated: Float[Tensor, "batch pos sender d_model"],
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
    assert layer is not None
    residual = starts["resid"][layer].detach().repeat(n_alpha, 1, 1)
    if stop - first == 1 and layout.has_mlp and layout.senders[first].kind == "mlp":
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
