"""Interventions change exactly the selected activation, and never leave a hook behind."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from tests.conftest import hook_count

TEXT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def tokens(smollm2):
    return smollm2.to_tokens([TEXT, "The Eiffel Tower is located in the city of the French"])


@torch.no_grad()
def test_capture_equals_run_with_cache(smollm2, tokens):
    sites = [
        mk.Site("resid_pre", layer=4),
        mk.Site("z", layer=7, head=2),
        mk.Site("k", layer=7, head=1),
        mk.Site("pattern", layer=2, head=5, position=-1),
        mk.Site("mlp_post", layer=1, neuron=17),
    ]
    with mk.capture(smollm2, *sites) as acts:
        smollm2(tokens)
    _, cache = smollm2.run_with_cache(tokens)
    assert torch.equal(acts[sites[0]], cache["blocks.4.hook_resid_pre"])
    assert torch.equal(acts[sites[1]], cache["blocks.7.attn.hook_z"][:, :, 2])
    assert torch.equal(acts[sites[2]], cache["blocks.7.attn.hook_k"][:, :, 1])
    assert torch.equal(acts[sites[3]], cache["blocks.2.attn.hook_pattern"][:, 5, -1])
    assert torch.equal(acts[sites[4]], cache["blocks.1.mlp.hook_post"][:, :, 17])
    assert hook_count(smollm2) == 0


@torch.no_grad()
def test_patch_equals_a_hand_written_hook(smollm2, tokens):
    value = torch.randn(tokens.shape[0], 64)
    site = mk.Site("z", layer=6, head=4, position=3)
    with mk.intervene(smollm2, mk.Patch(site, value)):
        ours = smollm2(tokens)

    def by_hand(z, hook):
        z = z.clone()
        z[:, 3, 4, :] = value
        return z

    theirs = smollm2.run_with_hooks(tokens, fwd_hooks=[("blocks.6.attn.hook_z", by_hand)])
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, smollm2(tokens))


@torch.no_grad()
def test_zero_and_add(smollm2, tokens):
    site = mk.Site("resid_post", layer=10)
    vec = torch.randn(576)
    with mk.capture(smollm2, site) as before:
        smollm2(tokens)
    with mk.intervene(smollm2, mk.Add(site, vec, scale=2.0)), mk.capture(smollm2, site) as after:
        smollm2(tokens)
    assert torch.allclose(after[site], before[site] + 2.0 * vec)
    with mk.intervene(smollm2, mk.Zero(site)), mk.capture(smollm2, site) as zeroed:
        smollm2(tokens)
    assert zeroed[site].abs().max() == 0


@torch.no_grad()
def test_per_row_positions(smollm2, tokens):
    site = mk.Site("resid_pre", layer=2, position=[5, 9])
    value = torch.randn(2, 576)
    with (
        mk.intervene(smollm2, mk.Patch(site, value)),
        mk.capture(smollm2, mk.Site("resid_pre", layer=2)) as acts,
    ):
        smollm2(tokens)
    resid = acts[mk.Site("resid_pre", layer=2)]
    assert torch.equal(resid[0, 5], value[0]) and torch.equal(resid[1, 9], value[1])


def test_no_hook_left_when_the_hook_raises(smollm2, tokens):
    bad = mk.Patch(mk.Site("resid_pre", layer=3), torch.randn(7, 7))  # wrong shape
    with pytest.raises(mk.ShapeError, match=r"selected shape \(2, 14, 576\)"):
        with mk.intervene(smollm2, bad):
            smollm2(tokens)
    assert hook_count(smollm2) == 0


def test_no_hook_left_when_the_metric_raises(smollm2, tokens):
    def metric(logits):
        raise ZeroDivisionError("metric failed")

    with pytest.raises(ZeroDivisionError):
        with mk.intervene(smollm2, mk.Zero(mk.Site("z", layer=1, head=0))):
            with mk.capture(smollm2, mk.Site("resid_post", layer=3)):
                metric(smollm2(tokens))
    assert hook_count(smollm2) == 0


def test_bad_site_is_refused_before_any_hook(smollm2):
    with (
        pytest.raises(mk.InvalidSiteError),
        mk.intervene(smollm2, mk.Zero(mk.Site("z", layer=1)), mk.Zero(mk.Site("z", layer=99))),
    ):
        pass  # pragma: no cover
    assert hook_count(smollm2) == 0


def test_gradients_flow_through_patches(smollm2, tokens):
    value = torch.zeros(576, requires_grad=True)
    with mk.intervene(smollm2, mk.Add(mk.Site("resid_pre", layer=5, position=-1), value)):
        smollm2(tokens)[:, -1].logsumexp(-1).sum().backward()
    assert value.grad is not None and value.grad.abs().sum() > 0
    smollm2.zero_grad(set_to_none=True)
