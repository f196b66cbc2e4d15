"""rank: the rule behind every result's .top(n)."""

from __future__ import annotations

import math

import pytest
import torch

import mechkit as mk
from mechkit.core import rank

NAN = float("nan")


def test_rank_by_absolute_value_then_signed():
    labels = ["a", "b", "c", "d"]
    assert rank(labels, [0.5, -2.0, 1.0, 0.0]) == [("b", -2.0), ("c", 1.0), ("a", 0.5), ("d", 0.0)]
    signed = rank(labels, [0.5, -2.0, 1.0, 0.0], absolute=False)
    assert [label for label, _ in signed] == ["c", "a", "d", "b"]


def test_rank_ties_keep_their_order_and_nan_comes_last():
    labels = list("abcdef")
    scores = [1.0, NAN, -1.0, 1.0, NAN, 2.0]
    ranked = rank(labels, scores, None)
    assert [label for label, _ in ranked] == ["f", "a", "c", "d", "b", "e"]
    assert all(math.isnan(s) for _, s in ranked[-2:])
    signed = rank(labels, scores, None, absolute=False)
    assert [label for label, _ in signed] == ["f", "a", "d", "c", "b", "e"]


def test_rank_takes_tensors_and_counts():
    scores = torch.tensor([[3.0, -4.0], [1.0, 0.0]])
    assert rank(["w", "x", "y", "z"], scores, 2) == [("x", -4.0), ("w", 3.0)]
    assert rank(["w", "x", "y", "z"], scores, 0) == []
    assert len(rank(["w", "x", "y", "z"], scores, 10)) == 4


@pytest.mark.parametrize("n", [-1, 1.5, True, "3"])
def test_rank_refuses_a_bad_n(n):
    with pytest.raises(mk.InvalidArgumentError, match="non-negative integer"):
        rank(["a"], [1.0], n)


def test_rank_refuses_unequal_lengths():
    with pytest.raises(mk.InvalidArgumentError, match="one score per label"):
        rank(["a", "b"], [1.0])
