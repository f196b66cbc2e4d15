"""The CounterFact-style evaluation: n-gram entropy by hand, and scores of known facts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mechkit as mk
from mechkit.editing import RomeConfig, builtin_facts, evaluate_edits, rome, tokenize_fact
from mechkit.editing.evaluation import ngram_entropy


def test_ngram_entropy_by_hand():
    # "x y z x y": bigrams xy, yz, zx, xy -> (2, 1, 1)/4; trigrams xyz, yzx, zxy: uniform
    h2 = -(0.5 * math.log2(0.5) + 2 * 0.25 * math.log2(0.25))
    h3 = math.log2(3)
    assert ngram_entropy("x y z x y") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("same same same same") == 0.0


def test_subject_spans_of_the_builtin_facts(smollm2):
    for fact in builtin_facts():
        try:
            tf = tokenize_fact(smollm2, fact)
        except mk.MultiTokenAnswerError:
            continue
        span = smollm2.to_string(tf.tokens[tf.subject[0] : tf.subject[1]])
        assert span.strip() == fact.subject


def test_rome_on_smollm2_flips_the_fact_and_keeps_neighbours(smollm2):
    fact = builtin_facts(["capital"])[0]  # The capital of France is: Paris -> Berlin
    e = rome(
        smollm2,
        fact,
        layer=4,
        covariance="identity",
        config=RomeConfig(steps=10, n_prefixes=1, prefix_len=4),
    )
    ev = evaluate_edits(smollm2, [fact], [e], fluency_tokens=8, progress=False)
    s = ev.summary()
    assert s["before"]["efficacy"] == 0 and s["after"]["efficacy"] == 100
    assert s["after"]["neighbourhood"] >= 60
    assert float(ev.after["new_prob"][0]) > 0.3 > float(ev.before["new_prob"][0])
    assert not torch.isnan(ev.after["fluency"]).any()
    with pytest.raises(mk.MultiTokenAnswerError, match="single token"):
        rome(smollm2, fact.with_new_target(" Buenos Aires"), layer=4, covariance="identity")
    # a neighbour whose own object is two tokens (" Bangkok") is left out, not an error
    extra = dataclasses.replace(
        fact, neighbours=(*fact.neighbours, ("The capital of Thailand is", " Bangkok"))
    )
    nothing = mk.WeightEdit({}, "none")
    [plain, more] = [
        evaluate_edits(smollm2, [f], nothing, fluency_tokens=0, progress=False).after
        for f in (fact, extra)
    ]
    assert torch.equal(plain["neighbourhood"], more["neighbourhood"])
    with pytest.raises(mk.InvalidArgumentError, match="subject"):
        tokenize_fact(smollm2, mk.editing.Fact("Fra", "The capital of {}nce is", " Paris"))
