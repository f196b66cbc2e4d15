"""CD-T (mechkit/graph/methods/cdt.py): the relevant and irrelevant parts sum to the real
activations at every layer, on the toy and on small Llama-like and GPT-like models; without
normalization the edge scores equal real edge patching; the graphs select, prune and evaluate
like EAP's."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk

cdt = importlib.import_module("mechkit.graph.methods.cdt")


def _small(**overrides) -> HookedTransformer:
    base = dict(
        n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, n_ctx=12, d_vocab=23,
        act_fn="gelu", normalization_type="LN", seed=1,
    )  # fmt: skip
    base.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**base))
    with torch.no_grad():  # non-zero biases, so that their placement is tested too
        for name, param in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


MODELS = {
    "gpt-like": dict(),
    "llama-like": dict(
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=4,
        n_key_value_heads=2,
        final_rms=True,
    ),  # fmt: skip
    "no norms": dict(normalization_type=None),
}
CLEAN = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
CORRUPT = torch.tensor([[1, 2, 13, 4, 5, 6], [7, 17, 9, 10, 11, 12]])


def metric(logits):
    return (logits[:, -1, 0] - logits[:, -1, 1]).mean()


@pytest.mark.parametrize("kind", list(MODELS))
def test_relevant_plus_irrelevant_is_the_activation_at_every_layer(kind):
    # float64: the parts can be far larger than their sum (random injections), and the identity
    # is exact only up to rounding
    model = _small(**MODELS[kind], dtype=torch.float64)
    run = cdt.clean_run(model, CLEAN)
    torch.testing.assert_close(run.logits, model(CLEAN))
    generator = torch.Generator().manual_seed(0)
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    for start in range(model.cfg.n_layers + 1):
        injections = {
            ("q", 1): torch.randn(3, 2, 6, 16, generator=generator, dtype=torch.float64),
            ("k", n_kv - 1): torch.randn(3, 2, 6, 16, generator=generator, dtype=torch.float64),
            ("v", 0): torch.randn(3, 2, 6, 16, generator=generator, dtype=torch.float64),
            ("mlp", 0): torch.randn(3, 2, 6, 16, generator=generator, dtype=torch.float64),
        }
        if start == model.cfg.n_layers:
            injections = {
                ("logits", 0): torch.randn(3, 2, 6, 16, generator=generator, dtype=torch.float64)
            }
        parts = cdt.decompose(model, run, start, injections)
        for i, (beta, gamma) in enumerate(zip(parts.resid_beta, parts.resid_gamma, strict=True)):
            torch.testing.assert_close(
                beta + gamma, run.resid[start + i].repeat(3, 1, 1), atol=1e-9, rtol=1e-9
            )
            if start < model.cfg.n_layers and i > 0:
                assert float(beta.abs().max()) > 1e-3  # the relevant part is not empty
        torch.testing.assert_close(
            parts.logits_beta + parts.logits_gamma, run.logits.repeat(3, 1, 1), atol=1e-9,
            rtol=1e-9,
        )  # fmt: skip


def test_no_relevant_input_gives_no_relevant_part():
    model = _small(**MODELS["llama-like"])
    run = cdt.clean_run(model, CLEAN)
    parts = cdt.decompose(model, run, 0, {("q", 0): torch.zeros(1, 2, 6, 16)})
    assert float(parts.logits_beta.abs().max()) < 1e-5


@pytest.mark.parametrize("ablation", ["corrupt", "zero"])
def test_without_normalization_cdt_is_real_edge_patching(ablation):
    # with the irrelevant part first and no norm scale to freeze, the irrelevant part is the
    # run with the edge ablated: CD-T's score is the exact one, for every edge
    model = _small(**MODELS["no norms"])
    corrupt = CORRUPT if ablation == "corrupt" else None
    ours = mk.edge_attribution(model, CLEAN, corrupt, metric, method="cd-t", ablation=ablation,
                               propagation="edge", progress=False)  # fmt: skip
    exact = mk.edge_attribution(model, CLEAN, corrupt, metric, method="exact", ablation=ablation,
                                progress=False)  # fmt: skip
    valid = ours.layout.valid
    assert float(exact.scores[valid].abs().max()) > 1e-2
    torch.testing.assert_close(ours.scores[valid], exact.scores[valid], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("propagation", ["source", "edge"])
def test_on_a_linear_model_edges_into_the_logits_are_direct_attribution(propagation):
    # no norms, no MLP: an edge into the logits carries delta_u W_U and nothing else
    model = _small(normalization_type=None, attn_only=True, n_layers=1)
    graph = mk.edge_attribution(model, CLEAN, None, metric, method="cd-t", ablation="zero",
                                propagation=propagation, progress=False)  # fmt: skip
    with torch.no_grad():
        _, cache = model.run_with_cache(CLEAN)
    direction = model.W_U[:, 0] - model.W_U[:, 1]
    head_out = torch.einsum("bphd,hdm->bphm", cache["blocks.0.attn.hook_z"],
                            model.blocks[0].attn.W_O)  # fmt: skip
    for head in range(model.cfg.n_heads):
        expected = -float((head_out[:, -1, head] @ direction).mean().detach())  # zeroed: gone
        score = graph.scores[graph.layout.edge_index(f"L0H{head}->logits")]
        assert float(score) == pytest.approx(expected, abs=1e-4)


def _last_receivers(layout, n_layers):
    """Receivers after which nothing nonlinear runs in an attention-only model."""
    return torch.tensor([r.kind == "logits" or r.layer == n_layers - 1
                         for r in layout.receivers])  # fmt: skip


def test_one_pass_per_source_equals_one_pass_per_edge_on_the_toy(toy):
    # the source path weighs the receiver's relevant output by the metric's gradient (norm
    # scales held), the edge path carries it through the rest: the same wherever only the
    # frozen final norm and the unembedding follow (edges into layer 1 and the logits)
    clean, corrupt = CLEAN % toy.cfg.d_vocab, CORRUPT % toy.cfg.d_vocab
    fast = mk.edge_attribution(toy, clean, corrupt, metric, method="cd-t", progress=False)
    slow = mk.edge_attribution(toy, clean, corrupt, metric, method="cd-t",
                               propagation="edge", progress=False)  # fmt: skip
    assert fast.method == "cd-t" and slow.method == "cd-t (per edge)"
    last = _last_receivers(fast.layout, 2)
    assert float(slow.scores[:, last].abs().max()) > 1e-2
    torch.testing.assert_close(fast.scores[:, last], slow.scores[:, last], atol=1e-5, rtol=1e-4)
    # into layer 0 the later attention is linearized: close in rank, not equal
    from scipy.stats import spearmanr

    valid = fast.layout.valid & ~last
    assert spearmanr(fast.scores[valid], slow.scores[valid]).statistic > 0.95


def test_one_pass_per_source_equals_one_pass_per_edge_with_rotary_and_gqa():
    # one attention-only layer with RMSNorm, rotary and grouped keys/values: every receiver is
    # followed by the final norm and the unembedding only, so every edge agrees
    model = _small(**{**MODELS["llama-like"], "attn_only": True, "n_layers": 1})
    fast = mk.edge_attribution(model, CLEAN, CORRUPT, metric, method="cd-t", progress=False)
    slow = mk.edge_attribution(model, CLEAN, CORRUPT, metric, method="cd-t",
                               propagation="edge", progress=False)  # fmt: skip
    valid = fast.layout.valid
    assert float(slow.scores[valid].abs().max()) > 1e-2
    torch.testing.assert_close(fast.scores[valid], slow.scores[valid], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt-like", "llama-like"])
def test_one_pass_per_source_equals_one_pass_per_edge_into_a_last_mlp(kind):
    # one layer with an MLP (GELU, or SiLU-gated): the MLP's receivers and the logits are
    # followed by the final norm and the unembedding only; prompts one batch at a time too
    model = _small(**{**MODELS[kind], "n_layers": 1})
    diff = mk.LogitDiff(torch.tensor([0, 0]), torch.tensor([1, 1]))  # splits into batches
    fast = mk.edge_attribution(model, CLEAN, CORRUPT, diff, method="cd-t", batch_size=1,
                               progress=False)  # fmt: skip
    slow = mk.edge_attribution(model, CLEAN, CORRUPT, diff, method="cd-t",
                               propagation="edge", progress=False)  # fmt: skip
    last = torch.tensor([r.kind in ("mlp", "logits") for r in fast.layout.receivers])
    assert float(slow.scores[:, last].abs().max()) > 1e-2
    torch.testing.assert_close(fast.scores[:, last], slow.scores[:, last], atol=1e-5, rtol=1e-4)


def test_propagation_is_checked(toy):
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean"):
        mk.edge_attribution(toy, CLEAN % 500, CORRUPT % 500, metric, method="cd-t",
                            propagation="sources", progress=False)  # fmt: skip


def test_graphs_select_prune_and_evaluate_like_eap(toy):
    clean, corrupt = CLEAN % toy.cfg.d_vocab, CORRUPT % toy.cfg.d_vocab
    graph = mk.edge_attribution(toy, clean, corrupt, metric, method="cd-t", progress=False)
    exact = mk.edge_attribution(toy, clean, corrupt, metric, method="exact", progress=False)
    assert graph.method == "cd-t" and graph.n_edges == exact.n_edges
    circuit = graph.top_edges(20).prune()
    assert 0 < circuit.n_edges <= 20
    evaluation = mk.evaluate_circuit(toy, circuit, clean, corrupt, metric)
    assert evaluation.to_dataframe().shape[0] >= 1
    # the registry lists it with its paper
    assert "Contextual Decomposition" in mk.graph.EDGE_METHODS["cd-t"].paper
