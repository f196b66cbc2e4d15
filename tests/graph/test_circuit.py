"""CircuitGraph selection, pruning, saving and drawing on hand-set scores whose answer is known."""

from __future__ import annotations

import json

import pytest
import torch

import mechkit as mk
from mechkit.graph import ROC, CircuitGraph, GraphLayout
from tests.conftest import JSON_DAMAGES, damage


@pytest.fixture
def graph() -> CircuitGraph:
    """Two layers of two heads with an MLP, grouped queries (one key/value head per layer)."""
    layout = GraphLayout.build(n_layers=2, n_heads=2, n_kv_heads=1, d_model=8, has_mlp=True)
    scores = torch.zeros(layout.valid.shape)
    for edge, value in {
        "input->a0.h0q": 0.5,
        "a0.h0->a1.h0v": -0.9,
        "a1.h1->logits": 1.0,
        "m1->logits": 0.05,
        "a0.h1->m0": 0.8,  # a0.h1 reaches the logits only through m0, which has no path on
        "input->m1": 0.01,
    }.items():
        s, r = layout.edge_index(edge)
        scores[s, r] = value
    return CircuitGraph(layout=layout, scores=scores, method="hand", model_name="toy")


def test_layout_names_and_edges():
    layout = GraphLayout.build(n_layers=2, n_heads=2, n_kv_heads=1, d_model=8, has_mlp=True)
    names = [r.name for r in layout.receivers]
    assert names[:5] == ["a0.h0q", "a0.h1q", "a0.h0k", "a0.h0v", "m0"]
    assert layout.receivers[2].nodes == ("a0.h0", "a0.h1")  # the shared key head feeds both
    # 11 receivers (per layer 2 q, 1 k, 1 v, the MLP; the logits); the input feeds all 11,
    # each layer-0 head m0, the 5 of layer 1 and the logits; m0 those 6; each layer-1 head m1
    # and the logits; m1 the logits
    assert layout.n_edges == 11 + 2 * 7 + 6 + 2 * 2 + 1
    with pytest.raises(mk.MechkitError, match="later component"):
        layout.edge_index("a1.h0->a0.h0q")
    with pytest.raises(mk.MechkitError, match="Did you mean"):
        layout.edge_index("a0.h0->a1.h1x")
    parallel = GraphLayout.build(
        n_layers=1, n_heads=2, n_kv_heads=2, d_model=8, has_mlp=True, parallel=True
    )
    with pytest.raises(mk.MechkitError):
        parallel.edge_index("a0.h0->m0")  # attention and MLP read the same residual


def test_top_threshold_and_greedy(graph):
    assert graph.top_edges(3).edge_names() == ["a1.h1->logits", "a0.h0->a1.h0v", "a0.h1->m0"]
    assert graph.threshold(0.5).n_edges == 4
    assert graph.top_edges(2, absolute=False).edge_names() == ["a1.h1->logits", "a0.h1->m0"]
    # greedy grows from the logits: a0.h1->m0 (0.8) is not reachable before m0 joins
    assert graph.greedy(3).edge_names() == ["a1.h1->logits", "a0.h0->a1.h0v", "input->a0.h0q"]


def test_prune_drops_edges_cut_off_from_input_or_logits(graph):
    pruned = graph.threshold(0.3).prune()
    assert sorted(pruned.edge_names()) == sorted(
        ["input->a0.h0q", "a0.h0->a1.h0v", "a1.h1->logits"]
    )
    assert pruned.nodes_in_circuit() == ["input", "a0.h0", "a1.h1", "logits"]


def test_json_round_trip_and_bad_files(graph, tmp_path):
    circuit = graph.top_edges(4)
    path = circuit.save(tmp_path / "c.json")
    back = CircuitGraph.load(path)
    assert back.edge_names() == circuit.edge_names()
    torch.testing.assert_close(back.scores, circuit.scores)
    data = json.loads(path.read_text())
    data["edges"][0]["edge"] = "a0.h9->logits"
    with pytest.raises(mk.MechkitError, match="sender"):
        CircuitGraph.from_dict(data)
    with pytest.raises(mk.MechkitError, match="format"):
        CircuitGraph.from_dict({"format": "other"})


@pytest.mark.parametrize("how", JSON_DAMAGES)
def test_damaged_circuit_graph_file_raises_file_format_error(how, graph, tmp_path):
    path = graph.top_edges(4).save(tmp_path / "c.json")
    damage(path, how)
    with pytest.raises(mk.FileFormatError, match="c.json") as err:
        CircuitGraph.load(path)
    assert "Hint" in str(err.value)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["edges"][0].update(edge="a0.h9->logits"),  # a node the layout lacks
        lambda d: d["edges"][0].update(score="high"),
        lambda d: d["layout"].update(n_layers="two"),
        lambda d: d.pop("edges"),
        lambda d: d.update(format="mechkit.circuit_graph/0"),
    ],
)
def test_circuit_graph_file_of_the_wrong_shape_raises_file_format_error(change, graph, tmp_path):
    path = graph.top_edges(4).save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(mk.FileFormatError, match="c.json"):
        CircuitGraph.load(path)


def test_roc_against_a_reference(graph):
    reference = ["a1.h1->logits", "a0.h0->a1.h0v", "input->a0.h0q"]
    roc = graph.roc(reference)
    # the three reference edges hold three of the four largest |scores|: one negative outranks
    # one positive, of 3 x (n_edges - 3) pairs
    n_neg = graph.layout.n_edges - 3
    assert roc.auc == pytest.approx(1 - 1 / (3 * n_neg))
    assert roc.tpr[-1] == 1 and roc.fpr[-1] == 1
    assert graph.roc(["a1.h1", "a0.h0"]).n_positive > 0
    with pytest.raises(mk.MechkitError, match="unknown"):
        graph.roc(["a1.h7"])
    with pytest.raises(mk.MechkitError, match="sender"):
        graph.roc(["a1.h7->logits"])


def test_roc_auc_equals_pair_counting():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(200, generator=generator).round(decimals=1)  # with ties
    positive = torch.rand(200, generator=generator) < 0.3
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert ROC.from_scores(scores, positive).auc == pytest.approx(float(wins.mean()))


def test_drawings(graph):
    circuit = graph.threshold(0.3).prune()
    fig = circuit.plot()
    markers = [t for t in fig.data if t.mode == "markers+text"][0]
    assert list(markers.text) == ["input", "a0.h0", "a1.h1", "logits"]
    dot = circuit.to_dot()
    assert dot.count("->") == 3 and "rank=same" in dot and "#b2182b" in dot  # one negative
    svg = circuit.to_svg()
    assert svg.startswith("<svg") and svg.count("<line") == 3
    assert len(circuit.to_dataframe()) == graph.layout.n_edges
