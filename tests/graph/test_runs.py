"""The graph's runs: receiver gradients without per-head residual copies, and logits at the
answer positions only, each against the plain TransformerLens way of computing them."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
import mechkit.graph.runs as runs
from mechkit.graph.layout import GraphLayout


def tiny_model(normalization: str | None, n_kv_heads: int | None) -> HookedTransformer:
    """A random two-layer model with MLPs, the given norm, and grouped key/value heads."""
    torch.manual_seed(1)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=40, n_ctx=12,
        act_fn="gelu", normalization_type=normalization, n_key_value_heads=n_kv_heads,
        model_name="tiny",
    )  # fmt: skip
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:  # norm weights away from 1, so that they matter
            if hasattr(block.ln1, "w"):
                block.ln1.w.copy_(1 + 0.5 * torch.randn_like(block.ln1.w))
    return model


@pytest.mark.parametrize(
    ("normalization", "n_kv_heads"),
    [("LN", None), ("LNPre", None), ("RMS", 2), ("RMSPre", 2), (None, None)],
)
def test_fused_qkv_gradients_equal_per_head_copies(normalization, n_kv_heads, monkeypatch):
    """q/k/v gradients carried back through W and ln1 by hand equal those TransformerLens
    gives its per-head input copies (use_split_qkv_input), for every norm, with grouped heads."""
    model = tiny_model(normalization, n_kv_heads)
    layout = GraphLayout.from_model(model)
    tokens = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(2))

    def value_of(logits):
        return (logits[:, -1, 3] - logits[:, -2, 5]).pow(2).mean()

    assert runs.fused_qkv(model)
    fused, value, _ = runs.receiver_gradients(model, layout, tokens, value_of)
    monkeypatch.setattr(runs, "fused_qkv", lambda model: False)
    split, split_value, _ = runs.receiver_gradients(model, layout, tokens, value_of)
    assert split.abs().amax((0, 1, 3)).gt(0).all()  # every receiver gets a gradient
    torch.testing.assert_close(fused, split, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(value, split_value)


def test_receiver_gradients_at_answer_positions_equal_full_logits(toy):
    """Unembedding only the positions the metric reads gives the gradients of the full run."""
    layout = GraphLayout.from_model(toy)
    tokens = torch.randint(1, 500, (2, 7), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([3, 6])
    metric = mk.LogitDiff(torch.tensor([5, 9]), torch.tensor([8, 2]), positions)
    full, value, _ = runs.receiver_gradients(toy, layout, tokens, lambda lg: metric(lg))
    at, at_value, _ = runs.receiver_gradients(
        toy, layout, tokens, lambda lg: metric.per_prompt(lg).mean(), positions=positions
    )
    torch.testing.assert_close(at, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(at_value, value)
