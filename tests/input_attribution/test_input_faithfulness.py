"""Faithfulness measures against naive loops of forward passes and exact identities, and the
comparison of methods."""

from __future__ import annotations

import math

import torch

import mechkit as mk
from mechkit.hook_scope import hook_scope
from mechkit.input_attribution import rank_correlation

PROMPT = [1, 7, 3, 9, 4, 12, 5, 8, 2, 6]
ANSWER = 11


def logprob(model, tokens: list[int]) -> float:
    with torch.no_grad():
        return float(model(torch.tensor([tokens]))[0, -1].log_softmax(-1)[ANSWER])


def test_comprehensiveness_and_sufficiency_equal_naive_erasure(toy):
    r = mk.attribute_inputs(toy, [PROMPT], ANSWER, method="occlusion", progress=False)
    order = sorted(range(len(PROMPT)), key=lambda p: -float(r.scores[0, p]))
    fractions = (0.1, 0.2, 0.5)
    comp = mk.comprehensiveness(toy, r, fractions)
    suff = mk.sufficiency(toy, r, fractions)
    full = logprob(toy, PROMPT)
    for k, f in enumerate(fractions):
        top = set(order[: math.ceil(f * len(PROMPT))])
        without = [t for p, t in enumerate(PROMPT) if p not in top]
        only = [t for p, t in enumerate(PROMPT) if p in top]
        assert math.isclose(comp.per_prompt[0, k], full - logprob(toy, without), abs_tol=1e-5)
        assert math.isclose(suff.per_prompt[0, k], full - logprob(toy, only), abs_tol=1e-5)
    assert math.isclose(comp.aopc, float(comp.per_prompt.mean()), abs_tol=1e-7)


def test_aopc_curves_end_points_and_random_control(toy):
    r = mk.attribute_inputs(toy, [PROMPT, PROMPT[:6]], ANSWER, method="occlusion", progress=False)
    c = mk.aopc_curves(toy, r, n_random=3)
    # nothing deleted is the full prompt; everything inserted is the full prompt too
    assert torch.allclose(c.deletion[:, 0], c.full, atol=1e-5)
    assert torch.allclose(c.insertion[:, -1], c.full, atol=1e-5)
    assert torch.allclose(c.deletion[:, -1], c.empty, atol=1e-5)
    assert torch.allclose(c.random_deletion[:, 0], c.full, atol=1e-5)
    assert math.isclose(c.full[0], logprob(toy, PROMPT), abs_tol=1e-5)
    # the occlusion order beats random orders at deleting what matters
    assert c.aopc_deletion > c.random_aopc_deletion


def test_sensitivity_1_of_occlusion_is_exactly_one(toy):
    # occlusion's score of a token IS the drop when it alone is removed: correlation 1 at n = 1
    r = mk.attribute_inputs(toy, [PROMPT], ANSWER, method="occlusion", progress=False)
    s = mk.sensitivity_n(toy, r, [1, 3], n_samples=12)
    assert math.isclose(s[1], 1.0, abs_tol=1e-6)
    assert -1 <= s[3] <= 1


def test_compare_input_attributions(toy):
    c = mk.compare_input_attributions(
        toy,
        [PROMPT[:7]],
        ANSWER,
        methods=["occlusion", "shapley", "lime", "attention"],
        options={"lime": {"n_samples": 64}},
        n_random=2,
        progress=False,
    )
    assert c.methods == ["occlusion", "shapley", "lime", "attention"]
    assert torch.allclose(c.correlations.diagonal(), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(c.correlations, c.correlations.T)
    # the table is the measures of each method's own attribution, called one by one (the
    # comparison runs an erased prompt that several of them ask for once)
    for method, r in c.attributions.items():
        curves = mk.aopc_curves(toy, r, n_random=2)
        alone = {
            "comprehensiveness": mk.comprehensiveness(toy, r).aopc,
            "sufficiency": mk.sufficiency(toy, r).aopc,
            "aopc_deletion": curves.aopc_deletion,
            "aopc_insertion": curves.aopc_insertion,
            "random_aopc_deletion": curves.random_aopc_deletion,
            "random_aopc_insertion": curves.random_aopc_insertion,
        }
        for measure, value in alone.items():
            assert math.isclose(c.table[method][measure], value, abs_tol=1e-5), (method, measure)
        assert r.resolved is c.attributions["occlusion"].resolved  # one target, resolved once
    # the random control depends on the prompt, not on the method
    assert len({c.table[m]["random_aopc_deletion"] for m in c.methods}) == 1
    occ = c.attributions["occlusion"]
    assert math.isclose(
        c.correlations[0, 1].item(), rank_correlation(occ, c.attributions["shapley"]), abs_tol=1e-9
    )
    frame = c.to_dataframe()
    assert list(frame.index) == c.methods and "sufficiency" in frame.columns
    assert type(c.plot()).__name__ == "Figure"
    assert c.top(1)[0][0] in c.methods


def test_compare_runs_each_erased_prompt_once(toy):
    rows = []

    def count(act, hook):
        rows.append(act.shape[0])

    kw = dict(methods=["occlusion", "attention"], n_random=2, progress=False)
    with hook_scope(toy, fwd_hooks=[("hook_embed", count)]):
        c = mk.compare_input_attributions(toy, [PROMPT], ANSWER, **kw)
        shared = sum(rows)
        rows.clear()
        for r in c.attributions.values():
            mk.comprehensiveness(toy, r), mk.sufficiency(toy, r), mk.aopc_curves(toy, r, n_random=2)
        alone = sum(rows)
    # each measure on its own runs the same erased prompts again (the full and the empty one,
    # the random orders, the top tokens the methods agree on); the attributions themselves
    # ran in the comparison only
    assert shared < alone


def test_a_resolved_target_is_explained_again_and_checked(toy):
    first = mk.attribute_inputs(toy, [PROMPT], None, method="occlusion", progress=False)
    again = mk.attribute_inputs(toy, [PROMPT], first.resolved, method="saliency", progress=False)
    assert again.resolved is first.resolved and again.options["kind"] == "logprob"
    try:
        mk.attribute_inputs(toy, [PROMPT[:5]], first.resolved, method="saliency", progress=False)
    except mk.InvalidArgumentError as err:
        assert "the prompts the resolved target was made for" in str(err)
    else:
        raise AssertionError("a target resolved for other prompts was accepted")


def test_measures_refuse_word_level_results(toy):
    r = mk.attribute_inputs(toy, [PROMPT], ANSWER, method="occlusion", progress=False)
    try:
        mk.comprehensiveness(toy, r.to_words())
    except mk.InvalidArgumentError as err:
        assert "token-level" in str(err)
    else:
        raise AssertionError("a word-level attribution was measured")
