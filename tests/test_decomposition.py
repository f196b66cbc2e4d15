"""Residual decomposition and direct logit attribution: the parts sum to the whole."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "Then, Anna and Tom had a long and really fun day at the beach. Tom gave a ball to",
]


@pytest.fixture(scope="module")
def pairs(smollm2):
    return mk.PromptPairs.from_lists(
        smollm2, PROMPTS, PROMPTS, [" Mary", " Anna"], [" John", " Tom"]
    )


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    """The same model in float64, where the identity can be checked far below float32 noise."""
    return mk.load_model("smollm2-135m", device="cpu", dtype="float64")


@pytest.mark.parametrize("layer", [0, 1, 12, 30])
def test_parts_sum_to_the_residual(smollm2_f64, pairs, layer):
    dec = mk.decompose_resid(smollm2_f64, pairs.clean_tokens, layer=layer)
    assert dec.parts.shape[0] == len(dec.labels) == 1 + layer * (9 + 2) + (layer > 0)
    assert (dec.parts.sum(0) - dec.resid).abs().max() < 1e-4


@pytest.mark.parametrize("layer", [5, 30])
def test_parts_sum_in_float32_up_to_float32_rounding(smollm2, pairs, layer):
    """SmolLM2's residual reaches ~2e4 at the first token (a massive activation), where float32
    itself resolves only ~2e-3: the bound is 1e-4 absolute, or relative where |resid| > 1."""
    dec = mk.decompose_resid(smollm2, pairs.clean_tokens, layer=layer)
    err = (dec.parts.double().sum(0) - dec.resid.double()).abs()
    assert (err <= 1e-4 * dec.resid.double().abs().clamp(min=1)).all()


def test_head_part_is_z_times_w_o(smollm2, pairs):
    """One head's part, computed here by a plain loop over positions."""
    dec = mk.decompose_resid(smollm2, pairs, layer=8, positions=-1)  # last real token
    _, cache = smollm2.run_with_cache(pairs.clean_tokens)
    z = cache["blocks.3.attn.hook_z"]
    i = dec.labels.index("L3H5")
    for b in range(2):
        p = int(pairs.answer_positions()[b])
        expected = z[b, p, 5] @ smollm2.W_O[3, 5]
        assert torch.allclose(dec.parts[i, b], expected, atol=1e-4)


