"""LEACE against EleutherAI's concept-erasure and against its closed form written out here with
numpy/scipy; the guarantees the paper proves (zero cross-covariance, idempotence, rank, mean kept,
no linear classifier beats a constant); erasure inside the model against a hook written by hand;
INLP and amnesic probing on the toy model."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import mechkit as mk
from mechkit.probing import ConceptEraser, OracleEraser, ProbingDataset, amnesic_probe, lm_loss
from tests.conftest import hook_count

concept_erasure = pytest.importorskip("concept_erasure")


def _data(n=600, d=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)  # correlated features
    means = 2 * torch.randn(classes, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + means[y] + 3.0
    return x, y


def test_leace_guarantees():
    x, y = _data()
    eraser = ConceptEraser.leace(x, y)
    erased = eraser(x)
    z = torch.nn.functional.one_hot(y).double()
    cross = (erased - erased.mean(0)).T @ (z - z.mean(0)) / (len(y) - 1)
    assert cross.abs().max() < 1e-8  # linear guardedness
    assert torch.allclose(eraser(erased), erased, atol=1e-9)  # idempotent
    assert torch.linalg.matrix_rank(torch.eye(12, dtype=torch.float64) - eraser.matrix) <= 2
    assert eraser.rank == 2
    assert torch.allclose(erased.mean(0), x.mean(0), atol=1e-9)  # the mean is kept
    class_means = torch.stack([erased[y == c].mean(0) for c in range(3)])
    assert (class_means - class_means[0]).abs().max() < 1e-5


def test_no_linear_classifier_beats_a_constant_after_leace():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    x, y = _data(n=800, d=8, classes=2, seed=1)
    before = LogisticRegression(C=np.inf, max_iter=5000).fit(x, y).score(x, y)
    erased = ConceptEraser.leace(x, y)(x)
    clf = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(erased, y)
    majority = float(torch.bincount(y).max()) / len(y)
    assert before > 0.9
    assert abs(clf.score(erased, y) - majority) < 0.05  # sampling error
    constant = log_loss(y, np.full(len(y), float(y.double().mean())))
    assert log_loss(y, clf.predict_proba(erased)) > constant - 1e-9  # no better than a constant


def test_leace_equals_concept_erasure():
    from concept_erasure import LeaceFitter

    x, y = _data(seed=2)
    ours = ConceptEraser.leace(x, y)
    z = torch.nn.functional.one_hot(y).double()
    ref = LeaceFitter.fit(x, z, shrinkage=False, constrain_cov_trace=False).eraser
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert torch.allclose(ours.matrix, torch.eye(12, dtype=torch.float64)
                          - ref.proj_left @ ref.proj_right, atol=1e-5)  # fmt: skip


def test_leace_is_the_closed_form_written_out():
    x, y = _data(seed=3)
    xn, zn = x.numpy(), np.eye(3)[y.numpy()]
    xc, zc = xn - xn.mean(0), zn - zn.mean(0)
    sxx, sxz = xc.T @ xc / (len(xn) - 1), xc.T @ zc / (len(xn) - 1)
    w = np.linalg.inv(scipy.linalg.sqrtm(sxx).real)
    u = np.linalg.svd(w @ sxz)[0][:, :2]  # the one-hot concept has rank 2
    p = np.eye(12) - np.linalg.inv(w) @ u @ u.T @ w
    expected = xn.mean(0) + (xn - xn.mean(0)) @ p.T
    assert np.allclose(ConceptEraser.leace(x, y)(x).numpy(), expected, atol=1e-7)


def test_oracle_equals_concept_erasure_and_edits_less_than_leace():
    from concept_erasure import OracleEraser as Reference

    x, y = _data(seed=4)
    z = torch.nn.functional.one_hot(y).double()
    oracle = OracleEraser.fit(x, y)
    ref = Reference.fit(x, z)
    assert torch.allclose(oracle(x, y), ref(x, z), atol=1e-5)
    leace_cost = (ConceptEraser.leace(x, y)(x) - x).pow(2).sum(-1).mean()
    oracle_cost = (oracle(x, y) - x).pow(2).sum(-1).mean()
    assert oracle_cost <= leace_cost + 1e-9


def test_inlp_removes_what_a_probe_reads_with_an_orthogonal_projection():
    x, y = _data(n=600, d=10, classes=2, seed=5)
    eraser = ConceptEraser.inlp(x, y, n_iterations=8)
    p = eraser.matrix
    assert torch.allclose(p @ p, p, atol=1e-8) and torch.allclose(p, p.T, atol=1e-8)
    acc = mk.probing.fit_probe(eraser(x), y, l2=1e-4).test_score
    majority = float(torch.bincount(y).max()) / len(y)
    assert 1 <= eraser.rank <= 8 and acc < majority + 0.1


def test_whitened_random_eraser_is_leace_with_random_directions():
    """In the whitened space (Sigma^(-1/2) by scipy), LEACE and the whitened random eraser are
    both orthogonal projections removing ``rank`` unit-variance directions."""
    from scipy.linalg import fractional_matrix_power

    g = torch.Generator().manual_seed(7)
    x = (
        torch.randn(800, 6, generator=g, dtype=torch.float64)
        @ torch.randn(6, 6, generator=g).double()
    )
    x[:, 0] = 300 * x[:, 0] + 5000  # a huge coordinate
    y = torch.arange(800) % 3
    sigma = torch.cov(x.T)
    w = torch.tensor(fractional_matrix_power(sigma.numpy(), -0.5).real)
    for eraser in (ConceptEraser.leace(x, y),
                   ConceptEraser.random(6, 2, like=x, seed=3)):  # fmt: skip
        assert eraser.rank == 2
        p = w @ eraser.matrix @ torch.linalg.inv(w)  # the edit in whitened coordinates
        assert torch.allclose(p, p.T, atol=1e-6) and torch.allclose(p @ p, p, atol=1e-6)
        white = (eraser(x) - eraser(x).mean(0)) @ w
        assert torch.linalg.eigvalsh(torch.cov(white.T)).round(decimals=6).tolist() == [
            0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # fmt: skip
        assert torch.allclose(eraser(x).mean(0), x.mean(0), atol=1e-6)
    other = ConceptEraser.random(6, 2, like=x, seed=4)
    assert not torch.allclose(other.matrix, ConceptEraser.random(6, 2, like=x, seed=3).matrix)


def test_erase_in_the_model_equals_a_hand_written_hook(toy):
    x = torch.randn(300, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eraser = ConceptEraser.leace(x, (x[:, :3].sum(1) > 0).long()).at("blocks.1.hook_resid_pre")
    tokens = torch.tensor([[1, 5, 9, 2], [3, 3, 7, 8]])
    with mk.erase(toy, eraser, positions=[1, 2]):
        ours = toy(tokens)

    edit = (eraser.proj_left @ eraser.proj_right).T  # (d, d)

    def by_hand(act, hook):
        out = act.clone()
        picked = act[:, 1:3].double()
        out[:, 1:3] = (picked - (picked - eraser.bias) @ edit).float()
        return out

    expected = toy.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", by_hand)])
    assert torch.allclose(ours, expected, atol=1e-4)
    assert hook_count(toy) == 0
    with pytest.raises(RuntimeError), mk.erase(toy, eraser):
        raise RuntimeError("inside")
    assert hook_count(toy) == 0


def test_lm_loss_ignores_padding(toy):
    a, b = [1, 2, 3, 4, 5], [6, 7]
    both = lm_loss(toy, [a, b], batch_size=None)
    with torch.no_grad():
        la = float(toy(torch.tensor([a]), return_type="loss")) * 4
        lb = float(toy(torch.tensor([b]), return_type="loss")) * 1
    assert both == pytest.approx((la + lb) / 5, abs=1e-5)


def test_amnesic_probe_on_the_toy_model(toy, tmp_path):
    rows = [(1 + i % 13, 2 + (5 * i) % 11, 3) for i in range(60)]
    data = ProbingDataset(rows, [1] * 60, [int(r[1] % 2 == 0) for r in rows])
    eraser = mk.fit_leace(toy, data, layer=1)
    result = amnesic_probe(toy, data, eraser, n_random=2, metric=lambda m: lm_loss(m, rows[:5]))
    assert result.loss_clean == pytest.approx(lm_loss(toy, list(dict.fromkeys(rows))), abs=1e-6)
    assert result.loss_erased != result.loss_clean
    assert result.metric_random.shape == (2,) and result.loss_random.shape == (2,)
    assert result.probe_accuracy_erased < result.probe_accuracy
    assert len(result.to_dataframe()) == 4 and result.plot().data
    # the whitened control: LEACE's form with random whitened directions, fitted on the data
    whitened = amnesic_probe(toy, data, eraser, n_random=1, control="whitened")
    x = mk.probing.collect_activations(toy, data, [eraser.hook_name])[eraser.hook_name]
    first = ConceptEraser.random(128, 1, like=x.double(), bias=eraser.bias, seed=0)
    with mk.erase(toy, first.at(eraser.hook_name)):
        assert float(whitened.loss_random[0]) == pytest.approx(
            lm_loss(toy, list(dict.fromkeys(rows))), abs=1e-6
        )
    assert result.metadata["control"] == "isotropic"
    assert whitened.loss_random[0] != result.loss_random[0]
    path = tmp_path / "e.safetensors"
    eraser.save(path)
    back = ConceptEraser.load(path)
    assert back.hook_name == eraser.hook_name and torch.equal(back.proj_left, eraser.proj_left)
    assert hook_count(toy) == 0
