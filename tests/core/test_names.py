"""The naming scheme: parse_node / to_eap_ig / from_eap_ig round trips over every node of the
toy model and of a two-layer cut of SmolLM2-like names, and the older forms still read."""

from __future__ import annotations

import pytest

import mechkit as mk
from mechkit.core import (
    NodeName,
    edge_name,
    from_eap_ig,
    head_name,
    mlp_name,
    neuron_name,
    parse_edge,
    parse_node,
    to_eap_ig,
)
from mechkit.core.names import attn_name


def _nodes(n_layers, n_heads, n_kv_heads, has_mlp, n_neurons=0):
    """Every node name of a model of this shape, in our scheme."""
    names = ["input", "logits"]
    for layer in range(n_layers):
        names.append(attn_name(layer))
        for head in range(n_heads):
            names += [head_name(layer, head), head_name(layer, head, "q")]
        for head in range(n_kv_heads):
            names += [head_name(layer, head, "k"), head_name(layer, head, "v")]
        if has_mlp:
            names.append(mlp_name(layer))
            names += [neuron_name(layer, i) for i in range(n_neurons)]
    return names


def _models(toy):
    cfg = toy.cfg
    toy_names = _nodes(cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, False)
    smol_cut = _nodes(2, 9, 3, True, n_neurons=3)  # SmolLM2-135M: 9 heads, 3 kv heads, MLPs
    return {"toy": toy_names, "smollm2 cut": smol_cut}


def test_every_node_name_round_trips(toy):
    for names in _models(toy).values():
        assert len(set(names)) == len(names)
        for name in names:
            node = parse_node(name)
            assert str(node) == name
            assert parse_node(node) is node
            if node.kind in ("attn", "neuron"):  # EAP-IG has no such nodes
                with pytest.raises(mk.InvalidArgumentError, match="EAP-IG"):
                    to_eap_ig(name)
                continue
            peer = to_eap_ig(name)
            assert from_eap_ig(peer) == name
            assert parse_node(peer) == node


def test_every_edge_name_round_trips(toy):
    for names in _models(toy).values():
        senders = [
            n
            for n in names
            if n == "input"
            or (parse_node(n).kind in ("head", "mlp") and parse_node(n).port is None)
        ]
        receivers = [
            n
            for n in names
            if n == "logits" or parse_node(n).kind == "mlp" or parse_node(n).port is not None
        ]
        for sender in senders:
            for receiver in receivers:
                edge = f"{sender}->{receiver}"
                assert edge_name(sender, receiver) == edge
                assert tuple(map(str, parse_edge(edge))) == (sender, receiver)
                assert from_eap_ig(to_eap_ig(edge)) == edge


@pytest.mark.parametrize(
    ("old", "ours"),
    [
        ("a9.h6", "L9H6"),
        ("a9.h6<q>", "L9H6.q"),
        ("a9.h6q", "L9H6.q"),  # the older mechkit graph name
        ("a0.h1k", "L0H1.k"),
        ("9.6", "L9H6"),  # the IOI paper's
        ("m3", "L3.mlp"),
        (" L2H0 ", "L2H0"),
    ],
)
def test_older_and_peer_names_still_read(old, ours):
    assert str(parse_node(old)) == ours


@pytest.mark.parametrize("bad", ["L9H", "head 9.6", "a9h6", "L9.mlpx", "", "L-1H0"])
def test_names_that_mean_nothing_are_refused_with_the_scheme(bad):
    with pytest.raises(mk.InvalidArgumentError, match="L9H6"):
        parse_node(bad)


def test_bad_edges_and_types_are_refused():
    with pytest.raises(mk.InvalidArgumentError, match="sender->receiver"):
        parse_edge("L0H1")
    with pytest.raises(mk.InvalidArgumentError, match="sender->receiver"):
        parse_edge("a->b->c")
    with pytest.raises(mk.InvalidArgumentError, match="a string"):
        parse_node(9)
    assert NodeName("head", 1, 2).head == 2 and NodeName("neuron", 1, 2).head is None
