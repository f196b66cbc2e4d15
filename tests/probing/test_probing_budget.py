"""``memory_budget`` on the family's batched passes: a budget that forces one prompt per forward
pass gives the results of one pass over everything, and a malformed budget is refused before
any work."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.probing import (
    ProbingDataset,
    collect_activations,
    interchange,
    lm_loss,
    prompts_per_forward,
    site_activations,
)
from tests.conftest import hook_count

ONE = 1  # one byte: one prompt per pass


@pytest.fixture(scope="module")
def data():
    rows = [(1 + i % 13, 2 + (5 * i) % 11, 3 + i % 4)[: 2 + i % 2] for i in range(40)]
    return ProbingDataset(rows, [-1] * 40, [int(r[1] % 2 == 0) for r in rows])


def test_budget_sets_the_prompts_per_pass(toy):
    rows = [[1] * 20] * 3
    assert prompts_per_forward(toy, rows, None, ONE) == 1
    assert prompts_per_forward(toy, rows, 2, ONE) == 2  # batch_size wins
    assert prompts_per_forward(toy, rows, None, "1GB") > prompts_per_forward(toy, rows, None,
                                                                             "1MB")  # fmt: skip


def test_split_passes_give_the_same_results(toy, data):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    whole = collect_activations(toy, data, hooks, batch_size=None, memory_budget="1GB")
    split = collect_activations(toy, data, hooks, memory_budget=ONE)
    for h in hooks:
        assert torch.allclose(whole[h], split[h], atol=1e-5)
    a = mk.train_probe(toy, data, layers=[1], l2=1e-2, memory_budget=ONE)
    b = mk.train_probe(toy, data, layers=[1], l2=1e-2, memory_budget="1GB")
    assert torch.allclose(a.accuracy, b.accuracy) and torch.allclose(
        a.control_accuracy, b.control_accuracy
    )
    texts = list(dict.fromkeys(data.texts))
    assert lm_loss(toy, texts, memory_budget=ONE) == pytest.approx(lm_loss(toy, texts), abs=1e-5)
    e1 = mk.fit_leace(toy, data, layer=1, memory_budget=ONE)
    e2 = mk.fit_leace(toy, data, layer=1)
    assert torch.allclose(e1.matrix, e2.matrix, atol=1e-4)  # 40 rows in d=128: ill-conditioned
    base, source = [list(r) for r in texts[:6]], [list(r) for r in texts[6:12]]
    hook = "blocks.1.hook_resid_pre"
    basis = torch.eye(128)[:5]
    assert torch.allclose(
        interchange(toy, base, source, basis, hook_name=hook, memory_budget=ONE),
        interchange(toy, base, source, basis, hook_name=hook),
        atol=1e-4,
    )
    assert torch.allclose(site_activations(toy, base, hook_name=hook, memory_budget=ONE),
                          site_activations(toy, base, hook_name=hook), atol=1e-5)  # fmt: skip
    assert hook_count(toy) == 0


def test_das_evaluates_in_budgeted_passes(toy):
    base, source = [[i, 7, 9] for i in range(1, 13)], [[i, 7, 9] for i in range(21, 33)]
    labels = toy(torch.tensor(source)).argmax(-1)[:, -1].tolist()
    kw = {"hook_name": "blocks.1.hook_resid_post", "k": 4, "steps": 2}
    a = mk.das(toy, base, source, labels, memory_budget=ONE, **kw)
    b = mk.das(toy, base, source, labels, **kw)
    assert torch.allclose(a.rotation, b.rotation, atol=1e-5)
    assert (a.iia_train, a.iia_test, a.iia_full) == (b.iia_train, b.iia_test, b.iia_full)
    assert a.illusion.verdict == b.illusion.verdict


@pytest.mark.parametrize("call", ["train_probe", "lm_loss", "das"])
def test_a_malformed_budget_is_refused(toy, data, call):
    calls = {
        "train_probe": lambda: mk.train_probe(toy, data, layers=[0], memory_budget="2 parsecs"),
        "lm_loss": lambda: lm_loss(toy, [[1, 2, 3]], memory_budget=-5),
        "das": lambda: mk.das(toy, [[1, 2]] * 4, [[3, 4]] * 4, [5] * 4, steps=1,
                              hook_name="blocks.0.hook_resid_post", memory_budget="lots"),
    }  # fmt: skip
    with pytest.raises(mk.InvalidArgumentError, match="memory budget"):
        calls[call]()
