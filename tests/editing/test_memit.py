"""MEMIT against ROME (one fact, one layer), its least-squares solution, and bitwise reverts."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.editing import RomeConfig, memit, rome
from mechkit.editing.memit import memit_update
from mechkit.editing.rome import context_prefixes, mean_at_subject, prefixed

CONFIG = RomeConfig(steps=5, n_prefixes=2, prefix_len=3)


def test_one_fact_in_one_layer_equals_rome(tiny, tiny_facts):
    fact = tiny_facts[0]
    C = torch.eye(64) + 0.3 * torch.ones(64, 64) / 64
    r = rome(tiny, fact, layer=2, covariance=C, config=CONFIG).deltas["blocks.2.mlp.W_out"]
    kw = {"layers": [2], "covariance": C, "config": CONFIG, "progress": False}
    exact = memit(tiny, fact, mom2_weight=0.0, **kw).deltas["blocks.2.mlp.W_out"]
    assert torch.allclose(exact.double(), r.double(), rtol=1e-4, atol=1e-6)
    # rho > 0: Sherman-Morrison gives ROME's update times q / (lambda + q) = 1 / (1 + rho)
    m = memit(tiny, fact, mom2_weight=0.5, **kw)
    k = m.keys["L2"][0].double()
    q = float(k @ torch.linalg.solve(C.double(), k))
    assert m.record["lambda"]["L2"] == pytest.approx(0.5 * q, rel=1e-6)
    assert torch.allclose(m.deltas["blocks.2.mlp.W_out"].double(), r.double() / 1.5, atol=1e-6)


def test_two_facts_reach_their_targets_and_lambda_is_scale_free(tiny, tiny_facts):
    facts = tiny_facts[:2]
    targets = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))  # any targets
    kw = {"layers": [2], "config": CONFIG, "targets": targets, "progress": False}
    e = memit(tiny, facts, covariance="identity", mom2_weight=0.0, **kw)
    # rho = 0: each fact's hidden state at the subject, after the edit, is its target z exactly
    prefixes = context_prefixes(tiny, CONFIG.n_prefixes, CONFIG.prefix_len, CONFIG.seed)
    with mk.edit(tiny, e):
        for i, f in enumerate(facts):
            h = mean_at_subject(tiny, prefixed(f, prefixes), "blocks.2.hook_resid_post", 2)
            assert torch.allclose(h, e.values["z"][i], atol=1e-4)
    # rho is relative to the keys' norms under C: scaling C changes nothing; an absolute
    # lambda (MEMIT's) would shrink the update 1000-fold here
    C = torch.eye(64) + 0.3 * torch.ones(64, 64) / 64
    small = memit(tiny, facts, covariance=C, **kw).deltas["blocks.2.mlp.W_out"]
    large = memit(tiny, facts, covariance=1000 * C, **kw).deltas["blocks.2.mlp.W_out"]
    assert torch.allclose(small, large, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(small, e.deltas["blocks.2.mlp.W_out"], atol=1e-4)


def test_two_facts_over_layers_both_move(tiny, tiny_facts):
    # the default rho over three layers: each fact's hidden state at the subject goes most of
    # the way to its target (one layer alone would realise 1 / 1.1 of what is left to it);
    # (that the new object then wins is checked on SmolLM2 in benchmarks/editing_table.py:
    # this random model's targets, from 5 steps, barely move its output)
    facts = tiny_facts[:2]
    e = memit(tiny, facts, layers=[1, 2, 3], covariance="identity", config=CONFIG,
              progress=False)  # fmt: skip
    prefixes = context_prefixes(tiny, CONFIG.n_prefixes, CONFIG.prefix_len, CONFIG.seed)

    @torch.no_grad()
    def state():
        hs = [mean_at_subject(tiny, prefixed(f, prefixes), "blocks.3.hook_resid_post", 3)
              for f in facts]  # fmt: skip
        return torch.stack(hs)

    h0 = state()
    with mk.edit(tiny, e):
        h1 = state()
    z = e.values["z"]
    gap_before, gap_after = (h0 - z).norm(dim=-1), (h1 - z).norm(dim=-1)
    assert (gap_after < 0.1 * gap_before).all(), (gap_before, gap_after)


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
    with pytest.raises(mk.InvalidArgumentError, match="mom2_weight >= 0"):
        memit(tiny, tiny_facts, layers=[2], covariance="identity", mom2_weight=-1.0)


def test_targets_from_rome_edits_skip_the_optimisation(tiny, tiny_facts):
    e = rome(tiny, tiny_facts[1], layer=2, covariance="identity", config=CONFIG)
    W = tiny.blocks[2].mlp.W_out.detach()
    target = e.values["L2"] - W.T @ e.keys["L2"]  # v* - W k*: the optimised change
    kw = {"layers": [1, 2], "covariance": "identity", "config": CONFIG, "progress": False}
    own = memit(tiny, tiny_facts[1], **kw)
    reused = memit(tiny, tiny_facts[1], targets=target[None], **kw)
    for name in own.deltas:
        assert torch.allclose(own.deltas[name], reused.deltas[name], atol=1e-5)
