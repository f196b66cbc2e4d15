"""The attention decomposition, the attention norm, GlobEnc, ALTI and ALTI-Logit against
TransformerLens's own activations and direct loops."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.mixing.blocks import attention_parts, read_blocks
from tests.conftest import hook_count
from tests.mixing.models import ARCHITECTURES, tiny_model

TOKENS = torch.tensor([[1, 7, 3, 9, 2, 4, 8, 5], [6, 2, 2, 9, 1, 3, 7, 4]])


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model(request):
    return tiny_model(**ARCHITECTURES[request.param])


def _parts_by_loop(model, cache, layer):
    """``T_i(x_j)`` with a loop over heads, from TransformerLens's cache (float64)."""
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()  # (batch, head, q, k)
    v = cache[f"blocks.{layer}.attn.hook_v"].double()  # (batch, key, kv_head, d_head)
    attn = model.blocks[layer].attn
    w_o = attn.W_O.double()
    n_heads = model.cfg.n_heads
    f = 0
    for h in range(n_heads):
        kv = h // (n_heads // v.shape[2])
        f = f + pattern[:, h, :, :, None] * (v[:, None, :, kv] @ w_o[h])[:, :, :, :]
    if model.cfg.use_normalization_before_and_after:
        post = model.blocks[layer].ln1_post
        f = f / cache[f"blocks.{layer}.ln1_post.hook_scale"].double()[:, :, None] * post.w.double()
    return f  # (batch, query, key, d_model)


def test_the_parts_rebuild_the_attention_output(model):
    run = read_blocks(model, TOKENS)
    for layer in range(model.cfg.n_layers):
        f, bias = attention_parts(model, run, layer)
        assert torch.allclose(f.sum(2) + bias, run.attn_out(layer), atol=1e-5)
    _, cache = model.run_with_cache(TOKENS)
    for layer in range(model.cfg.n_layers):
        f, _ = attention_parts(model, run, layer)
        assert torch.allclose(f.double(), _parts_by_loop(model, cache, layer), atol=1e-5)
    assert hook_count(model) == 0


def test_attention_norm_equals_a_direct_computation(model):
    _, cache = model.run_with_cache(TOKENS)
    mix = mk.context_mixing(model, TOKENS, method="attention_norm", layers=[0, 1])
    for layer in range(2):
        t = _parts_by_loop(model, cache, layer)
        x = cache[f"blocks.{layer}.hook_resid_pre"].double()
        idx = torch.arange(TOKENS.shape[1])
        t[:, idx, idx] += x
        if model.cfg.normalization_type in ("LN", "LNPre"):
            t = t - t.mean(-1, keepdim=True)
        if model.cfg.attn_only:
            y = x + cache[f"blocks.{layer}.hook_attn_out"].double()
            y = y - y.mean(-1, keepdim=True)
            scale = (y.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        else:
            scale = cache[f"blocks.{layer}.ln2.hook_scale"].double()  # TransformerLens's own
        w = getattr(model.blocks[layer].ln2, "w", None) if not model.cfg.attn_only else None
        if w is not None:
            t = t * w.double()
        expected = t.norm(dim=-1) / scale
        for b in range(TOKENS.shape[0]):
            assert torch.allclose(
                mix.maps[layer, b].float(), expected[b].float(), rtol=2e-3, atol=1e-3
            )


def test_globenc_rolls_out_the_normalised_norms(model):
    norms = mk.context_mixing(model, TOKENS, method="attention_norm", layers=[0, 1]).maps
    glob = mk.context_mixing(model, TOKENS, method="globenc")
    step = [m / m.sum(-1, keepdim=True) for m in norms.double()]
    assert torch.allclose(glob.aggregated.double(), step[1] @ step[0], atol=1e-5)


def test_alti_rows_are_non_negative_and_sum_to_one(model):
    mix = mk.context_mixing(model, TOKENS, method="alti", layers=[0, 1])
    for values in (mix.maps.float(), mix.aggregated[None]):
        assert bool((values >= 0).all())
        assert torch.allclose(values.sum(-1), torch.ones_like(values.sum(-1)), atol=2e-3)
        assert bool((values.triu(1) == 0).all())  # nothing from later tokens


def test_alti_on_one_layer_equals_a_hand_computation():
    model = tiny_model(
        n_layers=1,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        n_key_value_heads=2,
        gated_mlp=True,
        act_fn="silu",
    )
    tokens = TOKENS[:1, :6]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    t = _parts_by_loop(model, cache, 0)[0]  # (query, key, d_model)
    x = cache["blocks.0.hook_resid_pre"][0].double()
    y = cache["blocks.0.hook_resid_mid"][0].double()
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for i in range(6):
        for j in range(i + 1):
            tij = t[i, j] + (x[i] if i == j else 0)
            expected[i, j] = max(0.0, float(y[i].abs().sum() - (y[i] - tij).abs().sum()))
        expected[i] /= expected[i].sum()
    mix = mk.context_mixing(model, tokens, method="alti")
    assert torch.allclose(mix.aggregated[0].double(), expected, atol=1e-5)


def test_alti_logit_parts_sum_to_the_logit_difference(model):
    logits = model(TOKENS)
    mix = mk.context_mixing(model, TOKENS, method="alti_logit", answer=[3, 5], wrong=11)
    assert mix.logit is not None and mix.logit_rest is not None
    expected = logits[0, :, 3] - logits[0, :, 11], logits[1, :, 5] - logits[1, :, 11]
    total = mix.logit.sum(-1) + mix.logit_rest
    assert torch.allclose(total, torch.stack(expected), atol=1e-4)
    embedding = mix.logit - mix.maps.float().sum(0)  # only the embeddings are left: diagonal
    assert torch.allclose(embedding.tril(-1), torch.zeros_like(embedding), atol=1e-2)


def test_alti_logit_defaults_to_the_top_prediction(toy):
    tokens = TOKENS[:1]
    top = int(toy(tokens)[0, -1].argmax())
    default = mk.context_mixing(toy, tokens, method="alti_logit")
    chosen = mk.context_mixing(toy, tokens, method="alti_logit", answer=top)
    assert torch.equal(default.logit, chosen.logit)


def test_alti_in_causal_chunks_equals_the_full_square(monkeypatch):
    # chunks of queries read only the keys up to their last query: the same contributions as
    # one chunk over every key, on a prompt several chunks long
    import mechkit.mixing.alti as alti_module

    model = tiny_model(n_ctx=40, **ARCHITECTURES["llama-like"])
    run = read_blocks(
        model, torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    )
    chunked = alti_module.alti_contributions(model, run, 1)
    monkeypatch.setattr(alti_module, "CHUNK", 1000)
    full = alti_module.alti_contributions(model, run, 1)
    assert torch.allclose(chunked, full, atol=1e-6)
    assert float(chunked[:, 35:, :30].sum()) > 0  # later chunks do read earlier keys
