"""CircuitGraph: edge scores over a model's graph, a selected circuit, and how to show it.

A :class:`CircuitGraph` holds a dense ``(sender, receiver)`` score tensor (from
:func:`mechkit.edge_attribution`) and optionally a boolean mask of the edges in a circuit.
Selection (``top_edges``, ``threshold``, ``greedy``, ``prune``, ``with_edges``) returns a new graph
with a mask; nothing is changed in place. Edge and node names are the package's one scheme
(``L0H1->L2H3.q``, ``L3.mlp``); names a user types, and files saved with the older names
(``a0.h1->a2.h3q``, ``m3``), are read through :func:`~mechkit.core.names.parse_node`.
:meth:`CircuitGraph.to_eap_ig` and :meth:`CircuitGraph.from_eap_ig` write and read the JSON of
Hanna et al.'s EAP-IG code (``a0.h1->a2.h3<q>``).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechkit.atomic_io import write_text_atomically
from mechkit.core import parse_edge, rank, to_eap_ig
from mechkit.errors import (
    FileFormatError,
    InvalidArgumentError,
    MechkitError,
    ShapeError,
    SiteNotFoundError,
    UnsupportedModelError,
    did_you_mean,
)
from mechkit.graph.feature_layout import FeatureLayout
from mechkit.graph.layout import Edge, GraphLayout
from mechkit.reading import read_json, reading

__all__ = ["CircuitGraph", "ROC"]


@dataclasses.dataclass(frozen=True, eq=False)
class CircuitGraph:
    """Scores for every edge of a model's graph, and the circuit selected from them.

    Attributes:
        layout: the graph's senders, receivers and valid edges.
        scores: ``(sender, receiver)`` estimated change of the metric when the edge carries the
            ablated value (0 where no edge exists).
        mask: ``(sender, receiver)`` bool, the edges in the circuit; None means no selection
            (every edge).
        method: how the scores were made (``eap``, ``eap-ig-inputs (5 steps)``, ``exact``...).
        ablation: what a dropped edge carries (``corrupt``, ``mean``, ``zero``).
        metric_name, clean_score, ablated_score: the metric, its value on the clean run, and with
            every edge ablated.
        model_name: the model the graph was scored on.
        node_scores: for graphs over nodes that were scored themselves (sparse feature
            circuits), each node's estimated effect; None otherwise.

    Example:
        >>> layout = GraphLayout.build(n_layers=1, n_heads=2, n_kv_heads=2, d_model=4,
        ...                            has_mlp=False)
        >>> scores = torch.zeros(layout.valid.shape)
        >>> scores[layout.edge_index("L0H1->logits")] = 2.0
        >>> scores[layout.edge_index("a0.h0->logits")] = -3.0  # EAP-IG's and old names work
        >>> graph = CircuitGraph(layout=layout, scores=scores)
        >>> graph.top(2)
        [('L0H0->logits', -3.0), ('L0H1->logits', 2.0)]
        >>> graph.top_edges(1).edge_names()
        ['L0H0->logits']
    """

    layout: GraphLayout | FeatureLayout
    scores: Float[Tensor, "sender receiver"]
    mask: Bool[Tensor, "sender receiver"] | None = None
    method: str = ""
    ablation: str = "corrupt"
    metric_name: str = ""
    clean_score: float | None = None
    ablated_score: float | None = None
    model_name: str = ""
    node_scores: dict[str, float] | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.layout.valid.shape)
        if tuple(self.scores.shape) != shape:
            raise ShapeError(
                f"Expected scores of shape (sender, receiver) = {shape}; got "
                f"{tuple(self.scores.shape)}."
            )
        if self.mask is not None and tuple(self.mask.shape) != shape:
            raise ShapeError(f"Expected a mask of shape {shape}; got {tuple(self.mask.shape)}.")

    # ------------------------------------------------------------------------------- selection

    @property
    def edges(self) -> Bool[Tensor, "sender receiver"]:
        """``(sender, receiver)`` bool: the circuit's edges (every valid edge without a mask)."""
        valid = self.layout.valid
        return valid.clone() if self.mask is None else self.mask & valid

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``n`` highest-scoring edges of the circuit (every edge without a selection) as
        ``(name, score)``, ranked by :func:`~mechkit.core.rank` (by |score| unless
        ``absolute=False``); :meth:`top_edges` returns them as a circuit instead."""
        pairs = self.edges.nonzero().tolist()
        layout = self.layout
        names = [f"{layout.senders[s].name}->{layout.receivers[r].name}" for s, r in pairs]
        return rank(names, [float(self.scores[s, r]) for s, r in pairs], n, absolute=absolute)

    def edge_names(self) -> list[str]:
        """The circuit's edges as ``"sender->receiver"`` names, strongest first."""
        pairs = self.edges.nonzero().tolist()
        pairs.sort(key=lambda sr: -abs(float(self.scores[sr[0], sr[1]])))
        layout = self.layout
        return [f"{layout.senders[s].name}->{layout.receivers[r].name}" for s, r in pairs]

    def with_edges(self, edges: Iterable[str | Edge]) -> CircuitGraph:
        """The circuit made of exactly these edges (names in any scheme
        :func:`~mechkit.core.parse_edge` reads); unknown names raise."""
        mask = torch.zeros_like(self.layout.valid)
        for edge in edges:
            s, r = self.layout.edge_index(edge)
            mask[s, r] = True
        return dataclasses.replace(self, mask=mask)

    def without(self, edges: Iterable[str | Edge]) -> CircuitGraph:
        """This circuit (every edge, without a selection) less these edges; unknown names
        raise."""
        mask = self.edges
        for edge in edges:
            s, r = self.layout.edge_index(edge)
            mask[s, r] = False
        return dataclasses.replace(self, mask=mask)

    def top_edges(self, n: int, *, absolute: bool = True) -> CircuitGraph:
        """The circuit of the ``n`` edges of largest score (by absolute value unless
        ``absolute=False``); :meth:`top` lists them."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(
                f"Expected n to be a non-negative integer (edges to keep); got {n!r}."
            )
        values = self._ranking(absolute)
        order = values.flatten().argsort(descending=True)[: min(n, self.layout.n_edges)]
        mask = torch.zeros(values.numel(), dtype=torch.bool)
        mask[order] = True
        return dataclasses.replace(self, mask=mask.reshape(values.shape) & self.layout.valid)

    def threshold(self, value: float, *, absolute: bool = True) -> CircuitGraph:
        """Every edge whose score (absolute unless ``absolute=False``) is at least ``value``."""
        return dataclasses.replace(
            self, mask=(self._ranking(absolute) >= value) & self.layout.valid
        )

    def greedy(self, n: int, *, absolute: bool = True) -> CircuitGraph:
        """``n`` edges grown from the logits: each step adds the best edge into a node already
        in the circuit (the logits, or a sender with an edge in it), so the circuit stays
        connected to the output."""
        layout = self.layout
        values = self._ranking(absolute)
        mask = torch.zeros_like(layout.valid)
        reached = {"logits"}
        candidates = torch.zeros(len(layout.receivers), dtype=torch.bool)
        for r, rec in enumerate(layout.receivers):
            candidates[r] = any(node in reached for node in rec.nodes)
        for _ in range(min(n, layout.n_edges)):
            allowed = layout.valid & ~mask & candidates[None, :]
            if not bool(allowed.any()):
                break
            masked = torch.where(allowed, values, torch.full_like(values, -math.inf))
            flat = int(masked.flatten().argmax())
            s, r = divmod(flat, values.shape[1])
            mask[s, r] = True
            name = layout.senders[s].name
            if name not in reached:
                reached.add(name)
                for r2, rec in enumerate(layout.receivers):
                    if name in rec.nodes:
                        candidates[r2] = True
        return dataclasses.replace(self, mask=mask)

    def prune(self) -> CircuitGraph:
        """Drop edges that no path connects to both the input and the logits."""
        layout = self.layout
        mask = self.edges
        node_of_receiver = [rec.nodes for rec in layout.receivers]
        while True:
            # nodes reachable from the input through circuit edges
            from_input = {"input"}
            for s, r in sorted(mask.nonzero().tolist(), key=lambda sr: layout.sender_order(sr[0])):
                if layout.senders[s].name in from_input:
                    from_input.update(node_of_receiver[r])
            # nodes that reach the logits
            to_logits = {"logits"}
            for s, r in sorted(mask.nonzero().tolist(), key=lambda sr: -layout.sender_order(sr[0])):
                if any(node in to_logits for node in node_of_receiver[r]):
                    to_logits.add(layout.senders[s].name)
            keep = mask.clone()
            for s, r in mask.nonzero().tolist():
                src = layout.senders[s].name
                if src not in from_input or not any(n in to_logits for n in node_of_receiver[r]):
                    keep[s, r] = False
            if torch.equal(keep, mask):
                return dataclasses.replace(self, mask=keep)
            mask = keep

    def nodes_in_circuit(self) -> list[str]:
        """Names of the nodes that send an edge of the circuit, and the logits if it is fed.

        (A node that only receives edges adds nothing to the output; :meth:`prune` drops such
        edges.)"""
        pairs = self.edges.nonzero().tolist()
        names = {self.layout.senders[s].name for s, _ in pairs}
        if any(self.layout.receivers[r].kind == "logits" for _, r in pairs):
            names.add("logits")
        return [n for n in self.layout.nodes if n in names]

    def _target(self, receiver: int, members: set[str]) -> str:
        """The node an edge into ``receiver`` is drawn to: the first fed node in the circuit."""
        fed = self.layout.receivers[receiver].nodes
        return next((n for n in fed if n in members), fed[0])

    def _ranking(self, absolute: bool) -> Tensor:
        values = self.scores.abs() if absolute else self.scores
        return torch.where(self.layout.valid, values, torch.full_like(values, -math.inf))

    # ------------------------------------------------------------------------------- reference

    def roc(self, reference: Iterable[str], *, absolute: bool = True) -> ROC:
        """ROC of the edge ranking against a reference circuit given as data.

        Args:
            reference: edge names (``"L0H1->L2H3.q"``), or node names (``"L9H9"``,
                ``"L3.mlp"``): with nodes, an edge is positive when its sender and the node it
                feeds are both in the reference. EAP-IG's and older names are read too; unknown
                names raise.
        """
        items = [item if "->" in item else self.layout.canonical(item) for item in reference]
        if not items:
            raise InvalidArgumentError("Expected a non-empty reference circuit; got none.")
        positive = torch.zeros_like(self.layout.valid)
        if all("->" in item for item in items):
            for edge in items:
                s, r = self.layout.edge_index(edge)
                positive[s, r] = True
        elif any("->" in item for item in items):
            raise InvalidArgumentError(
                "Expected a reference of only edges or only nodes; got a mix of both."
            )
        else:
            known = set(self.layout.nodes)
            unknown = [n for n in items if n not in known]
            if unknown:
                raise SiteNotFoundError(
                    f"Expected node names of this graph; got unknown {unknown[:5]}."
                    + did_you_mean(unknown[0], known)
                )
            nodes = set(items) | {"input", "logits"}
            for s, sender in enumerate(self.layout.senders):
                for r, rec in enumerate(self.layout.receivers):
                    if sender.name in nodes and any(n in nodes for n in rec.nodes):
                        positive[s, r] = True
            positive &= self.layout.valid
        return ROC.from_scores(
            self._ranking(absolute)[self.layout.valid], positive[self.layout.valid]
        )

    # ------------------------------------------------------------------------------- output

    def to_dataframe(self) -> Any:
        """One row per edge: ``src``, ``dst``, ``score``, ``in_circuit``, layers and kinds."""
        import pandas as pd

        layout = self.layout
        rows = []
        edges = self.edges
        for s, r in layout.valid.nonzero().tolist():
            sender, rec = layout.senders[s], layout.receivers[r]
            rows.append({
                "src": sender.name,
                "dst": rec.name,
                "score": float(self.scores[s, r]),
                "in_circuit": bool(edges[s, r]),
                "src_layer": sender.layer,
                "dst_layer": rec.layer,
                "dst_kind": rec.kind,
            })  # fmt: skip
        frame = pd.DataFrame(rows)
        return frame.reindex(frame["score"].abs().sort_values(ascending=False).index)

    def to_dict(self) -> dict[str, Any]:
        edges = self.edges
        return {
            "format": "mechkit.circuit_graph/1",
            "model": self.model_name,
            "layout": self.layout.to_dict(),
            "method": self.method,
            "ablation": self.ablation,
            "metric": self.metric_name,
            "clean_score": self.clean_score,
            "ablated_score": self.ablated_score,
            "has_mask": self.mask is not None,
            "node_scores": self.node_scores,
            "edges": [
                {
                    "edge": f"{self.layout.senders[s].name}->{self.layout.receivers[r].name}",
                    "score": float(self.scores[s, r]),
                    "in_circuit": bool(edges[s, r]),
                }
                for s, r in self.layout.valid.nonzero().tolist()
            ],  # fmt: skip
        }

    def save(self, path: str | Path) -> Path:
        """Write the graph as JSON (atomically); :meth:`load` reads it back.

        Example:
            >>> import tempfile, pathlib
            >>> layout = GraphLayout.build(n_layers=1, n_heads=1, n_kv_heads=1, d_model=4,
            ...                            has_mlp=False)
            >>> graph = CircuitGraph(layout=layout, scores=torch.ones(layout.valid.shape))
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "graph.json"
            >>> CircuitGraph.load(graph.save(path)).edge_names()
            ['input->L0H0.q', 'input->L0H0.k', 'input->L0H0.v', 'input->logits', 'L0H0->logits']
        """
        path = Path(path)
        write_text_atomically(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CircuitGraph:
        if not isinstance(data, dict) or data.get("format") != "mechkit.circuit_graph/1":
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise FileFormatError(
                f"Expected a mechkit circuit graph (format 'mechkit.circuit_graph/1'); got "
                f"format {got!r}. Hint: write it with CircuitGraph.save."
            )
        layout = _layout_from_dict(data["layout"])
        scores = torch.zeros(layout.valid.shape)
        mask = torch.zeros_like(layout.valid)
        for item in data["edges"]:
            s, r = layout.edge_index(item["edge"])
            scores[s, r] = float(item["score"])
            mask[s, r] = bool(item.get("in_circuit", True))
        return cls(
            layout=layout,
            scores=scores,
            mask=mask if data.get("has_mask", True) else None,
            method=data.get("method", ""),
            ablation=data.get("ablation", "corrupt"),
            metric_name=data.get("metric", ""),
            clean_score=data.get("clean_score"),
            ablated_score=data.get("ablated_score"),
            model_name=data.get("model", ""),
            node_scores=data.get("node_scores"),
        )

    @classmethod
    def load(cls, path: str | Path) -> CircuitGraph:
        """Read a graph written by :meth:`save` (also by older mechkit versions, whose edge
        names were ``a0.h1->a2.h3q``).

        Raises:
            FileFormatError: the file is damaged, truncated, another format, or JSON that is
                not a circuit graph (the message names the file).
        """
        what, hint = "a circuit graph (JSON written by CircuitGraph.save)", "save it again."
        data = read_json(path, what, hint)
        try:
            with reading(path, what, hint):
                return cls.from_dict(data)
        except FileFormatError as exc:
            if str(path) in str(exc):
                raise
            raise FileFormatError(f"{exc} (in {str(path)!r})") from exc
        except MechkitError as exc:  # an edge or node the layout does not have, and the like
            raise FileFormatError(f"Expected {what} in {str(path)!r}; {exc} Hint: {hint}") from exc

    def to_eap_ig(self) -> dict[str, Any]:
        """The graph as the JSON dict of Hanna et al.'s EAP-IG code (``Graph.to_json``):
        ``cfg``, ``nodes`` (name -> in the circuit) and ``edges`` (name -> score and whether it
        is in the circuit), in its names (``a0.h1->a2.h3<q>``, ``m3``).

        Example:
            >>> layout = GraphLayout.build(n_layers=1, n_heads=1, n_kv_heads=1, d_model=4,
            ...                            has_mlp=False)
            >>> graph = CircuitGraph(layout=layout, scores=torch.ones(layout.valid.shape))
            >>> sorted(graph.to_eap_ig()["edges"])[:2], graph.to_eap_ig()["nodes"]["a0.h0"]
            (['a0.h0->logits', 'input->a0.h0<k>'], True)
        """
        layout = self.layout
        if not isinstance(layout, GraphLayout):
            raise InvalidArgumentError(
                "Expected a graph of heads and MLPs; got a sparse feature circuit, which "
                "EAP-IG's format has no names for. Hint: CircuitGraph.save writes it."
            )
        if layout.n_kv_heads != layout.n_heads:
            raise UnsupportedModelError(
                f"Expected a model with one key/value head per query head (EAP-IG's format has "
                f"no grouped-query attention); got {layout.n_heads} query and "
                f"{layout.n_kv_heads} key/value heads. Hint: CircuitGraph.save writes it."
            )
        edges = self.edges
        members = set(self.nodes_in_circuit())
        return {
            "cfg": {
                "n_layers": layout.n_layers,
                "n_heads": layout.n_heads,
                "d_model": layout.d_model,
                "parallel_attn_mlp": layout.parallel,
            },
            "nodes": {to_eap_ig(name): name in members for name in layout.nodes},
            "edges": {
                to_eap_ig(f"{layout.senders[s].name}->{layout.receivers[r].name}"): {
                    "score": float(self.scores[s, r]),
                    "in_graph": bool(edges[s, r]),
                }
                for s, r in layout.valid.nonzero().tolist()
            },
        }

    @classmethod
    def from_eap_ig(cls, data: dict[str, Any] | str | Path) -> CircuitGraph:
        """A graph from EAP-IG's JSON (a dict, or the path of a file written by its
        ``Graph.to_json``); edges it leaves unscored score 0.

        Example:
            >>> layout = GraphLayout.build(n_layers=1, n_heads=1, n_kv_heads=1, d_model=4,
            ...                            has_mlp=False)
            >>> graph = CircuitGraph(layout=layout, scores=torch.ones(layout.valid.shape))
            >>> CircuitGraph.from_eap_ig(graph.to_eap_ig()).top(1)
            [('input->L0H0.q', 1.0)]
        """
        what, hint = "EAP-IG graph JSON (cfg, nodes, edges)", "write it with EAP-IG's to_json."
        if not isinstance(data, dict):
            path = data
            data = read_json(path, what, hint)
            with reading(path, what, hint):
                return cls.from_eap_ig(data)
        if not isinstance(data.get("cfg"), dict) or not isinstance(data.get("edges"), dict):
            raise FileFormatError(f"Expected {what}; got keys {sorted(data)}. Hint: {hint}")
        cfg, names = data["cfg"], list(data["edges"])
        has_mlp = any(
            parse_edge(name)[0].kind == "mlp" or parse_edge(name)[1].kind == "mlp" for name in names
        )
        layout = GraphLayout.build(
            n_layers=int(cfg["n_layers"]),
            n_heads=int(cfg["n_heads"]),
            n_kv_heads=int(cfg.get("n_key_value_heads") or cfg["n_heads"]),
            d_model=int(cfg.get("d_model") or 0),
            has_mlp=has_mlp,
            parallel=bool(cfg.get("parallel_attn_mlp", False)),
        )
        scores = torch.zeros(layout.valid.shape)
        mask = torch.zeros_like(layout.valid)
        for name, item in data["edges"].items():
            s, r = layout.edge_index(name)
            scores[s, r] = float(item.get("score") or 0.0)
            mask[s, r] = bool(item.get("in_graph", True))
        return cls(layout=layout, scores=scores, mask=mask, method="EAP-IG")

    def __repr__(self) -> str:
        return (
            f"CircuitGraph({self.model_name or 'model'}, {self.method}, {self.n_edges} of "
            f"{self.layout.n_edges} edges, ablation={self.ablation})"
        )

    # ------------------------------------------------------------------------------- drawing

    def _drawn(self, max_edges: int) -> list[tuple[int, int]]:
        pairs = self.edges.nonzero().tolist()
        pairs.sort(key=lambda sr: -abs(float(self.scores[sr[0], sr[1]])))
        return pairs[:max_edges]

    def plot(self, *, max_edges: int = 300, title: str | None = None) -> Any:
        """An interactive plotly graph: nodes by layer and head, edges blue (positive) or red
        (negative), their width by |score| (the ``max_edges`` strongest of the circuit)."""
        import plotly.graph_objects as go

        layout = self.layout
        pos = layout.positions()
        drawn = self._drawn(max_edges)
        top = max((abs(float(self.scores[s, r])) for s, r in drawn), default=1.0) or 1.0
        members = set(self.nodes_in_circuit())
        fig = go.Figure()
        for sign, colour in ((1, "rgba(33,102,172,0.6)"), (-1, "rgba(178,24,43,0.6)")):
            for band in range(5):  # widths in five bands, a trace each
                xs: list[Any] = []
                ys: list[Any] = []
                for s, r in drawn:
                    score = float(self.scores[s, r])
                    level = min(4, int(5 * abs(score) / top))
                    if (score >= 0) != (sign > 0) or level != band:
                        continue
                    target = self._target(r, members)
                    (x0, y0), (x1, y1) = pos[layout.senders[s].name], pos[target]
                    xs += [x0, x1, None]
                    ys += [y0, y1, None]
                if xs:
                    fig.add_scatter(
                        x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                        line={"color": colour, "width": 0.5 + 1.5 * band},
                    )  # fmt: skip
        names = [n for n in layout.nodes if n in members] or list(layout.nodes)
        rows = layout.row_labels()
        fig.add_scatter(
            x=[pos[n][0] for n in names],
            y=[pos[n][1] for n in names],
            mode="markers+text",
            text=names,
            textposition="top center",
            marker={"size": 10, "color": [_COLOURS[self._kind(n)] for n in names]},
            hovertext=[self._node_hover(n) for n in names],
            hoverinfo="text",
            showlegend=False,
        )
        fig.update_layout(
            title=title or f"{self.model_name} circuit: {self.n_edges} edges ({self.method})",
            xaxis={"visible": False},
            yaxis={
                "tickvals": list(range(len(rows))),
                "ticktext": rows,
            },
            height=max(400, (28 if len(rows) > 8 else 90) * len(rows)),
            plot_bgcolor="white",
        )
        return fig

    def _kind(self, name: str) -> str:
        return (
            "logits"
            if name == "logits"
            else self.layout.senders[self.layout.sender_index(name)].kind
        )

    def _node_hover(self, name: str) -> str:
        layout = self.layout
        edges = self.edges
        if name == "logits":
            inbound = float(self.scores[:, -1][edges[:, -1]].abs().sum())
            return f"logits<br>sum |score| in: {inbound:.3g}"
        s = layout.sender_index(name)
        out = float(self.scores[s][edges[s]].abs().sum())
        text = f"{name}<br>sum |score| out: {out:.3g}"
        if self.node_scores and name in self.node_scores:
            text += f"<br>node score: {self.node_scores[name]:.3g}"
        description = getattr(layout, "descriptions", {}).get(name)
        return text + (f"<br>{html.escape(description)}" if description else "")

    def to_dot(self, *, max_edges: int = 300) -> str:
        """Graphviz source: one rank per layer, edges coloured by sign, pen width by |score|."""
        layout = self.layout
        drawn = self._drawn(max_edges)
        top = max((abs(float(self.scores[s, r])) for s, r in drawn), default=1.0) or 1.0
        nodes = self.nodes_in_circuit()
        members = set(nodes)
        lines = ["digraph circuit {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];']
        by_layer: dict[Any, list[str]] = {}
        for name in nodes:
            by_layer.setdefault(layout.rank(name), []).append(name)
        for layer in sorted(by_layer):
            row = " ".join(f'"{n}"' for n in by_layer[layer])
            lines.append(f"  {{ rank=same; {row} }}")
        for s, r in drawn:
            score = float(self.scores[s, r])
            rec = layout.receivers[r]
            colour = "#2166ac" if score >= 0 else "#b2182b"
            width = 0.5 + 4.5 * abs(score) / top
            label = rec.kind if rec.kind in ("q", "k", "v") else ""
            lines.append(
                f'  "{layout.senders[s].name}" -> "{self._target(r, members)}" [color="{colour}", '
                f'penwidth={width:.2f}, label="{label}", tooltip="{score:.4g}"];'
            )
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_svg(self, *, max_edges: int = 300, scale: float = 60.0) -> str:
        """A standalone SVG drawing (no Graphviz needed): the layout of :meth:`plot`."""
        escape = html.escape
        layout = self.layout
        pos = layout.positions()
        drawn = self._drawn(max_edges)
        top = max((abs(float(self.scores[s, r])) for s, r in drawn), default=1.0) or 1.0
        width = (max(x for x, _ in pos.values()) + 3) * scale
        height = (max(y for _, y in pos.values()) + 2) * scale

        def xy(name: str) -> tuple[float, float]:
            x, y = pos[name]
            return (x + 1) * scale, height - (y + 1) * scale

        members = set(self.nodes_in_circuit())
        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica" font-size="11">'
        ]
        for s, r in drawn:
            score = float(self.scores[s, r])
            (x0, y0), (x1, y1) = xy(layout.senders[s].name), xy(self._target(r, members))
            colour = "#2166ac" if score >= 0 else "#b2182b"
            parts.append(
                f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="{colour}" '
                f'stroke-opacity="0.6" stroke-width="{0.5 + 4.5 * abs(score) / top:.2f}">'
                f"<title>{escape(layout.senders[s].name)}-&gt;{escape(layout.receivers[r].name)}"
                f" {score:.4g}</title></line>"
            )
        for name in self.nodes_in_circuit():
            x, y = xy(name)
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{_COLOURS[self._kind(name)]}"/>'
                f'<text x="{x + 8:.1f}" y="{y - 6:.1f}">{escape(name)}</text>'
            )
        parts.append("</svg>")
        return "\n".join(parts) + "\n"


_COLOURS = {
    "input": "#2a9d8f",
    "logits": "#2a9d8f",
    "head": "#444",
    "mlp": "#2a9d8f",
    "latent": "#e76f51",
    "error": "#999",
}


def _layout_from_dict(data: dict[str, Any]) -> GraphLayout | FeatureLayout:
    """The layout a saved graph names: a model's graph, or a sparse feature circuit's."""
    if data.get("kind") == "features":
        return FeatureLayout.from_dict(data)
    return GraphLayout.build(**data)


@dataclasses.dataclass(frozen=True, eq=False)
class ROC:
    """Receiver operating characteristic of a ranking against reference labels.

    Example:
        >>> roc = ROC.from_scores(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, True]))
        >>> roc.auc
        0.5
    """

    fpr: Float[Tensor, " point"]
    tpr: Float[Tensor, " point"]
    auc: float
    n_positive: int
    n_negative: int

    @classmethod
    def from_scores(cls, scores: Float[Tensor, " edge"], positive: Bool[Tensor, " edge"]) -> ROC:
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            raise InvalidArgumentError(
                f"Expected both reference and non-reference edges; got {n_pos} and {n_neg}."
            )
        order = scores.argsort(descending=True, stable=True)
        hits = positive[order].double()
        tpr = torch.cat([torch.zeros(1), hits.cumsum(0) / n_pos])
        fpr = torch.cat([torch.zeros(1), (1 - hits).cumsum(0) / n_neg])
        # AUC as the probability that a positive outranks a negative (ties count half)
        ranks = _average_ranks(scores.double())
        auc = float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        return cls(fpr.float(), tpr.float(), auc, n_pos, n_neg)

    def plot(self, *, title: str | None = None) -> Any:
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(x=self.fpr.tolist(), y=self.tpr.tolist(), mode="lines", name="ROC")
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line_dash="dot", name="chance")
        fig.update_layout(
            title=title or f"ROC against the reference circuit (AUC {self.auc:.3f})",
            xaxis_title="false positive rate",
            yaxis_title="true positive rate",
        )
        return fig

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist()})


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks, ties sharing their mean rank."""
    sorted_x, order = x.sort(stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inverse, ranks[order])
    ranks[order] = (sums / counts.to(x.dtype))[inverse]
    return ranks
