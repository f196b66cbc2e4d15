"""A tiny Llama-shaped model (RMSNorm, rotary, gated SiLU MLP), random weights, no tokenizer:
the shapes of SmolLM2 in a model that runs in milliseconds."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechkit.editing import TokenizedFact


def make_tiny_llama(seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=4, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=40, n_ctx=32,
        act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=8, seed=seed, device="cpu",
        original_architecture="LlamaForCausalLM",
    )  # fmt: skip
    model = HookedTransformer(cfg)
    with torch.no_grad():  # larger weights than the default init, so predictions are peaked
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny() -> HookedTransformer:
    return make_tiny_llama()


@pytest.fixture(scope="module")
def tiny_facts() -> list[TokenizedFact]:
    """Three facts of the tiny model: subjects of 1-3 tokens; objects its own top-1 tokens."""
    rows = [
        ([1, 5, 6, 7, 8, 9, 10], (2, 5)),
        ([1, 11, 12, 13, 14], (1, 2)),
        ([1, 3, 4, 15], (1, 3)),
    ]
    model = make_tiny_llama()
    facts = []
    for ids, span in rows:
        tokens = torch.tensor(ids)
        with torch.no_grad():
            top = model(tokens[None])[0, -1].topk(2).indices.tolist()
        facts.append(TokenizedFact(tokens, span, target=top[0], new_target=top[1]))
    return facts
