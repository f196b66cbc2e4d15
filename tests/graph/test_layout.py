"""GraphLayout: node and receiver names, which edges exist, drawing positions and errors.

Edge sets are checked two ways: counted by hand for small layouts, and measured on tiny random
models, where an edge exists exactly when perturbing the sender's output changes what the
receiver reads (every sender writes into the residual stream directly, so any dependence is a
direct edge).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
from mechkit.core.names import parse_node
from mechkit.graph import GraphLayout
from mechkit.graph.layout import Edge


def _layout(**sizes):
    base = dict(n_layers=2, n_heads=2, n_kv_heads=2, d_model=8, has_mlp=True)
    return GraphLayout.build(**(base | sizes))


def test_toy_model_layout_counted_by_hand(toy):
    layout = GraphLayout.from_model(toy)  # two layers of four heads, attention only
    assert [n.name for n in layout.senders] == ["input"] + [
        f"L{layer}H{head}" for layer in range(2) for head in range(4)
    ]
    assert [r.name for r in layout.receivers] == [
        f"L{layer}H{head}.{kind}" for layer in range(2) for kind in "qkv" for head in range(4)
    ] + ["logits"]
    # the input feeds all 25 receivers; each layer-0 head the 12 of layer 1 and the logits;
    # each layer-1 head the logits
    assert layout.n_edges == 25 + 4 * 13 + 4 * 1 == 81
    assert layout.nodes == (*[n.name for n in layout.senders], "logits")
    # no MLP column: the input and the logits sit centred over the four heads
    positions = layout.positions()
    assert positions["input"] == (1.5, 0.0) and positions["logits"] == (1.5, 3.0)
    assert positions["L1H3"] == (3.0, 2.0) and len(positions) == 10
    assert layout.to_dict() == {
        "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "d_model": toy.cfg.d_model,
        "has_mlp": False, "parallel": False,
    }  # fmt: skip


@pytest.mark.parametrize(
    "sizes, senders, receivers, edges",
    [
        # 1 layer, 1 head, no MLP: input -> q, k, v, logits; the head -> logits
        (dict(n_layers=1, n_heads=1, n_kv_heads=1, has_mlp=False), 2, 4, 4 + 1),
        # 1 layer, 2 heads, MLP: input feeds 2q 2k 2v m0 logits (8); each head m0 and logits;
        # m0 the logits
        (dict(n_layers=1, n_heads=2, n_kv_heads=2), 4, 8, 8 + 2 * 2 + 1),
        # the same in parallel: heads no longer feed m0
        (dict(n_layers=1, n_heads=2, n_kv_heads=2, parallel=True), 4, 8, 8 + 2 * 1 + 1),
        # 2 layers of 4 query heads sharing 2 key/value heads, MLPs: per layer 4q 2k 2v m (9);
        # input 19; layer-0 heads m0 + 9 + logits (11) each; m0 10; layer-1 heads 2 each; m1 1
        (dict(n_layers=2, n_heads=4, n_kv_heads=2), 1 + 2 * 5, 19, 19 + 4 * 11 + 10 + 4 * 2 + 1),
    ],
)
def test_sizes_counted_by_hand(sizes, senders, receivers, edges):
    layout = _layout(**sizes)
    assert len(layout.senders) == senders
    assert len(layout.receivers) == receivers
    assert layout.n_edges == edges == len(layout.edge_names())
    assert layout.valid.shape == (senders, receivers) and layout.valid.dtype == torch.bool


def test_grouped_key_value_heads_feed_their_query_heads():
    layout = _layout(n_layers=1, n_heads=6, n_kv_heads=2)
    k = {r.name: r for r in layout.receivers if r.kind == "k"}
    v = {r.name: r for r in layout.receivers if r.kind == "v"}
    assert list(k) == ["L0H0.k", "L0H1.k"] and list(v) == ["L0H0.v", "L0H1.v"]
    assert k["L0H0.k"].nodes == ("L0H0", "L0H1", "L0H2")
    assert k["L0H1.k"].nodes == ("L0H3", "L0H4", "L0H5")
    assert v["L0H1.v"].nodes == k["L0H1.k"].nodes and v["L0H1.v"].head == 1
    q = [r for r in layout.receivers if r.kind == "q"]
    assert [r.nodes for r in q] == [(f"L0H{h}",) for h in range(6)]
    with pytest.raises(mk.MechkitError, match="multiple of n_kv_heads"):
        _layout(n_heads=4, n_kv_heads=3)


def _tiny(parallel: bool, attn_only: bool = False):
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=16, n_heads=2, d_head=4, d_mlp=None if attn_only else 32, d_vocab=20,
        n_ctx=8, act_fn="relu", normalization_type="LN", attn_only=attn_only,
        parallel_attn_mlp=parallel, use_split_qkv_input=True, use_attn_result=True,
        use_hook_mlp_in=True, seed=1, dtype=torch.float64,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def _sender_hook(name: str, n_layers: int) -> tuple[str, object]:
    """The hook whose output is the sender's write into the residual stream, and the index."""
    if name == "input":
        return "hook_embed", ...
    node = parse_node(name)
    if node.kind == "head":
        return f"blocks.{node.layer}.attn.hook_result", (slice(None), slice(None), node.head)
    return f"blocks.{node.layer}.hook_mlp_out", ...


