"""The steering sweep's effects and costs equal direct computations."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from tests.conftest import hook_count

POS = ["I love this. It is wonderful", "What a great day, I am so happy"]
NEG = ["I hate this. It is terrible", "What an awful day, I am so sad"]
PROMPTS = ("I think the movie was", "The food at the restaurant was")


@pytest.fixture(scope="module")
def sweep(smollm2):
    cost = mk.corpus_tokens(smollm2, seq_len=24, split="test", max_sequences=2)
    return mk.steering_sweep(
        smollm2,
        lambda layer: mk.mean_difference_vector(smollm2, POS, NEG, layer=layer),
        layers=[4, 8],
        coefficients=[0.0, 4.0],
        effect=mk.LogitDifference(PROMPTS, " good", " bad"),
        cost_tokens=cost,
        sample_prompts=PROMPTS[:1],
        sample_settings=[(8, 4.0)],
        max_new_tokens=5,
        progress=False,
    ), cost


@torch.no_grad()
def test_zero_coefficient_costs_nothing_and_changes_nothing(sweep):
    result, _ = sweep
    df = result.to_dataframe()
    zero = df[df.coefficient == 0.0]
    assert (zero.kl.abs() < 1e-6).all() and (zero.delta_loss.abs() < 1e-5).all()
    assert (zero.effect - result.baseline_effect).abs().max() < 1e-4


@torch.no_grad()
def test_effect_and_cost_equal_a_direct_computation(smollm2, sweep):
    result, cost = sweep
    row = result.to_dataframe().query("layer == 8 and coefficient == 4.0").iloc[0]
    vector = mk.mean_difference_vector(smollm2, POS, NEG, layer=8)
    good, bad = smollm2.to_single_token(" good"), smollm2.to_single_token(" bad")
    hook = ("blocks.8.hook_resid_pre", lambda act, hook: act + 4.0 * vector.vector)
    diffs = []
    for prompt in PROMPTS:
        logits = smollm2.run_with_hooks(smollm2.to_tokens(prompt), fwd_hooks=[hook])[0, -1]
        diffs.append(float(logits[good] - logits[bad]))
    assert abs(row.effect - sum(diffs) / len(diffs)) < 1e-3
    ref = smollm2(cost).log_softmax(-1)[:, :-1]
    steered = smollm2.run_with_hooks(cost, fwd_hooks=[hook]).log_softmax(-1)[:, :-1]
    kl = float((ref.exp() * (ref - steered)).sum(-1).mean())
    assert abs(row.kl - kl) < 1e-4
    assert row.effect > result.baseline_effect  # the positive direction favours " good"
    assert hook_count(smollm2) == 0


def test_samples_table_and_plot(sweep):
    result, _ = sweep
    table = result.samples_table()
    assert list(table.columns) == ["prompt", "unsteered", "L8 x4"]
    fig = result.plot()
    assert len(fig.data) == 2  # one line per layer


def test_measures_refuse_empty_prompt_lists(smollm2):
    with pytest.raises(mk.EmptyDatasetError):
        mk.TokenProbability((), " good")(smollm2, [], 0)
    with pytest.raises(mk.EmptyDatasetError):
        mk.LogitDifference((), " good", " bad")(smollm2, [], 0)
    with pytest.raises(mk.EmptyDatasetError):
        mk.WordShare((), ("good",))(smollm2, [], 0)
