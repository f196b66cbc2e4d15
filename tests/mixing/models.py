"""Small hand-built models for the context-mixing tests."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig


def identity_attention_model(n_layers: int = 2, n_ctx: int = 6) -> HookedTransformer:
    """Attention that puts all its weight on the query's own position: one-hot positional
    embeddings, queries and keys reading only them with a large gain, and no attention output
    (so every layer sees the same positions)."""
    d_model = 2 * n_ctx
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=n_ctx,
        n_heads=2,
        d_vocab=10,
        attn_only=True,
        normalization_type=None,
        act_fn="relu",
        seed=0,
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[:, n_ctx:] = torch.randn(10, n_ctx)
        model.pos_embed.W_pos[:, :n_ctx] = torch.eye(n_ctx)
        for block in model.blocks:
            block.attn.W_Q[:, :n_ctx] = 100 * torch.eye(n_ctx)
            block.attn.W_K[:, :n_ctx] = torch.eye(n_ctx)
    return model


def tiny_model(**overrides) -> HookedTransformer:
    """A random small decoder; ``overrides`` pick its architecture (RMSNorm, rotary, GQA, gated
    MLP, ...). Weights are scaled so attention is far from uniform."""
    settings = dict(
        n_layers=2,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_vocab=50,
        d_mlp=64,
        act_fn="gelu",
        normalization_type="LN",
        seed=1,
    )
    settings.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("W_Q", "W_K", "_W_K")):
                p.mul_(4.0)
            if ".b_" in name or name.startswith("b_") or name.endswith(("_b_K", "_b_V")):
                p.normal_(0, 0.1)
    model.eval()
    return model


ARCHITECTURES = {
    "layernorm-gelu": dict(normalization_type="LN", act_fn="gelu"),
    "llama-like": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        n_key_value_heads=2,
        gated_mlp=True,
        act_fn="silu",
        final_rms=True,
    ),
    "gemma-like": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        n_key_value_heads=1,
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
        final_rms=True,
        use_normalization_before_and_after=True,
    ),
    "attention-only": dict(attn_only=True, normalization_type="LNPre"),
}
"""Small random decoders of each kind the methods must read exactly."""
