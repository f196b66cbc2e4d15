"""How much of the behaviour a circuit explains: faithfulness, and its curve against size.

A circuit is run with only its edges carrying the clean activations; every other edge carries the
ablated value (the corrupt run's, the mean's or zero), receiver by receiver, so components
outside the circuit still run but reach the circuit only through ablated edges. Faithfulness
(Wang et al. 2022; Hanna et al. 2024)::

    (M(circuit) - M(all ablated)) / (M(model) - M(all ablated))

1 means the circuit alone restores the model's behaviour, 0 that it explains none. With corrupt
ablation "all ablated" is exactly the corrupt run (tested).

    >>> ev = mk.evaluate_circuit(model, graph.top_edges(200), pairs)
    >>> ev.faithfulness
    >>> curve = mk.faithfulness_curve(model, [eap, eap_ig], pairs, sizes=[50, 200, 1000])
    >>> curve.plot()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from mechkit.errors import InvalidArgumentError, check_batch_size, check_choice
from mechkit.graph.circuit import CircuitGraph
from mechkit.graph.edges import EdgeSetup, batched_circuit_values, prepare

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
    """

    circuit_score: float
    model_score: float
    ablated_score: float
    faithfulness: float
    n_edges: int
    ablation: str

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame([dataclasses.asdict(self)])


def _setup_for(
    model: Any,
    graph: CircuitGraph,
    clean: Any,
    corrupt: Any,
    metric: Any,
    ablation: str | None,
    reference: Any,
    batch_size: int | None,
) -> EdgeSetup:
    check_batch_size(batch_size)
    if graph.layout.to_dict().get("kind") == "features":
        raise InvalidArgumentError(
            "Expected a graph of heads and MLPs (from mk.edge_attribution); got a sparse feature "
            "circuit, whose nodes are dictionary latents. Hint: mk.evaluate_feature_circuit("
            "model, dictionaries, circuit, pairs) ablates the nodes outside it."
        )
    setup = prepare(
        model,
        clean,
        corrupt,
        metric,
        ablation=ablation or graph.ablation,
        reference=reference,
        batch_size=batch_size,
    )
    if not setup.layout.same_as(graph.layout):
        raise InvalidArgumentError(
            f"Expected a graph of this model's shape {setup.layout.to_dict()}; the graph was "
            f"made for {graph.layout.to_dict()} ({graph.model_name})."
        )
    return setup


def evaluate_circuit(
    model: Any,
    circuit: CircuitGraph,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    ablation: str | None = None,
    reference: Any = None,
    batch_size: int | None = None,
) -> CircuitEvaluation:
    """Run the model with only the circuit's edges clean and report its faithfulness.

    Args:
        model: the HookedTransformer the graph was made for.
        circuit: a :class:`CircuitGraph` with a selection (``top_edges``, ``greedy``...).
        clean, corrupt, metric, reference, batch_size: as for :func:`mechkit.edge_attribution`.
        ablation: what the other edges carry (default: the graph's own ablation).

    Example:
        >>> mk.evaluate_circuit(model, graph.top_edges(100), pairs).faithfulness
    """
    setup = _setup_for(model, circuit, clean, corrupt, metric, ablation, reference, batch_size)
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
    """

    sizes: list[int]
    methods: list[str]
    faithfulness: torch.Tensor
    scores: torch.Tensor
    model_score: float
    ablated_score: float
    selection: str
    pruned: bool
    n_edges: torch.Tensor  # (method, size) edges actually run (after pruning)

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
    model: Any,
    graphs: CircuitGraph | Sequence[CircuitGraph],
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    sizes: Sequence[int] = (10, 30, 100, 300, 1000),
    selection: str = "top",
    prune: bool = False,
    ablation: str | None = None,
    reference: Any = None,
    batch_size: int | None = None,
) -> FaithfulnessCurve:
    """Faithfulness of each graph's best ``n`` edges for every ``n`` in ``sizes``.

    Args:
        graphs: one graph or several (e.g. EAP and EAP-IG scores of the same model).
        sizes: circuit sizes in edges.
        selection: ``"top"`` (largest |score|) or ``"greedy"`` (grown from the logits).
        prune: prune each circuit (drop edges cut off from input or logits) before running it.

    Example:
        >>> curve = mk.faithfulness_curve(model, [eap, eap_ig], pairs, sizes=[100, 1000])
        >>> curve.to_dataframe()
    """
    graphs = [graphs] if isinstance(graphs, CircuitGraph) else list(graphs)
    if not graphs:
        raise InvalidArgumentError("Expected at least one graph; got none.")
    check_choice("selection", selection, ["top", "greedy"])
    sizes = [int(s) for s in sizes]
    setup = _setup_for(model, graphs[0], clean, corrupt, metric, ablation, reference, batch_size)
    masks, edges_run = [], []
    for graph in graphs:
        if not setup.layout.same_as(graph.layout):
            raise InvalidArgumentError("Expected every graph to be of the same model.")
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
