"""Exact edge scores: each edge patched for real, ``M(clean, edge ablated) - M(clean)``. One run
per edge (circuits batched to the memory budget): for small graphs, and to check the estimates."""

from __future__ import annotations

import torch

from mechkit.core import Model, progress_bar
from mechkit.graph.registry import EdgeScores, register_edge_method
from mechkit.graph.setup import EdgeSetup, batch_metric, circuit_values, mean_value

__all__ = ["exact"]


@register_edge_method(
    "exact",
    description="each edge ablated alone in a real run (activation patching of edges)",
    paper="Conmy et al. 2023, Towards Automated Circuit Discovery (ACDC's edge patching)",
)
@torch.no_grad()
def exact(model: Model, setup: EdgeSetup, *, progress: bool) -> EdgeScores:
    """Exact scores (module docstring).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> graph = mk.edge_attribution(model, torch.tensor([[1, 2, 3]]), torch.tensor([[1, 7, 3]]),
        ...     lambda logits: logits[:, -1, 0].mean(), method="exact", progress=False)
        >>> graph.method
        'exact'
    """
    layout = setup.layout
    edges = layout.valid.nonzero().tolist()
    n_prompts = setup.n_prompts
    scores = torch.zeros(len(layout.senders), len(layout.receivers))
    totals = {"clean": 0.0}
    keeps = []
    for s, r in edges:
        keep = layout.valid.clone()
        keep[s, r] = False
        keeps.append(keep)

    total = len(edges) * -(-n_prompts // setup.batch_size)
    with progress_bar(total, "exact edges", enabled=progress) as bar:

        def work(rows: slice) -> None:
            weight = (rows.stop - rows.start) / n_prompts
            metric = batch_metric(setup.metric, rows, n_prompts)
            tokens = setup.clean_tokens[rows]
            base = float(mean_value(metric, model(tokens)))
            ablated = setup.ablated_rows(rows)
            values = circuit_values(model, setup, tokens, ablated, metric, keeps, bar)
            local = torch.zeros_like(scores)
            for (s, r), value in zip(edges, values.tolist(), strict=True):
                local[s, r] = value - base
            scores.add_(local * weight)
            totals["clean"] += base * weight

        setup.each_batch(work)
    return EdgeScores(scores, totals["clean"])
