"""The agreement table's pieces against scipy, captum and a loop of forwards."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.mixing.agreement import erasure, gradient_x_input, spearman

TOKENS = torch.tensor([[1, 7, 3, 9, 2, 4, 8, 5]])


def test_spearman_equals_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 5, (12,), generator=gen).float()
        b = torch.randn(12, generator=gen)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)


def test_gradient_x_input_equals_captum(toy):
    captum = pytest.importorskip("captum.attr")
    pos = toy.pos_embed(TOKENS)

    def forward(embed):
        return (
            toy(embed + pos, start_at_layer=0)[:, -1, 7]
            - toy(embed + pos, start_at_layer=0)[:, -1, 2]
        )

    embed = toy.embed(TOKENS).detach().requires_grad_(True)
    expected = captum.InputXGradient(forward).attribute(embed)[0].norm(dim=-1)
    ours = gradient_x_input(toy, TOKENS, answer=7, wrong=2)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_erasure_equals_a_loop_of_forwards(toy):
    with torch.no_grad():
        base = toy(TOKENS)[0, -1, 7]
    expected = []
    for j in range(TOKENS.shape[1]):

        def zero(embed, hook, j=j):
            embed[:, j] = 0.0
            return embed

        with torch.no_grad():
            logits = toy.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", zero)])
        expected.append(float((base - logits[0, -1, 7]).abs()))
    assert erasure(toy, TOKENS, answer=7).tolist() == pytest.approx(expected, abs=1e-5)


def test_agreement_table_reads_each_methods_last_row(toy):
    agree = mk.mixing_agreement(toy, TOKENS, methods=["rollout", "alti_logit"], answer=7)
    rollout = mk.context_mixing(toy, TOKENS, method="rollout").aggregated[0, -1]
    grad = gradient_x_input(toy, TOKENS, answer=7)
    assert float(agree.values[0, 0, 0]) == pytest.approx(spearman(rollout, grad))
    frame = agree.to_dataframe()
    assert list(frame["method"]) == ["rollout", "alti_logit"]
    assert agree.plot().data[0].name == "gradient_x_input"
