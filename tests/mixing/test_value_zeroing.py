"""Value zeroing against a loop of forward passes with plain TransformerLens hooks."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from tests.conftest import hook_count
from tests.mixing.models import ARCHITECTURES, tiny_model


def _by_loop(model, tokens):
    """One full forward per (layer, token), the values zeroed by a plain hook."""
    n_layers, n = model.cfg.n_layers, tokens.shape[1]
    _, clean = model.run_with_cache(tokens)
    out = torch.zeros(n_layers, n, n)
    for layer in range(n_layers):
        for j in range(n):

            def zero(v, hook, j=j):
                v[:, j] = 0.0
                return v

            seen = {}

            def keep(x, hook, seen=seen):
                seen["h"] = x.detach()

            model.run_with_hooks(
                tokens,
                fwd_hooks=[
                    (f"blocks.{layer}.attn.hook_v", zero),
                    (f"blocks.{layer}.hook_resid_post", keep),
                ],
            )
            h = clean[f"blocks.{layer}.hook_resid_post"][0]
            cos = torch.nn.functional.cosine_similarity(seen["h"][0], h, dim=-1)
            out[layer, :, j] = (1 - cos) * (torch.arange(n) >= j)
    return out


PARALLEL = dict(parallel_attn_mlp=True)


@pytest.mark.parametrize("arch", ["llama-like", "layernorm-gelu", "gemma-like", "parallel"])
def test_value_zeroing_equals_a_loop_of_hooked_forwards(arch):
    model = tiny_model(**(PARALLEL if arch == "parallel" else ARCHITECTURES[arch]))
    tokens = torch.tensor([[1, 7, 3, 9, 2, 4]])
    mix = mk.context_mixing(model, tokens, method="value_zeroing", batch_size=4, layers=[0, 1])
    expected = _by_loop(model, tokens)
    assert torch.allclose(mix.maps[:, 0], expected, atol=1e-5)
    assert float(expected.max()) > 1e-3  # zeroing does move the outputs
    assert hook_count(model) == 0


def test_value_zeroing_of_a_prompt_in_a_batch_is_as_alone(toy):
    both = torch.tensor([[1, 7, 3, 9, 2], [4, 8, 5, 6, 1]])
    one = mk.context_mixing(toy, both[1:, :3], method="value_zeroing", layers=[1])
    both = mk.context_mixing(toy, both, method="value_zeroing", layers=[1], batch_size=2)
    assert torch.allclose(both.maps[0, 1, :3, :3], one.maps[0, 0], atol=1e-5)


def test_value_zeroing_refuses_values_that_do_not_make_the_output():
    # a hook that edits the attention after the weights and values were read: the batched
    # reading would no longer be the model's computation, so it is refused
    model = tiny_model(n_layers=1, attn_only=True)
    model.add_hook("blocks.0.attn.hook_z", lambda z, hook: 2 * z)
    try:
        with pytest.raises(mk.UnsupportedModelError, match="it is not"):
            mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="value_zeroing")
    finally:
        model.reset_hooks()
