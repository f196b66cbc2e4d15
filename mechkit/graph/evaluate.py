"""How much of the behaviour a circuit explains: faithfulness, and its curve against size.

A circuit is run with only its edges carrying the clean activations; every other edge carries the
ablated value (the corrupt run's, the mean's or zero), receiver by receiver, so components
outside the circuit still run but reach the circuit only through ablated edges. Faithfulness
(Wang et al. 2022; Hanna et al. 2024)::

    (M(circuit) - M(all ablated)) / (M(model) - M(all ablated))

1 means the circuit alone restores the model's behaviour, 0 that it explains none. With corrupt
ablation "all ablated" is exactly the corrupt run (tested). Both results name that baseline
``ablated_score``, as :class:`~mechkit.sae.FeatureCircuitEvaluation` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.core import Model, check_budget, rank
from mechkit.errors import InvalidArgumentError, check_batch_size, check_choice
from mechkit.graph.circuit import CircuitGraph
from mechkit.graph.layout import GraphLayout
from mechkit.graph.setup import (
    EdgeSetup,
    batched_circuit_values,
    edge_setup,
    resolve_edge_contrast,
)

__all__ = ["evaluate_circuit", "faithfulness_curve", "CircuitEvaluation", "FaithfulnessCurve"]


@dataclasses.dataclass(frozen=True)
class CircuitEvaluation:
    """The metric of a circuit run beside the full model and the fully ablated run.

    Attributes:
        circuit_score: M with only the circuit's edges clean.
        model_score: M of the unchanged model on the clean prompts.
        ablated_score: M with every edge ablated.
        faithfulness: ``(circuit - ablated) / (model - ablated)``.
        n_edges: the circuit's size; ablation: what the other edges carried.

    Example:
        >>> ev = CircuitEvaluation(0.5, 1.0, 0.0, 0.5, 10, "corrupt")
        >>> ev.top(2)
        [('model', 1.0), ('circuit', 0.5)]
    """

    circuit_score: float
    model_score: float
    ablated_score: float
    faithfulness: float
    n_edges: int
    ablation: str

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The three runs' scores (``circuit``, ``model``, ``ablated``) ranked by
        :func:`~mechkit.core.rank`."""
        labels = ["circuit", "model", "ablated"]
        values = [self.circuit_score, self.model_score, self.ablated_score]
        return rank(labels, values, n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row: every field."""
        import pandas as pd

        return pd.DataFrame([dataclasses.asdict(self)])

    def plot(self, *, title: str | None = None) -> Any:
        """The three runs' scores as bars (plotly)."""
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Bar(
                x=["all ablated", "circuit", "model"],
                y=[self.ablated_score, self.circuit_score, self.model_score],
            )
        )
        fig.update_layout(
            title=title or f"Circuit of {self.n_edges} edges: faithfulness {self.faithfulness:.3f}",
            yaxis_title="metric",
        )
        return fig


def _setup_for(
    model: Model,
    graph: CircuitGraph,
    clean: Any,
    corrupt: Any,
    metric: Any,
    *,
    ablation: str | None,
    direction: str | None,
    reference: Any,
    batch_size: int | None,
    memory_budget: int | str | None,
) -> EdgeSetup:
    check_batch_size(batch_size)
    check_budget(memory_budget)
    if graph.layout.to_dict().get("kind") == "features":
        raise InvalidArgumentError(
            "Expected a graph of heads and MLPs (from mk.edge_attribution); got a sparse feature "
            "circuit, whose nodes are dictionary latents. Hint: mk.evaluate_feature_circuit("
            "model, dictionaries, circuit, pairs) ablates the nodes outside it."
        )
    contrast = resolve_edge_contrast(
        model,
        clean,
        corrupt,
        metric,
        direction=direction,
        ablation=ablation or graph.ablation,
        reference=reference,
    )
    layout = GraphLayout.from_model(model)
    if not layout.same_as(graph.layout):
        raise InvalidArgumentError(
            f"Expected a graph of this model's shape {layout.to_dict()}; the graph was made for "
            f"{graph.layout.to_dict()} ({graph.model_name}). Hint: score the graph on this model."
        )
    return edge_setup(model, contrast, batch_size=batch_size, memory_budget=memory_budget)


