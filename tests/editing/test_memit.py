"""MEMIT against ROME (one fact, one layer), its least-squares solution, and bitwise reverts."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.editing import RomeConfig, memit, rome
from mechkit.editing.memit import memit_update

CONFIG = RomeConfig(steps=5, n_prefixes=2, prefix_len=3)


def test_one_fact_in_one_layer_equals_rome(tiny, tiny_facts):
    fact = tiny_facts[0]
    C = torch.eye(64) + 0.3 * torch.ones(64, 64) / 64
    r = rome(tiny, fact, layer=2, covariance=C, config=CONFIG).deltas["blocks.2.mlp.W_out"]
    m = memit(tiny, fact, layers=[2], covariance=C, mom2_weight=1e-3, config=CONFIG,
              progress=False)  # fmt: skip
    k = m.keys["L2"][0].double()
    kck = float(k @ torch.linalg.solve(C.double(), k))
    got = m.deltas["blocks.2.mlp.W_out"].double()
    # Sherman-Morrison: MEMIT's update is ROME's times k'C^-1k / (lambda + k'C^-1k)
    assert torch.allclose(got, r.double() * kck / (1e-3 + kck), rtol=1e-3, atol=1e-6)
    assert torch.allclose(got, r.double(), rtol=1e-3, atol=1e-4)  # lambda small: ROME's


def test_the_update_solves_the_regularised_least_squares(tiny):
    g = torch.Generator().manual_seed(0)
    K = torch.randn(5, 64, generator=g, dtype=torch.float64)
    R = torch.randn(5, 32, generator=g, dtype=torch.float64)
    C = torch.eye(64, dtype=torch.float64) * 2.0
    delta = memit_update(K, R, C, 3.0)
    # the normal equations of min |K D - R|^2 + lambda tr(D' C D), solved as one big system
    big = torch.kron(torch.eye(32, dtype=torch.float64), K.T @ K + 3.0 * C)
    direct = torch.linalg.solve(big, (K.T @ R).T.reshape(-1)).reshape(32, 64).T
    assert torch.allclose(delta, direct, atol=1e-8)


def test_many_facts_over_layers_and_revert(tiny, tiny_facts):
    params = {k: v.clone() for k, v in tiny.state_dict().items()}
    e = memit(tiny, tiny_facts, layers=[1, 2], covariance="identity", config=CONFIG,
              progress=False)  # fmt: skip
    assert sorted(e.deltas) == ["blocks.1.mlp.W_out", "blocks.2.mlp.W_out"]
    assert e.values["z"].shape == (3, tiny.cfg.d_model) and len(e.requests) == 3
    tokens = tiny_facts[0].tokens[None]
    before = tiny(tokens)
    with mk.edit(tiny, e):
        assert not torch.allclose(tiny(tokens), before)
    assert all(torch.equal(v, params[k]) for k, v in tiny.state_dict().items())


def test_bad_input(tiny, tiny_facts):
    with pytest.raises(mk.InvalidArgumentError, match="layer in 0..3"):
        memit(tiny, tiny_facts, layers=[2, 9], covariance="identity", progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="at least one layer"):
        memit(tiny, tiny_facts, layers=[], covariance="identity", progress=False)


def test_targets_from_rome_edits_skip_the_optimisation(tiny, tiny_facts):
    e = rome(tiny, tiny_facts[1], layer=2, covariance="identity", config=CONFIG)
    W = tiny.blocks[2].mlp.W_out.detach()
    target = e.values["L2"] - W.T @ e.keys["L2"]  # v* - W k*: the optimised change
    kw = {"layers": [1, 2], "covariance": "identity", "config": CONFIG, "progress": False}
    own = memit(tiny, tiny_facts[1], **kw)
    reused = memit(tiny, tiny_facts[1], targets=target[None], **kw)
    for name in own.deltas:
        assert torch.allclose(own.deltas[name], reused.deltas[name], atol=1e-5)
