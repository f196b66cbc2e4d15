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
    cost = mk.corpus.corpus_tokens(smollm2, seq_len=24, split="test", max_sequences=2)
    return mk.steering_sweep(
        smollm2,
        lambda layer: mk.steering.mean_difference_vector(smollm2, POS, NEG, layer=layer),
        layers=[4, 8],
        coefficients=[0.0, 4.0],
        effect=mk.steering.LogitDiffMeasure(PROMPTS, " good", " bad"),
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
    vector = mk.steering.mean_difference_vector(smollm2, POS, NEG, layer=8)
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
        mk.steering.TokenProbability((), " good")(smollm2, [], 0)
    with pytest.raises(mk.EmptyDatasetError):
        mk.steering.LogitDiffMeasure((), " good", " bad")(smollm2, [], 0)
    with pytest.raises(mk.EmptyDatasetError):
        mk.steering.WordShare((), ("good",))(smollm2, [], 0)


# ----------------------------------------------------------------------------------------------
# Issue 15: one logit-difference metric, .top by the rank rule
# ----------------------------------------------------------------------------------------------


def test_logit_difference_is_a_deprecated_alias_of_the_logit_diff_measure(smollm2):
    with pytest.warns(DeprecationWarning, match="LogitDiffMeasure"):
        old = mk.steering.LogitDifference(PROMPTS, " good", " bad")
    new = mk.steering.LogitDiffMeasure(PROMPTS, " good", " bad")
    assert isinstance(old, mk.steering.LogitDiffMeasure)
    assert old(smollm2, [], 0) == new(smollm2, [], 0)


@torch.no_grad()
def test_logit_diff_measure_is_mk_logit_diff_at_each_prompts_last_token(smollm2):
    measure = mk.steering.LogitDiffMeasure(PROMPTS, " good", " bad")
    assert isinstance(measure.metric(smollm2), mk.LogitDiff)
    good, bad = smollm2.to_single_token(" good"), smollm2.to_single_token(" bad")
    direct = [
        float(
            smollm2(smollm2.to_tokens(p))[0, -1, good] - smollm2(smollm2.to_tokens(p))[0, -1, bad]
        )
        for p in PROMPTS
    ]
    assert abs(measure(smollm2, [], 0) - sum(direct) / len(direct)) < 1e-3
    # any metric of the next-token logits: the same number through MetricMeasure
    metric = mk.LogitDiff(torch.tensor([good, good]), torch.tensor([bad, bad]))
    by_metric = mk.steering.MetricMeasure(PROMPTS, metric)(smollm2, [], 0)
    assert abs(by_metric - measure(smollm2, [], 0)) < 1e-5


def test_metric_measure_refuses_a_non_metric():
    with pytest.raises(mk.InvalidTypeError, match="Expected a metric"):
        mk.steering.MetricMeasure(PROMPTS, "logit diff")


def test_sweep_top_ranks_settings_by_the_change_in_effect(sweep):
    from mechkit.core import rank

    result, _ = sweep
    labels = [{"layer": r["layer"], "coefficient": r["coefficient"]} for r in result.rows]
    change = [r["effect"] - result.baseline_effect for r in result.rows]
    assert result.top() == rank(labels, change, 10)
    assert result.top(1)[0][0]["coefficient"] == 4.0  # a zero coefficient changes nothing
