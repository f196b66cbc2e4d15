"""Probes against scikit-learn (the same objective, fitted independently), hand-built data with a
known answer, and the activations against run_with_cache indexed by hand."""

from __future__ import annotations

import json

import pytest
import torch

import mechkit as mk
from mechkit.probing import ProbingDataset, collect_activations, control_labels, fit_probe
from mechkit.probing.probes import _fit_ridge, fit_logistic
from tests.conftest import hook_count

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402


def _data(n=300, d=6, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, classes, generator=g, dtype=torch.float64)
    y = (x @ w + 0.8 * torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(-1)
    return x, y


@pytest.mark.parametrize("classes", [2, 3])
def test_logistic_equals_sklearn(classes):
    x, y = _data(classes=classes)
    l2 = 1e-2
    ours = fit_logistic(x, y, classes, l2, steps=500)
    ref = LogisticRegression(C=1 / (2 * l2 * len(y)), tol=1e-10, max_iter=5000).fit(x, y)
    coef = torch.as_tensor(ref.coef_)
    assert torch.allclose(ours["weight"], coef, atol=1e-5)
    assert torch.allclose(ours["bias"], torch.as_tensor(ref.intercept_), atol=1e-5)


def test_ridge_equals_sklearn():
    x, _ = _data()
    y = x @ torch.arange(6.0, dtype=torch.float64) + torch.randn(300, dtype=torch.float64)
    ours = _fit_ridge(x, y, 0.05)
    ref = Ridge(alpha=0.05 * 300).fit(x.numpy(), y.numpy())
    assert torch.allclose(ours["weight"][0], torch.as_tensor(ref.coef_), atol=1e-8)
    assert abs(float(ours["bias"][0]) - ref.intercept_) < 1e-8


def test_held_out_accuracy_matches_sklearn_on_the_same_split():
    x, y = _data(n=400, classes=3, seed=1)
    probe = fit_probe(x, y, l2=1e-3, test_fraction=0.25)
    # the probe's standardisation and weights, refitted by scikit-learn on the training rows
    z = (x - probe.mean) / probe.std
    pred = probe.predict(x)
    ref = LogisticRegression(C=1 / (2 * 1e-3 * 300), tol=1e-10, max_iter=5000)
    agree = (pred == torch.as_tensor(ref.fit(z, y).predict(z))).double().mean()
    assert agree > 0.97
    assert probe.test_score > 0.7 and probe.train_score >= probe.test_score - 0.1


def test_cross_validation_picks_the_best_grid_value():
    x, y = _data(n=120, d=40, seed=2)  # many features, few rows: regularisation matters
    probe = fit_probe(x, y, l2_grid=(1e-6, 1e-1, 10.0), folds=4)
    assert set(probe.cv_scores) == {1e-6, 1e-1, 10.0}
    assert probe.cv_scores[probe.l2] == max(probe.cv_scores.values())


def test_mlp_probe_learns_xor_where_a_linear_one_cannot():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    linear = fit_probe(x, y, l2=1e-4)
    mlp = fit_probe(x, y, kind="mlp", l2=1e-5, steps=300)
    assert linear.test_score < 0.7 < 0.9 < mlp.test_score


def test_control_labels_are_fixed_per_type_and_drawn_from_the_labels():
    types = [f"w{i % 20}" for i in range(200)]
    data = ProbingDataset([str(i) for i in range(200)], [0] * 200, [i % 3 for i in range(200)],
                          types=types)  # fmt: skip
    labels = control_labels(data, seed=3)
    for t in set(types):
        rows = [i for i, u in enumerate(types) if u == t]
        assert len(set(labels[rows].tolist())) == 1
    assert set(labels.tolist()) <= {0, 1, 2} and len(set(labels.tolist())) > 1


def _toy_dataset(n=80):
    # label = whether the token at position 1 is even: readable from its embedding at layer 0
    rows = [(1 + i % 11, 2 + (7 * i) % 13) for i in range(n)]
    return ProbingDataset(rows, [1] * n, [str(r[1] % 2 == 0) for r in rows],
                          types=[str(r[1]) for r in rows])  # fmt: skip


def test_collect_activations_equals_run_with_cache(toy):
    data = ProbingDataset([(1, 2, 3), (4, 5), (1, 2, 3)], [0, -1, "mean"], [0, 1, 0])
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    acts = collect_activations(toy, data, names, batch_size=1)
    for name in names:
        _, c1 = toy.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter=name)
        _, c2 = toy.run_with_cache(torch.tensor([[4, 5]]), names_filter=name)
        assert torch.allclose(acts[name][0], c1[name][0, 0], atol=1e-5)
        assert torch.allclose(acts[name][1], c2[name][0, -1], atol=1e-5)
        assert torch.allclose(acts[name][2], c1[name][0].mean(0), atol=1e-5)
    assert hook_count(toy) == 0


def test_train_probe_on_the_toy_model(toy, tmp_path):
    result = mk.train_probe(toy, _toy_dataset(), layers=[0, 1], l2=1e-2)
    assert result.accuracy.shape == (2,) and float(result.accuracy[0]) > 0.9
    # the control task keys on the same token: it is as learnable, selectivity near zero
    assert abs(float(result.selectivity[0])) < 0.25
    assert result.majority == pytest.approx(0.5, abs=0.1)
    df = result.to_dataframe()
    assert list(df["layer"]) == [0, 1]
    assert result.plot().data
    path = tmp_path / "probe.safetensors"
    result.save(path)
    back = mk.ProbeResult.load(path)
    assert torch.equal(back.accuracy, result.accuracy)
    x = torch.randn(5, 128)
    assert torch.equal(back.probes[0].predict(x), result.probes[0].predict(x))
    vec = result.steering_vector(0)
    probe = result.probe(0)
    expected = probe.params["weight"][0] / probe.std
    assert torch.allclose(vec.vector.double(), expected / expected.norm(), atol=1e-6)
    assert vec.hook_name == "blocks.0.hook_resid_pre"
    assert hook_count(toy) == 0


def test_a_damaged_probe_file_is_refused(toy, tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_text(json.dumps({"not": "safetensors"}))
    with pytest.raises(mk.FileFormatError):
        mk.ProbeResult.load(path)


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"text": "a b", "position": -1, "label": 0.5},
        {"text": "c", "position": 0, "label": 2.0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = ProbingDataset.from_jsonl(path)
    assert data.is_regression and data.labels == (0.5, 2.0) and data.name == "d"
    path.write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(mk.DatasetFormatError, match=r"d.jsonl:1: .*missing \['position'\]"):
        ProbingDataset.from_jsonl(path)


def test_a_type_split_holds_out_whole_types_and_puts_the_control_at_chance(toy):
    data = _toy_dataset(120)
    by_type = mk.train_probe(toy, data, layers=[0], l2=1e-2, split="type", folds=3)
    by_example = mk.train_probe(toy, data, layers=[0], l2=1e-2, folds=3)
    # memorised control labels do not carry over to unseen types; the parity of a token id
    # is not linear in its embedding either, so both fall towards chance on unseen tokens
    assert float(by_example.control_accuracy[0]) > 0.9
    assert float(by_type.control_accuracy[0]) < 0.8
    groups = torch.tensor([int(t) for t in data.word_types])
    x = torch.randn(120, 4)
    probe = fit_probe(x, data.label_ids, l2=1e-2, groups=groups, folds=3)
    assert 0.0 <= probe.test_score <= 1.0