def test_toy_decomposition_with_biases(toy):
    tokens = torch.randint(1, toy.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    dec = mk.decompose_resid(toy, tokens)
    assert "pos_embed" in dec.labels and "L1.attn_bias" in dec.labels
    assert (dec.parts.sum(0) - dec.resid).abs().max() < 1e-4


def test_dla_sums_to_the_logit_difference(smollm2, pairs):
    dla = mk.direct_logit_attribution(smollm2, pairs)
    with torch.no_grad():
        logits = smollm2(pairs.clean_tokens)
    expected = mk.metrics.logit_diff(logits, pairs.answer, pairs.wrong, pairs.answer_positions())
    assert torch.allclose(dla.values.sum(0), expected, atol=1e-4)
    assert torch.allclose(dla.total, expected, atol=1e-4)
    assert dla.labels[-1] == "unembed_bias"
    assert dla.head_scores().shape == (30, 9)


def test_dla_of_one_logit_and_of_a_direction(smollm2, pairs):
    one = mk.direct_logit_attribution(smollm2, PROMPTS[0], answer=" Mary")
    with torch.no_grad():
        logit = smollm2(smollm2.to_tokens(PROMPTS[0]))[0, -1, int(pairs.answer[0])]
    assert torch.allclose(one.values.sum(0), logit[None], atol=1e-3)
    # a direction equal to the unembedding column reproduces the logit
    u = smollm2.W_U[:, int(pairs.answer[0])]
    by_dir = mk.direct_logit_attribution(smollm2, PROMPTS[0], direction=u)
    assert torch.allclose(by_dir.values.sum(0), logit[None], atol=1e-3)


def test_dla_without_the_scale_is_the_raw_projection(smollm2, pairs):
    raw = mk.direct_logit_attribution(smollm2, pairs, divide_by_scale=False)
    scaled = mk.direct_logit_attribution(smollm2, pairs)
    dec = mk.decompose_resid(smollm2, pairs.clean_tokens, positions=pairs.answer_positions())
    i = raw.labels.index("L20H3")
    u = smollm2.W_U[:, pairs.answer] - smollm2.W_U[:, pairs.wrong]  # (d_model, batch)
    assert torch.allclose(raw.values[i], (dec.parts[i] * u.T).sum(-1), atol=1e-4)
    assert torch.allclose(scaled.values[i], raw.values[i] / dec.scale[:, 0], atol=1e-5)


def test_neuron_attribution_sums_to_the_mlp_part(smollm2, pairs):
    dla = mk.direct_logit_attribution(smollm2, pairs)
    neurons = mk.neuron_attribution(smollm2, pairs, 20)
    assert neurons.values.shape == (1536, 2)
    assert torch.allclose(neurons.values.sum(0), dla.values[dla.labels.index("L20.mlp")], atol=1e-4)
    _, cache = smollm2.run_with_cache(pairs.clean_tokens)
    b, p, n = 1, int(pairs.answer_positions()[1]), 77
    post = cache["blocks.20.mlp.hook_post"][b, p, n]
    u = smollm2.W_U[:, pairs.answer[b]] - smollm2.W_U[:, pairs.wrong[b]]
    direct = post * (smollm2.blocks[20].mlp.W_out[n] @ u) / cache["ln_final.hook_scale"][b, p, 0]
    assert torch.allclose(neurons.values[n, b], direct, atol=1e-5)


def test_results_table_and_figure(smollm2, pairs):
    dla = mk.direct_logit_attribution(smollm2, pairs)
    df = dla.to_dataframe()
    assert {"label", "kind", "layer", "head", "mean", "std"} <= set(df.columns)
    assert "L0H0" in set(df.label) and "L29.mlp" in set(df.label)
    assert len(dla.top(3)) == 3
    fig = dla.plot()
    assert fig.data[0].z.shape == (30, 9)


def test_bad_layer_and_target(smollm2, pairs, toy):
    with pytest.raises(mk.InvalidSiteError, match=r"\[0, 30\]"):
        mk.decompose_resid(smollm2, "hello", layer=31)
    with pytest.raises(ValueError, match="Expected a target"):
        mk.direct_logit_attribution(smollm2, "hello")
    with pytest.raises(mk.InvalidSiteError, match="attention-only"):
        mk.neuron_attribution(
            toy, torch.zeros(1, 4, dtype=torch.long), 0, direction=torch.ones(toy.cfg.d_model)
        )


# ----------------------------------------------------------------------------------------------
# Issue 15: Sites for layers, the one naming scheme, .top by the rank rule
# ----------------------------------------------------------------------------------------------

TOY_TOKENS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def test_decompose_resid_takes_a_site_for_the_layer(toy):
    by_int = mk.decompose_resid(toy, TOY_TOKENS, layer=1)
    pre = mk.decompose_resid(toy, TOY_TOKENS, layer=mk.Site("resid_pre", layer=1))
    post = mk.decompose_resid(toy, TOY_TOKENS, layer=mk.Site("resid_post", layer=0))
    assert pre.labels == post.labels == by_int.labels
    assert torch.equal(pre.parts, by_int.parts) and torch.equal(post.resid, by_int.resid)
    with pytest.raises(mk.InvalidSiteError):
        mk.decompose_resid(toy, TOY_TOKENS, layer=mk.Site("z", layer=0))


def test_dla_takes_a_site_and_reads_peer_names(toy):
    dla = mk.direct_logit_attribution(
        toy, TOY_TOKENS, answer=[9, 9], wrong=[10, 10], layer=mk.Site("resid_post", layer=1)
    )
    assert dla.labels == mk.direct_logit_attribution(toy, TOY_TOKENS, answer=9, wrong=10).labels
    i = dla.labels.index("L1H3")
    assert dla.score("L1H3") == dla.score("a1.h3") == dla.score("1.3") == float(dla.mean[i])
    with pytest.raises(mk.InvalidArgumentError, match="Expected the name of a part"):
        dla.score("L7H0")


def test_dla_top_follows_the_rank_rule(toy):
    from mechkit.core import rank

    dla = mk.direct_logit_attribution(toy, TOY_TOKENS, answer=9, wrong=10)
    assert dla.top() == rank(list(dla.labels), dla.mean, 10)
    assert len(dla.top()) == 10
    signed = dla.top(3, absolute=False)
    assert [v for _, v in signed] == sorted(dla.mean.tolist(), reverse=True)[:3]
    dec = mk.decompose_resid(toy, TOY_TOKENS)
    norms = dec.parts.norm(dim=-1).flatten(1).mean(-1)
    assert dec.top(2) == rank(list(dec.labels), norms, 2)
    assert len(dec.plot().data) == 1


def test_mlp_and_neuron_names_follow_the_scheme(smollm2):
    dla = mk.direct_logit_attribution(smollm2, "The cat sat on the", answer=" mat", layer=2)
    assert "L1.mlp" in dla.labels and dla.score("m1") == dla.score("L1.mlp")
    na = mk.neuron_attribution(
        smollm2, "The cat sat on the", mk.Site("mlp_post", layer=1), answer=" mat"
    )
    assert na.labels[:2] == ("L1N0", "L1N1")
    assert abs(float(na.values.sum()) - dla.score("L1.mlp")) < 1e-3
