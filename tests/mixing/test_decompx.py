"""DecompX: the parts of every token and the biases sum to the model's own logit."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from tests.conftest import hook_count
from tests.mixing.models import ARCHITECTURES, tiny_model

TOKENS = torch.tensor([[1, 7, 3, 9, 2, 4], [6, 2, 2, 9, 1, 3]])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_decompx_parts_sum_to_the_logit_difference(arch):
    model = tiny_model(**ARCHITECTURES[arch])
    logits = model(TOKENS)
    mix = mk.context_mixing(model, TOKENS, method="decompx", answer=[7, 4], wrong=2)
    assert mix.logit is not None and mix.logit_rest is not None
    expected = torch.stack([logits[0, :, 7] - logits[0, :, 2], logits[1, :, 4] - logits[1, :, 2]])
    assert torch.allclose(mix.logit.sum(-1) + mix.logit_rest, expected, atol=1e-4)
    assert bool((mix.logit.triu(1) == 0).all())  # no share from later tokens
    rows = mix.maps.float().sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=2e-3)


def test_decompx_equals_alti_logit_on_one_attention_only_layer():
    # one block and no MLP: both give token j at i its direct path f_i(x_j) (+ its embedding
    # when j = i) through the frozen final norm; they part ways only from the second block on,
    # and in where the value bias goes (ALTI: with its token; DecompX: to the biases), so b_V = 0
    model = tiny_model(n_layers=1, attn_only=True, normalization_type="LNPre")
    with torch.no_grad():
        model.blocks[0].attn.b_V.zero_()
    mix = mk.context_mixing(model, TOKENS, method="decompx", answer=3)
    alti = mk.context_mixing(model, TOKENS, method="alti_logit", answer=3)
    assert torch.allclose(mix.logit, alti.logit, atol=1e-5)
    assert float(mix.logit.abs().max()) > 1e-2


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_adjoint_logit_equals_the_propagated_decomposition(arch):
    # two independent computations of the same shares: the packed forward decomposition and
    # the gradient of the frozen model (autograd through the real blocks)
    model = tiny_model(**ARCHITECTURES[arch])
    full = mk.context_mixing(model, TOKENS, method="decompx", answer=[7, 4], wrong=2)
    fast = mk.context_mixing(
        model, TOKENS, method="decompx_logit", answer=[7, 4], wrong=2, positions=[2, 5]
    )
    assert torch.allclose(fast.logit, full.logit[:, [2, 5]], atol=1e-5)
    assert torch.allclose(fast.logit_rest, full.logit_rest[:, [2, 5]], atol=1e-4)
    assert hook_count(model) == 0
