"""Raw attention, attention rollout and attention flow (Abnar & Zuidema 2020, "Quantifying
Attention Flow in Transformers", ACL).

- ``attention``: layer ``l``'s weights averaged over heads (or one head's); aggregated over
  layers by their mean.
- ``rollout``: the residual connection modelled as ``0.5 A + 0.5 I``, each row renormalised, and
  the layers multiplied through: ``R_l = Â_l Â_{l-1} ... Â_0``. ``R_l[i, j]`` is the share of
  token ``j`` in the representation at position ``i`` after block ``l``.
- ``flow``: the same layered graph (nodes: positions at each layer; an edge of capacity
  ``Â_l[i, k]`` from position ``k`` below to ``i`` above), and the value of a maximum flow from
  input ``j`` to output ``i``, by scipy's Dinic algorithm on integer capacities (exact to about
  ``pos / 2**22``). Flow from input ``j`` to output ``i`` can only pass positions ``j..i``
  (attention is causal), so each max-flow runs on that part of the graph alone (``layers x
  (i - j)^2`` edges, a third of the whole on average). Its cost still grows fast with the
  length (one max-flow per query and key), so it is computed only for the last layer and the
  chosen query positions (``positions=``).

Decoders put most of the rolled-out mass on the first token (the attention sink): expected.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError
from mechkit.hook_scope import run_with_cache
from mechkit.mixing.registry import LayerMaps, MixingRun, register

__all__ = ["residual_attention", "roll_out", "max_flow"]


def residual_attention(
    maps: Float[Tensor, "*layer batch query key"],
) -> Float[Tensor, "*layer batch query key"]:
    """``0.5 A + 0.5 I`` with every row renormalised to sum to 1 (rows of zeros stay zero).

    Example:
        >>> residual_attention(torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]))[0].tolist()
        [[1.0, 0.0], [0.25, 0.75]]
    """
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
    mixed = 0.5 * maps + 0.5 * eye
    return row_normalise(mixed)


def row_normalise(maps: Tensor) -> Tensor:
    """Each row divided by its sum (rows summing to 0 stay 0).

    Example:
        >>> row_normalise(torch.tensor([[1.0, 3.0], [0.0, 0.0]])).tolist()
        [[0.25, 0.75], [0.0, 0.0]]
    """
    total = maps.sum(-1, keepdim=True)
    return torch.where(total > 0, maps / total.clamp_min(1e-30), torch.zeros_like(maps))


def roll_out(
    maps: Float[Tensor, "layer batch query key"],
) -> Float[Tensor, "layer batch query key"]:
    """The cumulative products ``R_l = M_l M_{l-1} ... M_0`` of per-layer mixing matrices.

    Example:
        >>> m = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]).expand(2, 1, 2, 2)
        >>> roll_out(m)[-1, 0].tolist()                  # (layer, batch, query, key)
        [[1.0, 0.0], [0.75, 0.25]]
    """
    out = torch.empty_like(maps)
    current = maps[0]
    out[0] = current
    for layer in range(1, maps.shape[0]):
        current = maps[layer] @ current  # (batch, query, key)
        out[layer] = current
    return out


FLOW_UNIT = 2**22
"""Capacities are scaled to integers of this many units for scipy's max-flow (it takes integer
capacities): flows are exact to about ``positions / FLOW_UNIT``."""


def max_flow(
    layer_maps: Float[Tensor, "layer pos pos"],
    queries: tuple[int, ...],
    *,
    progress: bool = False,
) -> Float[Tensor, "query key"]:
    """The max-flow value from each input position to each output position in ``queries``
    through the layered graph of ``layer_maps`` (capacities ``layer_maps[l, i, k]``, position
    ``k`` of layer ``l`` to position ``i`` of layer ``l + 1``), by scipy's Dinic algorithm.

    Example:
        >>> eye = torch.eye(3).expand(2, 3, 3)
        >>> max_flow(eye, (0, 1, 2)).tolist()         # identity attention: identity flow
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    try:
        from scipy.sparse import csr_matrix  # type: ignore[import-untyped]
        from scipy.sparse.csgraph import maximum_flow  # type: ignore[import-untyped]
    except ImportError:  # scipy is not among mechkit's own dependencies
        raise InvalidArgumentError(
            "Expected scipy to be installed for method='flow' (its max-flow); it is not. Hint: "
            "pip install scipy, or method='rollout'."
        ) from None

    n_layers, n_pos, _ = layer_maps.shape
    caps = (layer_maps.double().cpu() * FLOW_UNIT).round().long().numpy()
    out = torch.zeros(len(queries), n_pos)
    with progress_bar(len(queries) * n_pos, "attention flow", enabled=progress) as bar:
        for row, query in enumerate(queries):
            for key in range(query + 1):
                # flow from input `key` reaches only positions key..query (causal): the
                # graph of those alone, node (layer, pos) = layer * width + pos - key
                width = query + 1 - key
                block = caps[:, key : query + 1, key : query + 1]  # (layer, to i, from k)
                layer, i, k = np.nonzero(block)
                graph = csr_matrix(
                    (
                        block[layer, i, k].astype(np.int32),
                        (layer * width + k, (layer + 1) * width + i),
                    ),
                    shape=((n_layers + 1) * width,) * 2,
                )
                sink = n_layers * width + width - 1
                out[row, key] = maximum_flow(graph, 0, sink, method="dinic").flow_value / FLOW_UNIT
                bar.update(1)
            bar.update(n_pos - query - 1)
    return out


