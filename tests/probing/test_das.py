"""DAS against a hand-built model whose variable lives in a known direction (with a dormant
direction the output reads), against activation patching written by hand (the whole space), the
unchanged run (k = 0), and pyvene's rotated-space intervention on the same rotation; the
illusion check against a direction built to be Makelov et al.'s illusion."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
from mechkit.probing import DasResult, illusion_check, interchange, subspace_iia
from tests.conftest import hook_count

HOOK = "blocks.0.hook_resid_pre"
A, B = 20, 21  # the two answers


def planted_model(dormant_weight: float, echo: float) -> HookedTransformer:
    """One token in, the variable (+-1) stored along e0; e1 is dormant (zero on every input)
    but the unembedding reads it with ``dormant_weight``; e2 holds ``echo`` x the variable plus
    noise and nothing reads it; e3..e7 hold noise. Attention writes nothing."""
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=4, d_head=4, n_heads=1, d_vocab=24, attn_only=True,
        normalization_type=None, act_fn="relu", device="cpu", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        value = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(20)])
        model.W_E[:20, 0] = value
        model.W_E[:20, 2] = echo * (value + 0.5 * torch.randn(20, generator=g))
        model.W_E[:20, 3:] = 3 * torch.randn(20, 5, generator=g)
        model.W_U[0, A], model.W_U[0, B] = 2.0, -2.0
        model.W_U[1, A] = 4 * dormant_weight  # W_U reads e0 and e1 (rank 2)
    return model


def pairs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 20, (n, 1), generator=g).tolist()
    source = torch.randint(0, 20, (n, 1), generator=g).tolist()
    labels = [A if s[0] % 2 == 0 else B for s in source]  # the source's value, interchanged
    return base, source, labels, torch.tensor([[A, B]] * n)


def test_das_recovers_the_planted_direction():
    model = planted_model(dormant_weight=0.1, echo=0.0)
    base, source, labels, choices = pairs(200)
    result = mk.das(model, base, source, labels, hook_name=HOOK, k=1, choices=choices,
                    steps=150, lr=0.05, batch_size=64)  # fmt: skip
    cosine = abs(float(result.basis[0] @ torch.eye(8)[0]))
    assert cosine > 0.99
    assert result.iia_test == 1.0 and result.iia_none < 0.7
    assert result.illusion is not None and result.illusion.verdict == "ok"
    assert torch.allclose(result.rotation @ result.rotation.T, torch.eye(8), atol=1e-5)
    assert hook_count(model) == 0


def test_das_on_a_task_defined_in_a_few_lines():
    """The user's high-level model (the answer is A for an even token, B for an odd one; the
    variable is the token's parity) through interchange_pairs, straight into das."""
    model = planted_model(dormant_weight=0.1, echo=0.0)
    pairs = mk.probing.interchange_pairs(
        range(20), lambda t: [t], lambda t, even: A if even else B, lambda t: t % 2 == 0,
        n=200, seed=5,
    )  # fmt: skip
    assert all(
        (s[0] % 2 == 0) == (label == A) for s, label in zip(pairs.source, pairs.labels, strict=True)
    )
    pairs.positions["token"] = 0  # the one token, by name
    result = mk.das(model, pairs, hook_name=HOOK, position="token", k=1, steps=150, lr=0.05,
                    batch_size=64)  # fmt: skip
    assert abs(float(result.basis[0] @ torch.eye(8)[0])) > 0.99 and result.iia_test == 1.0
    assert result.position == 0
    with pytest.raises(mk.InvalidArgumentError, match="position"):
        mk.das(model, pairs, hook_name=HOOK, position="S2")
    with pytest.raises(mk.InvalidArgumentError, match="either"):
        mk.das(model, pairs, pairs.source, hook_name=HOOK)


def test_boundless_das_learns_a_small_subspace_that_works():
    model = planted_model(dormant_weight=0.1, echo=0.0)
    base, source, labels, choices = pairs(200, seed=1)
    result = mk.das(model, base, source, labels, hook_name=HOOK, k=1, boundless=True,
                    choices=choices, steps=150, lr=0.05, batch_size=64)  # fmt: skip
    assert result.mask is not None and 1 <= result.k <= 3
    assert result.iia_test == 1.0


@pytest.mark.parametrize("weight", [None, "W_U"])
def test_the_illusion_check_flags_the_dormant_direction(weight):
    model = planted_model(dormant_weight=3.0, echo=1.0)
    base, source, labels, choices = pairs(200, seed=2)
    w = model.W_U.detach() if weight else None
    illusory = (torch.eye(8)[1] + torch.eye(8)[2])[None] / math.sqrt(2)  # dormant + unread
    report = illusion_check(model, illusory, base, source, labels, hook_name=HOOK,
                            choices=choices, weight=w)  # fmt: skip
    assert report.iia_subspace > 0.8 > 0.6 > max(report.iia_inside, report.iia_outside)
    assert report.flagged and report.verdict == "illusion"
    true = illusion_check(model, torch.eye(8)[:1], base, source, labels, hook_name=HOOK,
                          choices=choices, weight=w)  # fmt: skip
    assert true.verdict == "ok" and true.iia_subspace == 1.0


