"""Metrics against direct computations with torch on random logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mechkit as mk


@pytest.fixture
def logits():
    return torch.randn(4, 6, 50, generator=torch.Generator().manual_seed(0))


ANSWER = torch.tensor([1, 2, 3, 4])
WRONG = torch.tensor([5, 6, 7, 8])
POS = torch.tensor([5, 3, 4, 0])


def test_logit_and_prob_diff(logits):
    expected = torch.stack(
        [logits[i, POS[i], ANSWER[i]] - logits[i, POS[i], WRONG[i]] for i in range(4)]
    )
    assert torch.allclose(mk.metrics.logit_diff(logits, ANSWER, WRONG, POS), expected)
    probs = logits.softmax(-1)
    expected_p = torch.stack(
        [probs[i, POS[i], ANSWER[i]] - probs[i, POS[i], WRONG[i]] for i in range(4)]
    )
    assert torch.allclose(mk.metrics.prob_diff(logits, ANSWER, WRONG, POS), expected_p)


def test_default_position_is_the_last(logits):
    assert torch.allclose(
        mk.metrics.logit_diff(logits, ANSWER, WRONG),
        logits[:, -1, ANSWER].diagonal() - logits[:, -1, WRONG].diagonal(),
    )


def test_cross_entropy(logits):
    at = logits[torch.arange(4), POS]
    assert torch.allclose(
        mk.metrics.cross_entropy(logits, ANSWER, POS), F.cross_entropy(at, ANSWER, reduction="none")
    )


def test_kl(logits):
    ref = torch.randn(4, 50)
    at = logits[torch.arange(4), POS]
    expected = F.kl_div(
        at.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    assert torch.allclose(mk.metrics.kl_divergence(logits, ref, POS), expected, atol=1e-6)
    assert torch.allclose(mk.metrics.kl_divergence(at, at), torch.zeros(4), atol=1e-6)


def test_metric_objects_batch_and_select(logits):
    metric = mk.LogitDiff(ANSWER, WRONG, POS)
    per = metric.per_prompt(logits)
    assert torch.allclose(metric(logits), per.mean())
    sub = metric.select(slice(1, 3))
    assert torch.allclose(sub.per_prompt(logits[1:3]), per[1:3])
    assert torch.allclose(
        mk.CrossEntropy(ANSWER, POS).select(torch.tensor([0, 3])).per_prompt(logits[[0, 3]]),
        mk.metrics.cross_entropy(logits, ANSWER, POS)[[0, 3]],
    )


def test_normalized_is_one_at_clean_and_zero_at_corrupt(logits):
    clean, corrupt = logits, torch.randn_like(logits)
    norm = mk.Normalized.from_runs(mk.LogitDiff(ANSWER, WRONG, POS), clean, corrupt)
    assert torch.allclose(norm(clean), torch.tensor(1.0))
    assert torch.allclose(norm(corrupt), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(norm.per_prompt(clean), torch.ones(4))
    half = norm.select(slice(0, 2))
    assert torch.allclose(half.per_prompt(corrupt[:2]), torch.zeros(2), atol=1e-6)


def test_normalize_refuses_equal_clean_and_corrupt():
    with pytest.raises(ValueError, match="differ"):
        mk.metrics.normalize(torch.tensor(1.0), 2.0, 2.0)


def test_shape_errors(logits):
    with pytest.raises(mk.ShapeError, match="one answer position per prompt"):
        mk.metrics.logit_diff(logits, ANSWER, WRONG, torch.tensor([1, 2]))
    with pytest.raises(mk.ShapeError, match="one token id per prompt"):
        mk.metrics.logit_diff(logits, ANSWER[:2], WRONG, POS)
