"""CircuitGraph selection, pruning, saving and drawing on hand-set scores whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

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
        "input->L0H0.q": 0.5,
        "L0H0->L1H0.v": -0.9,
        "L1H1->logits": 1.0,
        "L1.mlp->logits": 0.05,
        "L0H1->L0.mlp": 0.8,  # a0.h1 reaches the logits only through m0, which has no path on
        "input->L1.mlp": 0.01,
    }.items():
        s, r = layout.edge_index(edge)
        scores[s, r] = value
    return CircuitGraph(layout=layout, scores=scores, method="hand", model_name="toy")


def test_layout_names_and_edges():
    layout = GraphLayout.build(n_layers=2, n_heads=2, n_kv_heads=1, d_model=8, has_mlp=True)
    names = [r.name for r in layout.receivers]
    assert names[:5] == ["L0H0.q", "L0H1.q", "L0H0.k", "L0H0.v", "L0.mlp"]
    assert layout.receivers[2].nodes == ("L0H0", "L0H1")  # the shared key head feeds both
    # 11 receivers (per layer 2 q, 1 k, 1 v, the MLP; the logits); the input feeds all 11,
    # each layer-0 head m0, the 5 of layer 1 and the logits; m0 those 6; each layer-1 head m1
    # and the logits; m1 the logits
    assert layout.n_edges == 11 + 2 * 7 + 6 + 2 * 2 + 1
    with pytest.raises(mk.MechkitError, match="later component"):
        layout.edge_index("L1H0->L0H0.q")
    with pytest.raises(mk.MechkitError, match="Did you mean"):
        layout.edge_index("a0.h0->a1.h1x")
    parallel = GraphLayout.build(
        n_layers=1, n_heads=2, n_kv_heads=2, d_model=8, has_mlp=True, parallel=True
    )
    with pytest.raises(mk.MechkitError):
        parallel.edge_index("L0H0->L0.mlp")  # attention and MLP read the same residual


def test_top_threshold_and_greedy(graph):
    assert graph.top_edges(3).edge_names() == ["L1H1->logits", "L0H0->L1H0.v", "L0H1->L0.mlp"]
    assert graph.threshold(0.5).n_edges == 4
    assert graph.top_edges(2, absolute=False).edge_names() == ["L1H1->logits", "L0H1->L0.mlp"]
    # greedy grows from the logits: a0.h1->m0 (0.8) is not reachable before m0 joins
    assert graph.greedy(3).edge_names() == ["L1H1->logits", "L0H0->L1H0.v", "input->L0H0.q"]


def test_prune_drops_edges_cut_off_from_input_or_logits(graph):
    pruned = graph.threshold(0.3).prune()
    assert sorted(pruned.edge_names()) == sorted(["input->L0H0.q", "L0H0->L1H0.v", "L1H1->logits"])
    assert pruned.nodes_in_circuit() == ["input", "L0H0", "L1H1", "logits"]


def test_json_round_trip_and_bad_files(graph, tmp_path):
    circuit = graph.top_edges(4)
    path = circuit.save(tmp_path / "c.json")
    back = CircuitGraph.load(path)
    assert back.edge_names() == circuit.edge_names()
    torch.testing.assert_close(back.scores, circuit.scores)
    data = json.loads(path.read_text())
    data["edges"][0]["edge"] = "L0H9->logits"
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
        lambda d: d["edges"][0].update(edge="L0H9->logits"),  # a node the layout lacks
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
    reference = ["L1H1->logits", "L0H0->L1H0.v", "input->L0H0.q"]
    roc = graph.roc(reference)
    # the three reference edges hold three of the four largest |scores|: one negative outranks
    # one positive, of 3 x (n_edges - 3) pairs
    n_neg = graph.layout.n_edges - 3
    assert roc.auc == pytest.approx(1 - 1 / (3 * n_neg))
    assert roc.tpr[-1] == 1 and roc.fpr[-1] == 1
    assert graph.roc(["L1H1", "L0H0"]).n_positive > 0
    with pytest.raises(mk.MechkitError, match="unknown"):
        graph.roc(["L1H7"])
    with pytest.raises(mk.MechkitError, match="sender"):
        graph.roc(["L1H7->logits"])


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
    assert list(markers.text) == ["input", "L0H0", "L1H1", "logits"]
    dot = circuit.to_dot()
    assert dot.count("->") == 3 and "rank=same" in dot and "#b2182b" in dot  # one negative
    svg = circuit.to_svg()
    assert svg.startswith("<svg") and svg.count("<line") == 3
    assert len(circuit.to_dataframe()) == graph.layout.n_edges


def test_file_saved_with_the_old_names_still_loads():
    # written by mechkit before the one naming scheme (edges "a0.h0->a1.h0v", "a0.h1->m0")
    path = Path(__file__).parent / "data" / "old_names_graph.json"
    assert '"a0.h0->a1.h0v"' in path.read_text()
    old = CircuitGraph.load(path)
    assert old.edge_names() == ["L1H1->logits", "L0H0->L1H0.v", "L0H1->L0.mlp"]
    assert old.top(1) == [("L1H1->logits", 1.0)]
    assert (old.clean_score, old.ablated_score, old.metric_name) == (2.0, -1.0, "LogitDiff")


def test_old_and_eap_ig_names_find_the_same_edges_and_nodes(graph):
    ours = graph.with_edges(["L0H0->L1H0.v", "L0H1->L0.mlp"]).edge_names()
    for names in (["a0.h0->a1.h0v", "a0.h1->m0"], ["a0.h0->a1.h0<v>", "a0.h1->m0"]):
        assert graph.with_edges(names).edge_names() == ours
    assert graph.without(["a1.h1->logits"]).n_edges == graph.layout.n_edges - 1
    new = graph.roc(["L1H1", "L0H0"])
    old = graph.roc(["a1.h1", "a0.h0"])
    assert (old.auc, old.n_positive) == (new.auc, new.n_positive)


def test_top_ranks_edges_by_the_rank_rule(graph):
    # the hand-set scores, largest |score| first; signed order with absolute=False
    assert graph.top(3) == [("L1H1->logits", 1.0), ("L0H0->L1H0.v", pytest.approx(-0.9)),
                            ("L0H1->L0.mlp", pytest.approx(0.8))]  # fmt: skip
    assert [name for name, _ in graph.top(3, absolute=False)] == [
        "L1H1->logits", "L0H1->L0.mlp", "input->L0H0.q",
    ]  # fmt: skip
    assert len(graph.top()) == 10 and len(graph.top(None)) == graph.layout.n_edges
    circuit = graph.with_edges(["input->L1.mlp", "L1.mlp->logits"])
    assert [name for name, _ in circuit.top()] == ["L1.mlp->logits", "input->L1.mlp"]
    with pytest.raises(mk.InvalidArgumentError, match="non-negative"):
        graph.top(-1)


def test_eap_ig_json_round_trip():
    layout = GraphLayout.build(n_layers=2, n_heads=2, n_kv_heads=2, d_model=8, has_mlp=True)
    scores = torch.arange(layout.valid.numel(), dtype=torch.float32).reshape(layout.valid.shape)
    graph = CircuitGraph(layout=layout, scores=scores * layout.valid).top_edges(5)
    data = graph.to_eap_ig()
    assert data["edges"]["a0.h0->a1.h1<k>"]["score"] == float(
        graph.scores[layout.edge_index("L0H0->L1H1.k")]
    )
    assert data["nodes"]["m1"] == ("L1.mlp" in graph.nodes_in_circuit())
    back = CircuitGraph.from_eap_ig(json.loads(json.dumps(data)))
    torch.testing.assert_close(back.scores, graph.scores)
    assert back.edge_names() == graph.edge_names()


def test_eap_ig_json_refuses_grouped_query_graphs(graph):
    with pytest.raises(mk.UnsupportedModelError, match="grouped-query"):
        graph.to_eap_ig()
