"""Attribution patching over latents equals the naive first-order term, latent by latent; the
transcoder connection matrix equals the product of the weights."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.sae import SAEConfig, SparseDictionary
from mechkit.sae.attribution import attribute_latents, feature_connections
from tests.conftest import hook_count


@pytest.fixture(scope="module")
def setup(toy):
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post")
    sae = SparseDictionary.from_config(cfg, seed=0)
    generator = torch.Generator().manual_seed(2)
    segment = torch.randint(1, 500, (3, 6), generator=generator)
    clean = torch.cat([torch.zeros(3, 1, dtype=torch.long), segment, segment], dim=1)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(1, 500, (3, 3), generator=generator)
    return sae, clean, corrupt


def metric(logits):
    return (logits[:, -1, 7] - logits[:, -1, 11]).mean()


def naive(model, sae, base, source, direction_of):
    """d/dalpha M(base with the output moved by alpha * direction_of(x_base, x_source))."""
    hook = sae.cfg.hook_name
    with torch.no_grad():
        _, cache_b = model.run_with_cache(base, names_filter=hook)
        _, cache_s = model.run_with_cache(source, names_filter=hook)
    move = direction_of(cache_b[hook], cache_s[hook])  # (batch, pos, d_model)
    alpha = torch.zeros((), requires_grad=True)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, lambda a, hook: a + alpha * move)]):
        value = metric(model(base))
    return float(value.detach()), float(torch.autograd.grad(value, alpha)[0])


def test_latents_and_error_equal_the_naive_taylor_term(toy, setup):
    sae, clean, corrupt = setup
    before = hook_count(toy)
    result = attribute_latents(toy, sae, clean, corrupt, metric)
    assert hook_count(toy) == before
    assert result.labels["latent"][-1] == "error" and result.scores.shape == (65,)
    with torch.no_grad():
        f_c = sae.encode(toy.run_with_cache(clean)[1]["blocks.0.hook_resid_post"])
        f_k = sae.encode(toy.run_with_cache(corrupt)[1]["blocks.0.hook_resid_post"])
    active = ((f_c - f_k).abs().sum((0, 1)) > 0).nonzero()[:, 0].tolist()
    assert active, "the test needs latents that differ between the runs"
    for i in active[:5]:
        base, slope = naive(
            toy, sae, corrupt, clean,
            lambda xb, xs, i=i: (sae.encode(xs)[..., i] - sae.encode(xb)[..., i])[..., None]
            * sae.W_dec[i],
        )  # fmt: skip
        assert float(result.scores[i]) == pytest.approx(base + slope, abs=1e-5)

    def error_move(xb, xs):
        return (xs - sae(xs)) - (xb - sae(xb))

    base, slope = naive(toy, sae, corrupt, clean, error_move)
    assert float(result.scores[-1]) == pytest.approx(base + slope, abs=1e-5)
    assert result.corrupt_score == pytest.approx(base, abs=1e-6)


def test_zero_ablation_equals_the_naive_taylor_term_and_batches_agree(toy, setup):
    """ablation="zero" (noising): each latent's move is to zero in the clean run, the error's
    too; batch_size splits the prompts with the same scores (a sliceable Metric)."""
    sae, clean, corrupt = setup
    zero = attribute_latents(toy, sae, clean, None, metric, ablation="zero")
    assert zero.method == "zero" and zero.corrupt_score is None
    with torch.no_grad():
        f_c = sae.encode(toy.run_with_cache(clean)[1]["blocks.0.hook_resid_post"])
    active = (f_c.abs().sum((0, 1)) > 0).nonzero()[:, 0].tolist()
    for i in active[:4]:
        base, slope = naive(
            toy, sae, clean, clean,
            lambda xb, xs, i=i: -sae.encode(xb)[..., i, None] * sae.W_dec[i],
        )  # fmt: skip
        assert float(zero.scores[i]) == pytest.approx(base + slope, abs=1e-5)
    base, slope = naive(toy, sae, clean, clean, lambda xb, xs: -(xb - sae(xb)))
    assert float(zero.scores[-1]) == pytest.approx(base + slope, abs=1e-5)

    bound = mk.LogitDiff(torch.full((3,), 7), torch.full((3,), 11))  # = metric, sliceable
    whole = attribute_latents(toy, sae, clean, corrupt, bound)
    split = attribute_latents(toy, sae, clean, corrupt, bound, batch_size=2)
    torch.testing.assert_close(split.scores, whole.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        whole.scores, attribute_latents(toy, sae, clean, corrupt, metric).scores
    )
    with pytest.raises(mk.MechkitError, match="Metric"):
        attribute_latents(toy, sae, clean, corrupt, metric, batch_size=2)
    with pytest.raises(mk.MechkitError, match="ablation"):
        attribute_latents(toy, sae, clean, corrupt, metric, ablation="resample")


def test_feature_connections_are_the_weight_product(setup):
    sae, _, _ = setup
    other = SparseDictionary.from_config(
        SAEConfig(
            architecture="topk", d_in=128, d_sae=32, k=4, hook_name="blocks.1.hook_resid_pre"
        ),
        seed=1,
    )
    w = feature_connections(sae, other)
    torch.testing.assert_close(w, sae.W_dec.float() @ other.W_enc.float())
    cos = feature_connections(sae, other, normalize=True)
    assert float(cos.abs().max()) <= 1 + 1e-5
    narrow = SparseDictionary.from_config(
        SAEConfig(architecture="relu", d_in=64, d_sae=8, hook_name="blocks.1.attn.hook_z"), seed=0
    )
    with pytest.raises(mk.MechkitError, match="width"):
        feature_connections(sae, narrow)
