"""The identities on the real Llama-type model (RMSNorm, rotary, grouped-query attention, gated
MLP): SmolLM2-135M on an IOI prompt."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.mixing.blocks import attention_parts, read_blocks

IOI = "When Mary and John went to the store, John gave a drink to"


def test_identities_hold_on_smollm2(smollm2):
    model = smollm2
    tokens = model.to_tokens(IOI, prepend_bos=False)
    with torch.no_grad():
        run = read_blocks(model, tokens)
        for layer in range(model.cfg.n_layers):
            f, bias = attention_parts(model, run, layer)
            assert torch.allclose(f.sum(2) + bias, run.attn_out(layer), atol=1e-4)
        logits = run.logits[0, -1]
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    expected = float(logits[mary] - logits[john])
    for method in ("alti_logit", "decompx", "decompx_logit"):
        mix = mk.context_mixing(
            model, tokens, method=method, answer=" Mary", wrong=" John", positions=-1, layers=[29]
        )
        assert float(mix.logit[0, 0].sum() + mix.logit_rest[0, 0]) == pytest.approx(
            expected, abs=2e-3
        )
        assert int(mix.logit[0, 0, 1:].argmax()) + 1 == 1  # " Mary" carries the most, BOS aside
    alti = mk.context_mixing(model, tokens, method="alti", layers=[29])
    assert torch.allclose(alti.aggregated.sum(-1), torch.ones(1, tokens.shape[1]), atol=1e-3)