def evaluate_circuit(
    model: Model,
    circuit: CircuitGraph,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    ablation: str | None = None,
    direction: str | None = None,
    reference: Any = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> CircuitEvaluation:
    """Run the model with only the circuit's edges clean and report its faithfulness.

    Args:
        model: the HookedTransformer the graph was made for.
        circuit: a :class:`CircuitGraph` with a selection (``top_edges``, ``greedy``...).
        clean, corrupt, metric, reference, batch_size, memory_budget: as for
            :func:`mechkit.edge_attribution`.
        ablation: what the other edges carry: ``"corrupt"``, ``"mean"`` or ``"zero"``; by
            default the graph's own ablation (the circuit is judged as it was scored).
        direction: ``"noising"`` only: the edges outside the circuit are ablated in the clean
            run (the definition of faithfulness above).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 9, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 0].mean()
        >>> graph = mk.edge_attribution(model, clean, corrupt, metric)
        >>> ev = mk.evaluate_circuit(model, graph, clean, corrupt, metric)  # every edge
        >>> round(ev.faithfulness, 4), ev.n_edges
        (1.0, 81)
    """
    setup = _setup_for(
        model, circuit, clean, corrupt, metric, ablation=ablation, direction=direction,
        reference=reference, batch_size=batch_size, memory_budget=memory_budget,
    )  # fmt: skip
    valid = setup.layout.valid
    keeps = torch.stack([circuit.edges, valid, torch.zeros_like(valid)])
    circuit_score, model_score, ablated_score = (
        float(v) for v in batched_circuit_values(model, setup, list(keeps))
    )
    return CircuitEvaluation(
        circuit_score=circuit_score,
        model_score=model_score,
        ablated_score=ablated_score,
        faithfulness=_faithfulness(circuit_score, model_score, ablated_score),
        n_edges=circuit.n_edges,
        ablation=setup.ablation,
    )


def _faithfulness(circuit: float, model: float, ablated: float) -> float:
    span = model - ablated
    return float("nan") if span == 0 else (circuit - ablated) / span


@dataclasses.dataclass(frozen=True, eq=False)
class FaithfulnessCurve:
    """Faithfulness against circuit size for one or more scoring methods.

    Attributes:
        sizes: the circuit sizes (edges) asked for.
        methods: one label per graph.
        faithfulness: ``(method, size)`` normalized faithfulness.
        scores: ``(method, size)`` the metric of each circuit run.
        model_score, ablated_score: the normalization's two ends.
        selection: how circuits were chosen (``top`` or ``greedy``); pruned: whether they were
            pruned before the run.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 9, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 0].mean()
        >>> graph = mk.edge_attribution(model, clean, corrupt, metric)
        >>> curve = mk.faithfulness_curve(model, graph, clean, corrupt, metric, sizes=[10, 81])
        >>> curve.to_dataframe()[["method", "size", "edges_run"]]
          method  size  edges_run
        0    eap    10         10
        1    eap    81         81
        >>> best = curve.top(1, absolute=False)[0]  # every edge: the model itself
        >>> best[0], round(best[1], 4)
        ({'method': 'eap', 'size': 81}, 1.0)
    """

    sizes: list[int]
    methods: list[str]
    faithfulness: Float[Tensor, "method size"]
    scores: Float[Tensor, "method size"]
    model_score: float
    ablated_score: float
    selection: str
    pruned: bool
    n_edges: Int[Tensor, "method size"]  # edges actually run (after pruning)

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[dict[str, Any], float]]:
        """The circuits ranked by faithfulness (:func:`~mechkit.core.rank`), each labelled
        ``{"method": ..., "size": ...}``."""
        labels = [{"method": m, "size": s} for m in self.methods for s in self.sizes]
        return rank(labels, self.faithfulness.flatten(), n, absolute=absolute)

    def to_dataframe(self) -> Any:
        import pandas as pd

        rows = []
        for m, method in enumerate(self.methods):
            for s, size in enumerate(self.sizes):
                rows.append({
                    "method": method,
                    "size": size,
                    "edges_run": int(self.n_edges[m, s]),
                    "faithfulness": float(self.faithfulness[m, s]),
                    "score": float(self.scores[m, s]),
                })  # fmt: skip
        return pd.DataFrame(rows)

    def plot(self, *, title: str | None = None) -> Any:
        import plotly.graph_objects as go

        fig = go.Figure()
        for m, method in enumerate(self.methods):
            fig.add_scatter(
                x=self.sizes, y=self.faithfulness[m].tolist(), mode="lines+markers", name=method
            )
        fig.add_hline(y=1.0, line_dash="dot", annotation_text="full model")
        fig.update_layout(
            title=title or f"Faithfulness against circuit size ({self.selection} edges)",
            xaxis_title="edges in the circuit",
            yaxis_title="normalized faithfulness",
            xaxis_type="log",
        )
        return fig


