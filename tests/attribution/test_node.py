"""Attribution patching equals the first-order Taylor term computed naively, cell by cell, and
converges to activation patching as the patched difference shrinks."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.demo import IOI_PAIRS
from tests.conftest import hook_count


@pytest.fixture(scope="module")
def toy_runs():
    generator = torch.Generator().manual_seed(1)
    segment = torch.randint(1, 500, (3, 5), generator=generator)
    clean = torch.cat([torch.zeros(3, 1, dtype=torch.long), segment, segment], dim=1)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(1, 500, (3,), generator=generator)
    return clean, corrupt


def toy_metric(logits):
    return (logits[:, -1, 7] - logits[:, -1, 11]).mean()


def naive_taylor(model, base, source, metric, site):
    """d/dalpha M(base with the site's slice moved alpha of the way to source) at alpha = 0."""
    with torch.no_grad():
        _, src_cache = model.run_with_cache(source, names_filter=site.hook_name)
    src = src_cache[site.hook_name]
    alpha = torch.zeros((), requires_grad=True)
    index = site.index(src.ndim)

    def move(act, hook):
        act = act.clone()
        act[index] = act[index] + alpha * (src[index] - act[index])
        return act

    with torch.enable_grad(), model.hooks(fwd_hooks=[(site.hook_name, move)]):
        value = metric(model(base))
    (grad,) = torch.autograd.grad(value, alpha)
    return float(value.detach()), float(grad)


@pytest.mark.parametrize(
    ("component", "positions"),
    [("resid_pre", "each"), ("z", "all"), ("z", "each"), ("pattern", "all"), ("k", "all")],
)
def test_equals_naive_taylor_term_cell_by_cell(toy, toy_runs, component, positions):
    clean, corrupt = toy_runs
    before = hook_count(toy)
    result = mk.attribution_patch(
        toy, clean, corrupt, toy_metric, site=component, positions=positions
    )
    assert hook_count(toy) == before
    assert result.estimator == "attribution patching"
    grids = torch.meshgrid(*[torch.arange(n) for n in result.scores.shape], indexing="ij")
    cells = torch.stack([g.flatten() for g in grids], -1)
    for idx in cells[:: max(1, len(cells) // 12)]:  # about a dozen cells per sweep
        where = {a: result.labels[a][int(i)] for a, i in zip(result.axes, idx, strict=True)}
        site = mk.Site(
            component, layer=where["layer"], head=where.get("head"), position=where.get("pos")
        )
        base, slope = naive_taylor(toy, corrupt, clean, toy_metric, site)
        assert result.scores[tuple(idx)].item() == pytest.approx(base + slope, abs=2e-5)


def test_layout_and_baselines_match_activation_patching(toy, toy_runs):
    clean, corrupt = toy_runs
    for component in ("resid_pre", "z", "q", "pattern", "attn_out"):
        est = mk.attribution_patch(toy, clean, corrupt, toy_metric, site=component)
        real = mk.activation_patch(toy, clean, corrupt, toy_metric, site=component, progress=False)
        assert est.axes == real.axes and est.labels == real.labels
        assert est.clean_score == pytest.approx(real.clean_score, abs=1e-6)
        assert est.corrupt_score == pytest.approx(real.corrupt_score, abs=1e-6)


def test_noising_uses_the_clean_run_and_its_gradient(toy, toy_runs):
    clean, corrupt = toy_runs
    result = mk.attribution_patch(toy, clean, corrupt, toy_metric, site="z", direction="noising")
    base, slope = naive_taylor(toy, clean, corrupt, toy_metric, mk.Site("z", layer=1, head=2))
    assert result.scores[1, 2].item() == pytest.approx(base + slope, abs=2e-5)
    assert result.base_score == pytest.approx(base, abs=1e-6)


def test_converges_to_activation_patching_for_a_small_difference(toy_runs):
    """Mean ablation over N copies of the clean prompt and one corrupt prompt patches
    a_clean + (a_corrupt - a_clean) / (N + 1): the estimate's relative error shrinks like 1/N
    (float64, so rounding does not hide it)."""
    toy = mk.load_model("attn-only-2l", device="cpu", dtype=torch.float64)
    clean, corrupt = toy_runs
    clean, corrupt = clean[:1], corrupt[:1]
    errors = []
    for n in (1, 10, 100):
        reference = torch.cat([clean.expand(n, -1), corrupt])
        kwargs = dict(site="z", ablation="mean", reference=reference)
        est = mk.attribution_patch(toy, clean, None, toy_metric, **kwargs)
        real = mk.activation_patch(toy, clean, None, toy_metric, progress=False, **kwargs)
        d_est, d_real = est.scores - est.clean_score, real.scores - real.clean_score
        errors.append(float((d_est - d_real).norm() / d_real.norm()))
    assert errors[0] > 5 * errors[1] > 25 * errors[2]
    assert errors[2] < 2e-3


def test_batches_sum_exactly(toy, toy_runs):
    clean, corrupt = toy_runs
    pairs = mk.PromptPairs.from_tokens(clean, corrupt, answers=[7, 7, 7], wrongs=[11, 11, 11])
    whole = mk.attribution_patch(toy, pairs, site="resid_pre")
    split = mk.attribution_patch(toy, pairs, site="resid_pre", batch_size=2)
    torch.testing.assert_close(whole.scores, split.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole.per_prompt, split.per_prompt, atol=1e-5, rtol=0)


def test_non_differentiable_metric_is_refused(toy, toy_runs):
    clean, corrupt = toy_runs
    before = hook_count(toy)
    with pytest.raises(mk.MechkitError, match="differentiable"):
        mk.attribution_patch(toy, clean, corrupt, lambda logits: torch.tensor(1.0), site="z")
    assert hook_count(toy) == before
    assert all(p.grad is None for p in toy.parameters())


@pytest.mark.slow
def test_smollm2_heads_padded_pairs_match_naive(smollm2):
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*IOI_PAIRS[:3], strict=True))
    pairs = mk.PromptPairs.from_lists(smollm2, clean, corrupt, answers, wrongs)
    metric = mk.LogitDiff.from_pairs(pairs)
    result = mk.attribution_patch(smollm2, pairs, site="v", layers=[3, 20])
    assert result.scores.shape == (2, smollm2.cfg.n_key_value_heads)
    base, slope = naive_taylor(
        smollm2, pairs.corrupt_tokens, pairs.clean_tokens, metric, mk.Site("v", layer=20, head=1)
    )
    assert result.scores[1, 1].item() == pytest.approx(base + slope, abs=1e-4)
    cmp = mk.compare_attribution(smollm2, pairs, site="z", layers=[20, 25], progress=False)
    assert len(cmp.cells) == 18 and -1.0 <= cmp.pearson <= 1.0
    assert set(cmp.to_dataframe().columns) >= {"layer", "head", "estimated", "actual", "error"}
