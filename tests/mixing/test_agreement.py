"""The agreement table's pieces against scipy and mk.attribute_inputs."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.mixing.agreement import baseline_scores, spearman

TOKENS = torch.tensor([[1, 7, 3, 9, 2, 4, 8, 5]])


def test_spearman_equals_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randint(0, 5, (12,), generator=gen).float()
        b = torch.randn(12, generator=gen)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)


def test_baselines_are_attribute_inputs_results(toy):
    # the agreement's baselines are mk.attribute_inputs' own scores, logit difference target
    agree = mk.mixing_agreement(toy, TOKENS, methods=["rollout"], answer=7, wrong=2)
    row = mk.context_mixing(toy, TOKENS, method="rollout").aggregated[0, -1]
    target = mk.LogitDiff(torch.tensor([7]), torch.tensor([2]))
    for k, method in enumerate(("input_x_gradient", "occlusion")):
        scores = mk.attribute_inputs(
            toy, TOKENS.tolist(), target, method=method, kind="logit", progress=False
        ).scores[0]
        assert float(agree.values[0, k, 0]) == pytest.approx(spearman(row, scores.abs()))
    scores, kept = baseline_scores(toy, TOKENS, answer=7)
    with torch.no_grad():  # occlusion of the last token by hand: delete it, read position -1
        by_hand = toy(TOKENS)[0, -1, 7] - toy(TOKENS[:, :-1])[0, -1, 7]
    assert float(scores[1, -1]) == pytest.approx(float(by_hand.abs()), abs=1e-5)
    assert bool(kept.all())


def test_agreement_table_reads_each_methods_last_row(toy):
    agree = mk.mixing_agreement(toy, TOKENS, methods=["rollout", "alti_logit"], answer=7)
    frame = agree.to_dataframe()
    assert list(frame["method"]) == ["rollout", "alti_logit"]
    assert agree.plot().data[0].name == "input_x_gradient"
    alti = mk.context_mixing(toy, TOKENS, method="alti_logit", answer=7).logit[0, -1]
    grad = baseline_scores(toy, TOKENS, answer=7)[0][0]
    assert float(agree.values[1, 0, 0]) == pytest.approx(spearman(alti.abs(), grad))