def faithfulness_curve(
    model: Model,
    graphs: CircuitGraph | Sequence[CircuitGraph],
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    sizes: Sequence[int] = (10, 30, 100, 300, 1000),
    selection: str = "top",
    prune: bool = False,
    ablation: str | None = None,
    direction: str | None = None,
    reference: Any = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> FaithfulnessCurve:
    """Faithfulness of each graph's best ``n`` edges for every ``n`` in ``sizes``.

    Args:
        graphs: one graph or several (e.g. EAP and EAP-IG scores of the same model).
        sizes: circuit sizes in edges.
        selection: ``"top"`` (largest |score|) or ``"greedy"`` (grown from the logits).
        prune: prune each circuit (drop edges cut off from input or logits) before running it.
        clean, corrupt, metric, ablation, direction, reference, batch_size, memory_budget: as
            for :func:`evaluate_circuit`.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 9, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 0].mean()
        >>> eap = mk.edge_attribution(model, clean, corrupt, metric)
        >>> ig = mk.edge_attribution(model, clean, corrupt, metric, method="eap-ig-inputs")
        >>> curve = mk.faithfulness_curve(model, [eap, ig], clean, corrupt, metric, sizes=[20])
        >>> curve.methods, tuple(curve.faithfulness.shape)
        (['eap', 'eap-ig-inputs (5 steps)'], (2, 1))
    """
    graphs = [graphs] if isinstance(graphs, CircuitGraph) else list(graphs)
    if not graphs:
        raise InvalidArgumentError(
            "Expected at least one graph; got none. Hint: pass mk.edge_attribution's result."
        )
    check_choice("selection", selection, ["top", "greedy"])
    sizes = [int(s) for s in sizes]
    setup = _setup_for(
        model, graphs[0], clean, corrupt, metric, ablation=ablation, direction=direction,
        reference=reference, batch_size=batch_size, memory_budget=memory_budget,
    )  # fmt: skip
    masks, edges_run = [], []
    for graph in graphs:
        if not setup.layout.same_as(graph.layout):
            raise InvalidArgumentError(
                f"Expected every graph to be of the same model; {graph!r} has layout "
                f"{graph.layout.to_dict()}, the first {graphs[0].layout.to_dict()}."
            )
        for size in sizes:
            circuit = graph.top_edges(size) if selection == "top" else graph.greedy(size)
            if prune:
                circuit = circuit.prune()
            masks.append(circuit.edges)
            edges_run.append(circuit.n_edges)
    valid = setup.layout.valid
    keeps = torch.stack([valid, torch.zeros_like(valid), *masks])
    values = batched_circuit_values(model, setup, list(keeps))
    model_score, ablated_score = float(values[0]), float(values[1])
    scores = values[2:].reshape(len(graphs), len(sizes)).float()
    span = model_score - ablated_score
    faith = (scores - ablated_score) / span if span != 0 else torch.full_like(scores, float("nan"))
    return FaithfulnessCurve(
        sizes=sizes,
        methods=[g.method for g in graphs],
        faithfulness=faith,
        scores=scores,
        model_score=model_score,
        ablated_score=ablated_score,
        selection=selection,
        pruned=prune,
        n_edges=torch.tensor(edges_run).reshape(len(graphs), len(sizes)),
    )