def _patterns(model: Model, run: MixingRun) -> Float[Tensor, "layer batch head query key"]:
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)}
    _, cache = run_with_cache(model, run.tokens, names_filter=lambda n: n in names)
    return torch.stack(
        [cache[f"blocks.{layer}.attn.hook_pattern"].float() for layer in range(model.cfg.n_layers)]
    )


def _head_mean(model: Model, run: MixingRun) -> Float[Tensor, "layer batch query key"]:
    patterns = _patterns(model, run)  # (layer, batch, head, query, key)
    if run.head is None:
        return patterns.mean(2)
    if not -model.cfg.n_heads <= run.head < model.cfg.n_heads:
        raise InvalidArgumentError(
            f"Expected head in [0, {model.cfg.n_heads}); got {run.head}. Hint: None averages "
            "the heads."
        )
    return patterns[:, :, run.head]


def _layers(model: Model) -> tuple[int, ...]:
    return tuple(range(model.cfg.n_layers))


@register("attention")
@torch.no_grad()
def attention(model: Model, run: MixingRun) -> LayerMaps:
    """Raw attention weights (the mean over heads, or ``head``), averaged over layers."""
    maps = _head_mean(model, run)
    return LayerMaps(
        maps=maps,
        aggregated=maps.mean(0),
        aggregation="mean over layers",
        cumulative=False,
        layers=_layers(model),
    )


@register("rollout")
@torch.no_grad()
def rollout(model: Model, run: MixingRun) -> LayerMaps:
    """Attention rollout: ``0.5 A + 0.5 I`` per layer, renormalised, multiplied through."""
    rolled = roll_out(residual_attention(_head_mean(model, run)))
    return LayerMaps(
        maps=rolled,
        aggregated=rolled[-1],
        aggregation="rollout through every layer",
        cumulative=True,
        layers=_layers(model),
    )


@register("flow")
@torch.no_grad()
def flow(model: Model, run: MixingRun) -> LayerMaps:
    """Attention flow: max-flow on the rollout graph, last layer, chosen queries only."""
    steps = residual_attention(_head_mean(model, run))  # (layer, batch, query, key)
    n_batch, n_pos = run.tokens.shape
    queries = run.queries if run.queries is not None else tuple(range(n_pos))
    out = torch.full((n_batch, n_pos, n_pos), float("nan"))
    lengths = run.mask.sum(-1).tolist()
    for b in range(n_batch):
        inside = tuple(q for q in queries if q < lengths[b])
        out[b, list(inside)] = max_flow(steps[:, b].cpu(), inside, progress=run.progress)
    return LayerMaps(
        maps=out[None],
        aggregated=out,
        aggregation="max-flow through every layer",
        cumulative=True,
        layers=(model.cfg.n_layers - 1,),
    )