def _receiver_hook(receiver, n_layers: int) -> tuple[str, object]:
    """The hook holding what the receiver reads from the residual stream, and the index."""
    if receiver.kind == "logits":
        return f"blocks.{n_layers - 1}.hook_resid_post", ...
    if receiver.kind == "mlp":
        return f"blocks.{receiver.layer}.hook_mlp_in", ...
    per_head = (slice(None), slice(None), receiver.head)
    return f"blocks.{receiver.layer}.hook_{receiver.kind}_input", per_head


@pytest.mark.parametrize("parallel, attn_only", [(False, False), (True, False), (False, True)])
def test_edges_are_exactly_the_measured_dependencies(parallel, attn_only):
    model = _tiny(parallel, attn_only)
    layout = GraphLayout.from_model(model)
    assert layout.parallel == parallel and layout.has_mlp == (not attn_only)
    n = model.cfg.n_layers
    tokens = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    reads = {r.name: _receiver_hook(r, n) for r in layout.receivers}
    names = {hook for hook, _ in reads.values()}
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    for s, sender in enumerate(layout.senders):
        hook_name, index = _sender_hook(sender.name, n)

        def perturb(act, hook, index=index):
            act = act.clone()
            act[index] += 5.0 * torch.randn_like(act[index])
            return act

        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, perturb)]):
            _, moved = model.run_with_cache(tokens, names_filter=lambda name: name in names)
        for r, receiver in enumerate(layout.receivers):
            read, index = reads[receiver.name]
            depends = not torch.allclose(moved[read][index], clean[read][index])
            assert depends == bool(layout.valid[s, r]), f"{sender.name}->{receiver.name}"


def test_edge_names_round_trip_through_indices():
    layout = _layout()
    names = layout.edge_names()
    assert len(names) == len(set(names)) == layout.n_edges
    for name in names:
        s, r = layout.edge_index(name)
        assert f"{layout.senders[s].name}->{layout.receivers[r].name}" == name
        assert layout.edge_index(Edge.parse(name)) == (s, r)
    mask = torch.zeros_like(layout.valid)
    mask[0, :3] = True
    mask[-1, 0] = True  # not a valid edge (the last MLP cannot feed layer 0): ignored
    assert layout.edge_names(mask) == ["input->L0H0.q", "input->L0H1.q", "input->L0H0.k"]


def test_edge_parse_and_errors():
    assert Edge.parse(" a0.h1 -> a1.h0q ") == Edge("L0H1", "L1H0.q")
    assert Edge("L0H1", "L1H0.q").name == "L0H1->L1H0.q"
    for bad in ["L0H1", "->a1.h0q", "a0.h1->", ""]:
        with pytest.raises(mk.MechkitError, match="sender->receiver"):
            Edge.parse(bad)
    layout = _layout()
    with pytest.raises(mk.MechkitError, match="Did you mean 'L0H1'"):
        layout.sender_index("L0H11")
    with pytest.raises(mk.MechkitError, match="Expected a receiver"):
        layout.receiver_index("a0.h0x")
    for backwards in [
        "L1H0->L0H0.q",
        "L0H0->L0H1.k",
        "L1.mlp->L0.mlp",
        "L0.mlp->L0.mlp",
        "logits->L0.mlp",
    ]:
        with pytest.raises(mk.MechkitError):
            layout.edge_index(backwards)


def test_rows_and_positions_counted_by_hand():
    layout = _layout(n_layers=2, n_heads=3, n_kv_heads=3)
    assert layout.row_labels() == ["input", "L0", "L1", "logits"]
    assert [layout.rank(n) for n in ["input", "L0H2", "L0.mlp", "L1H0", "L1.mlp", "logits"]] == [
        -1, 0, 0, 1, 1, 2,
    ]  # fmt: skip
    # width 4 (three heads and the MLP): input and logits centred at x = 1.5
    assert layout.positions() == {
        "input": (1.5, 0.0),
        "L0H0": (0.0, 1.0), "L0H1": (1.0, 1.0), "L0H2": (2.0, 1.0), "L0.mlp": (3.0, 1.0),
        "L1H0": (0.0, 2.0), "L1H1": (1.0, 2.0), "L1H2": (2.0, 2.0), "L1.mlp": (3.0, 2.0),
        "logits": (1.5, 3.0),
    }  # fmt: skip
    # forward order: every sender comes before each receiver it feeds
    orders = [layout.sender_order(s) for s in range(len(layout.senders))]
    assert orders == [-1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0]


def test_same_as_and_to_dict_round_trip():
    layout = _layout(n_heads=4, n_kv_heads=2, parallel=True)
    again = GraphLayout.build(**layout.to_dict())
    assert again.same_as(layout) and torch.equal(again.valid, layout.valid)
    assert not layout.same_as(_layout(n_heads=4, n_kv_heads=4, parallel=True))


def test_from_model_refuses_unsupported_architectures():
    def fake(**cfg):
        base = dict(
            model_name="fake", n_layers=1, n_heads=2, n_key_value_heads=None, d_model=8,
            attn_only=False, original_architecture="LlamaForCausalLM",
        )  # fmt: skip
        return SimpleNamespace(cfg=SimpleNamespace(**(base | cfg)))

    assert GraphLayout.from_model(fake()).n_kv_heads == 2  # None: one key/value head per head
    with pytest.raises(mk.UnsupportedModelError, match="normalizes them first"):
        GraphLayout.from_model(fake(use_normalization_before_and_after=True))
    with pytest.raises(mk.UnsupportedModelError, match="pre-norm"):
        GraphLayout.from_model(fake(original_architecture="OPTForCausalLM"))
    with pytest.raises(mk.UnsupportedModelError, match="pre-norm"):
        GraphLayout.from_model(fake(post_norm=True))
