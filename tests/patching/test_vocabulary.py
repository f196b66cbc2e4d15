"""The core's vocabulary (direction, ablation, reference) in activation, path and attribution
patching, checked against plain loops of hooked forward passes on the toy model; the results'
``.top`` against the rank rule; the sweep config's head names."""

from __future__ import annotations

import warnings

import pytest
import torch

import mechkit as mk
from mechkit.attribution.node import AttributionComparison
from mechkit.patching import engine, sweep_config
from mechkit.patching.activation import PaddedPrompts
from mechkit.patching.result import PatchResult
from tests.conftest import hook_count


@pytest.fixture(scope="module")
def runs():
    generator = torch.Generator().manual_seed(2)
    segment = torch.randint(1, 500, (3, 5), generator=generator)
    clean = torch.cat([torch.zeros(3, 1, dtype=torch.long), segment, segment], dim=1)
    corrupt = clean.clone()
    corrupt[:, 2:4] = torch.randint(1, 500, (3, 2), generator=generator)
    return clean, corrupt


def metric(logits):
    return (logits[:, -1, 7] - logits[:, -1, 11]).mean()


def test_ablation_corrupt_is_the_explicit_form_of_the_default(toy, runs):
    clean, corrupt = runs
    default = mk.activation_patch(toy, clean, corrupt, metric, site="z", progress=False)
    explicit = mk.activation_patch(
        toy, clean, corrupt, metric, site="z", ablation="corrupt", progress=False
    )
    assert explicit.method == default.method == "denoising"
    assert torch.equal(explicit.scores, default.scores)
    noising = mk.activation_patch(
        toy, clean, corrupt, metric, site="z", direction="noising", progress=False
    )
    explicit = mk.activation_patch(
        toy, clean, corrupt, metric, site="z", direction="noising", ablation="corrupt",
        progress=False,
    )  # fmt: skip
    assert torch.equal(explicit.scores, noising.scores) and explicit.method == "noising"


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_noising_with_an_ablation_is_the_ablation(toy, runs, ablation):
    """direction='noising' is the direction every ablation has; saying it changes nothing
    (it was refused as 'either direction or ablation' before)."""
    clean, corrupt = runs
    alone = mk.activation_patch(
        toy, clean, corrupt, metric, site="z", ablation=ablation, seed=1, progress=False
    )
    said = mk.activation_patch(
        toy, clean, corrupt, metric, site="z", direction="noising", ablation=ablation, seed=1,
        progress=False,
    )  # fmt: skip
    assert said.method == alone.method == ablation
    assert torch.equal(said.scores, alone.scores)


