"""Sites map to the right hooks and slices, and refuse typos and out-of-range values."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.sites import COMPONENTS


def test_every_component_maps_to_a_real_hook(smollm2):
    _, cache = smollm2.run_with_cache(smollm2.to_tokens("a b c"))
    skipped = {"pos_embed", "attn_in", "mlp_in"}  # rotary model; split inputs are opt-in
    for component in COMPONENTS:
        if component in skipped:
            continue
        layer = None if component in {"embed", "ln_final_scale"} else 3
        site = mk.Site(component, layer=layer).resolve(smollm2)
        assert site.hook_name in smollm2.hook_dict
        assert mk.Site.from_hook_name(site.hook_name) == site
        assert site.hook_name in cache or component in {"attn_in", "mlp_in"}


def test_missing_hooks_get_a_hint(smollm2, toy):
    with pytest.raises(mk.SiteNotFoundError, match="rotary"):
        mk.Site("pos_embed").resolve(smollm2)
    with pytest.raises(mk.SiteNotFoundError, match="attention-only"):
        mk.Site("mlp_out", layer=0).resolve(toy)


def test_negative_layer_counts_from_the_end(smollm2):
    assert mk.Site("resid_post", layer=-1).resolve(smollm2).layer == 29


@pytest.mark.parametrize(
    ("site", "error", "text"),
    [
        (mk.Site("z", layer=30), mk.InvalidSiteError, "[0, 30)"),
        (mk.Site("z", layer=0, head=9), mk.InvalidSiteError, "9 heads"),
        (mk.Site("k", layer=0, head=3), mk.InvalidSiteError, "3 key/value heads"),
        (mk.Site("mlp_post", layer=0, neuron=1536), mk.InvalidSiteError, "[0, 1536)"),
    ],
)
def test_out_of_range(smollm2, site, error, text):
    with pytest.raises(error) as err:
        site.resolve(smollm2)
    assert text in str(err.value)


def test_gqa_key_heads_are_valid_up_to_n_kv(smollm2):
    assert mk.Site("k", layer=0, head=2).resolve(smollm2).head == 2
    assert mk.Site("z", layer=0, head=8).resolve(smollm2).head == 8


def test_component_typo_suggests():
    with pytest.raises(mk.SiteNotFoundError, match="Did you mean 'resid_pre'"):
        mk.Site("resid_pr", layer=1)


def test_hook_name_typo_suggests_real_names(smollm2):
    with pytest.raises(mk.SiteNotFoundError) as err:
        mk.sites.validate_sites(smollm2, "blocks.5.attn.hook_zz")
    assert "'blocks.5.attn.hook_z'" in str(err.value)
    assert isinstance(err.value, KeyError)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"component": "embed", "layer": 2}, "no layer"),
        ({"component": "resid_pre"}, "Expected a layer"),
        ({"component": "resid_pre", "layer": 0, "head": 1}, "no head axis"),
        ({"component": "z", "layer": 0, "neuron": 1}, "neurons live"),
    ],
)
def test_inconsistent_fields(kwargs, text):
    with pytest.raises(mk.InvalidSiteError, match=text):
        mk.Site(**kwargs)


def test_index_selects_what_the_site_names():
    z = torch.randn(2, 5, 4, 8)  # (batch, pos, head, d_head)
    assert torch.equal(z[mk.Site("z", layer=0, head=3, position=1).index(4)], z[:, 1, 3])
    pattern = torch.randn(2, 4, 5, 5)  # (batch, head, query_pos, key_pos)
    site = mk.Site("pattern", layer=0, head=2, position=-1)
    assert torch.equal(pattern[site.index(4)], pattern[:, 2, -1])
    acts = torch.randn(3, 5, 7)  # (batch, pos, d_mlp)
    per_row = mk.Site("mlp_post", layer=0, position=[4, 0, 2], neuron=6)
    expected = torch.stack([acts[0, 4, 6], acts[1, 0, 6], acts[2, 2, 6]])
    assert torch.equal(acts[per_row.index(3)], expected)
    assert per_row.position == (4, 0, 2)  # lists become tuples: the site stays hashable
    hash(per_row)


def test_labels():
    assert mk.Site("z", layer=3, head=2).label == "L3H2 z"
    assert mk.Site("resid_pre", layer=5, position=4).label == "L5 resid_pre @4"


def test_as_site_reads_a_layer_and_site_or_one_site():
    from mechkit.sites import as_site

    site = mk.Site("resid_mid", layer=2)
    assert as_site("resid_mid", 2) == as_site(site) == as_site("resid_pre", site) == site
    assert as_site(site, 2) == site  # a layer that agrees is fine
    with pytest.raises(mk.InvalidArgumentError, match="layer"):
        as_site(site, 3)
    with pytest.raises(mk.InvalidSiteError):
        as_site("resid_pre", "3")
