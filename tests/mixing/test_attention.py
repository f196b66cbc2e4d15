"""Raw attention, rollout and flow against independent computations."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.mixing.attention import max_flow
from tests.conftest import hook_count
from tests.mixing.models import identity_attention_model, tiny_model

TOKENS = torch.tensor([[1, 7, 3, 9, 2, 4, 8, 5]])


def _patterns(model, tokens):
    _, cache = model.run_with_cache(tokens)  # TransformerLens's own cache
    return [cache["pattern", layer][0] for layer in range(model.cfg.n_layers)]


def test_raw_attention_is_the_head_mean_and_one_head(toy):
    patterns = _patterns(toy, TOKENS)
    mix = mk.context_mixing(toy, TOKENS, method="attention", layers=[0, 1])
    for layer in range(2):
        assert torch.allclose(mix.map(layer), patterns[layer].mean(0), atol=1e-6)
    one = mk.context_mixing(toy, TOKENS, method="attention", head=3, layers=[1])
    assert torch.allclose(one.map(1), patterns[1][3], atol=1e-6)
    assert torch.allclose(mix.aggregated[0], (patterns[0].mean(0) + patterns[1].mean(0)) / 2)
    assert hook_count(toy) == 0


def test_rollout_equals_a_loop_of_matrix_products(toy):
    n = TOKENS.shape[1]
    product = torch.eye(n, dtype=torch.float64)
    expected = []
    for pattern in _patterns(toy, TOKENS):
        step = 0.5 * pattern.mean(0).double() + 0.5 * torch.eye(n, dtype=torch.float64)
        step = step / step.sum(-1, keepdim=True)
        product = step @ product
        expected.append(product.clone())
    mix = mk.context_mixing(toy, TOKENS, method="rollout", layers=[0, 1])
    for layer in range(2):
        assert torch.allclose(mix.map(layer).double(), expected[layer], atol=1e-6)
    assert torch.allclose(mix.aggregated[0].double(), expected[-1], atol=1e-6)
    assert torch.allclose(mix.aggregated.sum(-1), torch.ones(1, n), atol=1e-5)


@pytest.mark.parametrize("method", ["attention", "rollout", "flow"])
def test_identity_attention_gives_the_identity(method):
    model = identity_attention_model()
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    attention = _patterns(model, tokens)[0].mean(0)
    assert torch.allclose(attention, torch.eye(6), atol=1e-6)  # the model is what it claims
    mix = mk.context_mixing(model, tokens, method=method)
    assert torch.allclose(mix.aggregated[0], torch.eye(6), atol=1e-5)


def test_flow_on_one_layer_is_the_residual_attention():
    model = tiny_model(n_layers=1, attn_only=True)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    attention = _patterns(model, tokens)[0].mean(0)
    expected = 0.5 * attention + 0.5 * torch.eye(6)  # rows already sum to 1
    mix = mk.context_mixing(model, tokens, method="flow")
    assert torch.allclose(mix.aggregated[0].nan_to_num(), expected, atol=1e-5)


def test_flow_through_two_layers_is_a_max_flow_by_hand():
    # path graph: input 0 reaches output 1 through (1, 0) or (1, 1); min cut by hand
    steps = torch.tensor([[[1.0, 0.0], [0.3, 0.7]], [[1.0, 0.0], [0.6, 0.4]]])
    flow = max_flow(steps, (1,))
    # 0 -> 1 via layer-1 position 0 (min(1.0, 0.6)) and position 1 (min(0.3, 0.4)): 0.9
    assert flow[0].tolist() == pytest.approx([0.9, 0.4])


def test_flow_keeps_only_the_chosen_queries(toy):
    mix = mk.context_mixing(toy, TOKENS, method="flow", positions=[2, -1])
    assert mix.queries == (2, 7) and mix.layers == (1,)
    assert mix.aggregated.shape == (1, 2, 8)
    full = mk.context_mixing(toy, TOKENS, method="flow")
    assert torch.allclose(full.aggregated[0, [2, 7]], mix.aggregated[0], equal_nan=True)


def test_flow_equals_networkx_max_flow_on_a_random_layered_graph():
    nx = pytest.importorskip("networkx")
    torch.manual_seed(0)
    n_layers, n = 3, 6
    steps = torch.rand(n_layers, n, n).tril()
    steps = steps / steps.sum(-1, keepdim=True)
    graph = nx.DiGraph()
    for layer in range(n_layers):
        for i in range(n):
            for k in range(i + 1):
                graph.add_edge((layer, k), (layer + 1, i), capacity=float(steps[layer, i, k]))
    flow = max_flow(steps, (3, 5))
    for row, query in enumerate((3, 5)):
        for key in range(n):
            expected = (
                nx.maximum_flow_value(graph, (0, key), (n_layers, query)) if key <= query else 0
            )
            assert float(flow[row, key]) == pytest.approx(expected, abs=1e-5)