def test_a_site_with_no_causal_role_gets_no_effect():
    """Two tokens, the variable read at the last one: the first token's residual plays no role
    (attention writes nothing), so neither the planted direction there nor the whole component
    moves the answer beyond the unchanged run."""
    model = planted_model(dormant_weight=3.0, echo=1.0)
    base, source, labels, choices = pairs(120, seed=3)
    tail = torch.randint(0, 20, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    base2 = [b + [t] for b, t in zip(base, tail, strict=True)]
    source2 = [s + [t] for s, t in zip(source, tail, strict=True)]
    report = illusion_check(model, torch.eye(8)[:1], base2, source2, labels, hook_name=HOOK,
                            position=0, choices=choices)  # fmt: skip
    assert report.iia_full == report.iia_subspace == report.iia_none < 0.7
    assert report.verdict == "no effect" and report.flagged


def _patched_by_hand(model, base, source, hook, position):
    _, cache = model.run_with_cache(torch.tensor(source), names_filter=hook)

    def patch(act, hook):
        act = act.clone()
        act[:, position] = cache[hook.name][:, position]
        return act

    return model.run_with_hooks(torch.tensor(base), fwd_hooks=[(hook, patch)])[:, -1]


def test_whole_space_is_activation_patching_and_k_zero_is_the_identity(toy):
    base = [[1, 5, 9, 2], [3, 3, 7, 8], [4, 6, 2, 1]]
    source = [[7, 7, 1, 3], [2, 9, 9, 5], [8, 1, 4, 6]]
    hook = "blocks.1.hook_resid_pre"
    full = interchange(toy, base, source, torch.eye(128), hook_name=hook, position=2)
    assert torch.allclose(full, _patched_by_hand(toy, base, source, hook, 2), atol=1e-4)
    same = interchange(toy, base, source, torch.zeros(0, 128), hook_name=hook, position=2)
    with torch.no_grad():
        assert torch.allclose(same, toy(torch.tensor(base))[:, -1], atol=1e-5)
    # IIA of the whole space (any rotation: k = d) equals IIA of full activation patching
    labels = [int(t) for t in _patched_by_hand(toy, base, source, hook, 2).argmax(-1)]
    result = mk.das(toy, base * 4, source * 4, labels * 4, hook_name=hook, position=2, k=128,
                    steps=1, check_illusion=False)  # fmt: skip
    assert result.iia_test == result.iia_full == 1.0
    assert subspace_iia(toy, base, source, labels, torch.eye(128), hook_name=hook,
                        position=2) == 1.0  # fmt: skip
    assert hook_count(toy) == 0


def test_interchange_equals_pyvene_on_the_same_rotation():
    pyvene = pytest.importorskip("pyvene")
    d, k = 8, 3
    intervention = pyvene.RotatedSpaceIntervention(embed_dim=d)
    intervention.set_interchange_dim(k)  # swap the first k rotated coordinates
    rotation = intervention.rotate_layer.weight.detach()  # pyvene rotates x @ W
    g = torch.Generator().manual_seed(0)
    h, s = torch.randn(5, d, generator=g), torch.randn(5, d, generator=g)
    basis = rotation.T[:k]  # our rows are pyvene's first k columns
    ours = h + ((s - h) @ basis.T) @ basis
    with torch.no_grad():
        theirs = intervention(h, s)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_das_result_saves_and_loads(tmp_path):
    model = planted_model(dormant_weight=0.1, echo=0.0)
    base, source, labels, choices = pairs(40)
    result = mk.das(model, base, source, labels, hook_name=HOOK, choices=choices, steps=5)
    result.save(tmp_path / "das.safetensors")
    back = DasResult.load(tmp_path / "das.safetensors")
    assert torch.equal(back.rotation, result.rotation) and back.iia_test == result.iia_test
    assert back.illusion["verdict"] == result.illusion.verdict
    assert len(result.to_dataframe()) > 4 and result.plot().data and result.top(1)


@pytest.mark.parametrize(
    "hook", [f"blocks.{i}.hook_resid_{s}" for i in (0, 1) for s in ("pre", "post")]
)
def test_training_from_the_site_on_equals_the_hooked_full_run(toy, monkeypatch, hook):
    # at a residual stream DAS's steps resume the model after the site from cached streams;
    # with no room for the cache they run the whole model with a hook: the same training
    g = torch.Generator().manual_seed(4)
    base = torch.randint(1, 400, (24, 5), generator=g).tolist()
    source = torch.randint(1, 400, (24, 5), generator=g).tolist()
    labels = torch.randint(1, 400, (24,), generator=g).tolist()
    kwargs = dict(hook_name=hook, position=2, k=3, steps=4, lr=0.05, batch_size=8,
                  check_illusion=False)  # fmt: skip
    module = sys.modules["mechkit.probing.das"]
    calls = []
    hooked_step = module.forward_swapped
    monkeypatch.setattr(module, "forward_swapped", lambda *a: calls.append(1) or hooked_step(*a))
    resumed = mk.das(toy, base, source, labels, **kwargs)
    assert calls == []  # no training step ran the whole model
    monkeypatch.setattr(module, "CACHE_BYTES", 0)
    hooked = mk.das(toy, base, source, labels, **kwargs)
    assert len(calls) == 4
    assert not torch.equal(resumed.losses, resumed.losses[:1].expand(4))  # the steps moved it
    assert torch.allclose(resumed.losses, hooked.losses, atol=1e-5)
    assert torch.allclose(resumed.rotation, hooked.rotation, atol=1e-5)
    assert hook_count(toy) == 0