def test_denoising_with_an_ablation_is_refused_before_any_run(toy, runs, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("a run started")

    monkeypatch.setattr(engine, "run_base", no_run)
    clean, corrupt = runs
    for call in (mk.activation_patch, mk.path_patch):
        with pytest.raises(mk.InvalidArgumentError, match="ablation='corrupt'"):
            call(toy, clean, corrupt, metric, direction="denoising", ablation="zero")
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean"):
        mk.activation_patch(toy, clean, corrupt, metric, ablation="zeros")
    with pytest.raises(mk.InvalidArgumentError, match="reference=None"):
        mk.path_patch(toy, clean, corrupt, metric, reference=corrupt)


def test_mean_ablation_over_a_padded_reference_is_the_mean_over_its_real_tokens(toy, runs):
    """One mean over every real token of the reference prompts, computed here by a loop."""
    clean, _ = runs
    reference = [clean[0, :4], clean[1, :7], clean[2]]
    padded = torch.zeros(3, clean.shape[1], dtype=torch.long)
    mask = torch.zeros(3, clean.shape[1], dtype=torch.bool)
    for i, row in enumerate(reference):
        padded[i, : len(row)], mask[i, : len(row)] = row, True
    name = "blocks.1.attn.hook_z"
    total, count = 0.0, 0
    with torch.no_grad():
        for row in reference:
            z = toy.run_with_cache(row[None], names_filter=name)[1][name][0]  # (pos, head, d)
            total, count = total + z.sum(0), count + z.shape[0]
    mean = total / count  # (head, d_head)

    def put(act, hook):
        act = act.clone()
        act[:, :, 2] = mean[2]
        return act

    with torch.no_grad(), toy.hooks(fwd_hooks=[(name, put)]):
        expected = float(metric(toy(clean)))
    ours = mk.activation_patch(
        toy, clean, None, metric, site=[mk.Site("z", layer=1, head=2)], ablation="mean",
        reference=PaddedPrompts(padded, mask), progress=False,
    )  # fmt: skip
    assert abs(float(ours.scores[0]) - expected) < 1e-4


def _plain_path_to_logits(model, clean, sender, value):
    """Noising along sender -> logits, written plainly: the sender set to ``value``, every
    later head frozen at its clean value."""
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        hooks = [(sender.hook_name, lambda act, hook: _put_head(act, sender.head, value))]
        for layer in range(sender.layer + 1, model.cfg.n_layers):
            name = f"blocks.{layer}.attn.hook_z"
            hooks.append((name, lambda act, hook, name=name: cache[name].clone()))
        with model.hooks(fwd_hooks=hooks):
            return float(metric(model(clean)))


def _put_head(act, head, value):
    act = act.clone()
    act[:, :, head] = value.expand_as(act[:, :, head])
    return act


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_path_patch_ablations_equal_a_plain_loop(toy, runs, ablation):
    clean, corrupt = runs
    result = mk.path_patch(toy, clean, corrupt, metric, ablation=ablation, progress=False)
    assert result.method == ablation and result.axes == ("layer", "head")
    with torch.no_grad():
        name = "blocks.0.attn.hook_z"
        z_corrupt = toy.run_with_cache(corrupt, names_filter=name)[1][name]
    for head in range(toy.cfg.n_heads):
        sender = mk.Site("z", layer=0, head=head)
        if ablation == "zero":
            value = torch.zeros_like(z_corrupt[:, :, head])
        else:  # the per-position mean over the corrupt prompts (same length, no padding)
            value = z_corrupt[:, :, head].mean(0, keepdim=True)
        expected = _plain_path_to_logits(toy, clean, sender, value)
        assert abs(float(result.scores[0, head]) - expected) < 1e-4
    assert hook_count(toy) == 0


def test_attribution_patch_takes_the_same_vocabulary(toy, runs):
    clean, corrupt = runs
    alone = mk.attribution_patch(toy, clean, corrupt, metric, site="z", ablation="mean")
    said = mk.attribution_patch(
        toy, clean, corrupt, metric, site="z", direction="noising", ablation="mean"
    )
    assert said.method == "mean" and torch.equal(said.scores, alone.scores)
    explicit = mk.attribution_patch(toy, clean, corrupt, metric, site="z", ablation="corrupt")
    default = mk.attribution_patch(toy, clean, corrupt, metric, site="z")
    assert explicit.method == "denoising" and torch.equal(explicit.scores, default.scores)


def _result(scores, base=0.0):
    n = len(scores)
    return PatchResult(
        scores=torch.tensor(scores),
        per_prompt=None,
        axes=("layer",),
        labels={"layer": list(range(n))},
        tick_labels={"layer": [f"L{i}" for i in range(n)]},
        clean_score=base,
        corrupt_score=None,
        method="zero",
        site="z",
        metric_name="m",
    )


def test_patch_result_top_follows_the_rank_rule():
    """By |effect| from the unpatched score, ties in grid order, NaN last; the scores returned
    are the patched scores."""
    result = _result([1.0, float("nan"), -1.0, 3.0, 1.5], base=1.0)  # effects 0 nan -2 2 .5
    cells = [(cell["layer"], score) for cell, score in result.top(5)]
    assert cells[:4] == [(2, -1.0), (3, 3.0), (4, 1.5), (0, 1.0)]
    assert cells[4][0] == 1  # NaN last
    signed = [cell["layer"] for cell, _ in result.top(5, absolute=False)]
    assert signed == [3, 4, 0, 2, 1]
    assert mk.core.rank(list(range(5)), result.scores - 1.0, 2) == [(2, -2.0), (3, 2.0)]


def test_patch_result_top_by_abs_is_a_deprecated_alias():
    result = _result([0.5, -2.0, 1.0])
    with pytest.warns(DeprecationWarning, match="absolute"):
        old = result.top(2, by_abs=False)
    assert old == result.top(2, absolute=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result.top(2)


def test_attribution_comparison_top_ranks_by_the_error():
    cmp = AttributionComparison(
        estimate=_result([0.0, 0.0, 0.0]),
        actual=_result([0.0, 0.0, 0.0]),
        cells=[{"layer": 0}, {"layer": 1}, {"layer": 2}],
        estimated=torch.tensor([0.5, 0.1, 2.0]),
        real=torch.tensor([0.4, 0.9, 1.0]),
        pearson=0.0,
        spearman=0.0,
        normalized=True,
    )
    top = [(cell["layer"], round(error, 4)) for cell, error in cmp.top(3)]
    assert top == [(2, 1.0), (1, -0.8), (0, 0.1)]
    assert [c["layer"] for c, _ in cmp.top(3, absolute=False)] == [2, 0, 1]
    assert [c["layer"] for c, _, _ in cmp.worst(3)] == [c for c, _ in top]


def test_head_results_name_their_cells_in_the_one_scheme(toy, runs):
    clean, corrupt = runs
    frame = mk.activation_patch(toy, clean, corrupt, metric, site="z", progress=False)
    names = frame.to_dataframe()["name"].tolist()
    assert names[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]


def test_sweep_heads_read_head_names_in_every_scheme():
    entry = sweep_config.SweepEntry(site="z", heads=["L1H2", "a0.h3", "1.3"])
    assert entry.layers == (0, 1) and entry.heads == (2, 3)
    numbers = sweep_config.SweepEntry(site="z", layers=[0, 1], heads=[2, 3])
    assert entry == numbers
    with pytest.raises(mk.errors.SweepConfigError, match="head names such as 'L9H6'"):
        sweep_config.SweepEntry(site="z", heads=["L1.mlp"])
    with pytest.raises(mk.errors.SweepConfigError, match="layers"):
        sweep_config.SweepEntry(site="z", layers=[0], heads=["L1H2"])


def test_sweep_config_takes_the_core_vocabulary():
    base = {
        "model": "attn-only-2l",
        "prompts": {"generator": "repeated_tokens"},
        "sweeps": [{"site": "z"}],
    }
    for direction, ablation in [("noising", "mean"), (None, "corrupt"), ("noising", "corrupt")]:
        config = sweep_config.config_from_dict(
            {**base, "direction": direction, "ablation": ablation}
        )
        assert (config.direction, config.ablation) == (direction, ablation)


def test_moved_names_are_the_cores_and_errors_live_in_errors():
    from mechkit.core import batching

    assert engine.parse_budget is batching.parse_budget
    assert engine.check_budget is batching.check_budget
    assert sweep_config.SweepConfigError is mk.errors.SweepConfigError
    assert sweep_config.PromptsTooLongError is mk.errors.PromptsTooLongError
    assert issubclass(mk.errors.PromptsTooLongError, mk.errors.ContextLengthError)


def _pairs():
    generator = torch.Generator().manual_seed(5)
    clean, corrupt = [], []
    for length in (6, 8, 8, 7, 6):  # unequal lengths: padded batches
        row = [0] + torch.randint(1, 500, (length - 1,), generator=generator).tolist()
        bad = list(row)
        bad[1] = int(torch.randint(1, 500, (), generator=generator))
        clean.append(row)
        corrupt.append(bad)
    return mk.PromptPairs.from_tokens(clean, corrupt, [7, 8, 9, 10, 11], [12, 13, 14, 15, 16])


@pytest.mark.parametrize(
    ("site", "ablation"), [("resid_pre", None), ("z", "mean"), ("z", "zero"), ("pattern", None)]
)
def test_activation_patch_in_batches_equals_one_batch(toy, site, ablation):
    pairs = _pairs()
    whole = mk.activation_patch(toy, pairs, site=site, ablation=ablation, progress=False)
    parts = mk.activation_patch(
        toy, pairs, site=site, ablation=ablation, batch_size=2, progress=False
    )
    assert parts.axes == whole.axes and parts.labels == whole.labels
    assert torch.allclose(parts.scores, whole.scores, atol=1e-4)
    assert torch.allclose(parts.per_prompt, whole.per_prompt, atol=1e-4)
    assert abs(parts.clean_score - whole.clean_score) < 1e-4
    assert abs(parts.corrupt_score - whole.corrupt_score) < 1e-4
    assert hook_count(toy) == 0


def test_activation_patch_batches_refuse_what_cannot_be_split(toy, runs):
    pairs = _pairs()
    with pytest.raises(mk.InvalidArgumentError, match="resample"):
        mk.activation_patch(toy, pairs, ablation="resample", batch_size=2, progress=False)
    clean, corrupt = runs
    with pytest.raises(mk.InvalidTypeError, match="mechkit Metric"):
        mk.activation_patch(toy, clean, corrupt, metric, batch_size=2, progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="batch_size"):
        mk.activation_patch(toy, clean, corrupt, metric, batch_size=0, progress=False)


def test_path_patch_in_batches_equals_one_batch(toy):
    pairs = _pairs()
    receivers = [mk.Site("q", layer=1, head=2), mk.Site("v", layer=1, head=0)]
    for ablation in (None, "mean"):
        whole = mk.path_patch(toy, pairs, receivers=receivers, ablation=ablation, progress=False)
        parts = mk.path_patch(
            toy, pairs, receivers=receivers, ablation=ablation, batch_size=2, progress=False
        )
        assert torch.allclose(parts.scores, whole.scores, atol=1e-4)
        assert torch.allclose(parts.per_prompt, whole.per_prompt, atol=1e-4)
        assert abs(parts.clean_score - whole.clean_score) < 1e-4
    assert hook_count(toy) == 0
