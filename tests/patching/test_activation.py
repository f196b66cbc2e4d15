"""Activation patching equals TransformerLens's own (slow) patching, cell by cell.

The toy model is small enough to run TransformerLens's full sweeps; on smollm2-135m its generic
patcher runs a sample of cells (``index_df``), including the grouped key/value heads and padded
prompts. Ablations are checked against a plain loop of hooked forward passes.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp

import mechkit as mk
from mechkit.demo import IOI_PAIRS
from mechkit.patching import engine
from tests.conftest import hook_count

TOL = 1e-4


@pytest.fixture(scope="module")
def pairs(smollm2):
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*IOI_PAIRS[:2], strict=True))
    return mk.PromptPairs.from_lists(smollm2, clean, corrupt, answers, wrongs)


@pytest.fixture(scope="module")
def clean_cache(smollm2, pairs):
    with torch.no_grad():
        return smollm2.run_with_cache(pairs.clean_tokens)[1]


@pytest.fixture(scope="module")
def toy_tokens():
    generator = torch.Generator().manual_seed(0)
    segment = torch.randint(1, 500, (3, 6), generator=generator)
    clean = torch.cat([torch.zeros(3, 1, dtype=torch.long), segment, segment], dim=1)
    corrupt = clean.clone()
    corrupt[:, 7:] = torch.randint(1, 500, (3, 6), generator=generator)
    return clean, corrupt


def _toy_metric(logits: torch.Tensor) -> torch.Tensor:
    """A TransformerLens-style metric: mean log-prob of the repeated tokens' last one."""
    return logits[:, -2].log_softmax(-1)[:, 100:200].mean()


TOY_CASES = [
    ("resid_pre", "each", tlp.get_act_patch_resid_pre),
    ("attn_out", "each", tlp.get_act_patch_attn_out),
    ("z", "all", tlp.get_act_patch_attn_head_out_all_pos),
    ("z", "each", tlp.get_act_patch_attn_head_out_by_pos),
    ("q", "all", tlp.get_act_patch_attn_head_q_all_pos),
    ("k", "each", tlp.get_act_patch_attn_head_k_by_pos),
    ("v", "all", tlp.get_act_patch_attn_head_v_all_pos),
    ("pattern", "all", tlp.get_act_patch_attn_head_pattern_all_pos),
    ("pattern", "each", tlp.get_act_patch_attn_head_pattern_by_pos),
]


@pytest.mark.parametrize(("site", "positions", "tl_fn"), TOY_CASES)
@torch.no_grad()
def test_toy_full_sweeps_equal_transformer_lens(toy, toy_tokens, site, positions, tl_fn):
    clean, corrupt = toy_tokens
    ours = mk.activation_patch(
        toy, clean, corrupt, _toy_metric, site=site, positions=positions, progress=False
    )
    _, cache = toy.run_with_cache(clean)
    theirs = tl_fn(toy, corrupt, cache, _toy_metric)
    assert ours.scores.shape == theirs.shape
    assert torch.allclose(ours.scores, theirs, atol=TOL, rtol=0)
    assert ours.per_prompt is None  # a scalar metric gives no per-prompt scores
    assert hook_count(toy) == 0


@torch.no_grad()
def test_toy_attention_scores_equal_transformer_lens_generic_patcher(toy, toy_tokens):
    clean, corrupt = toy_tokens
    ours = mk.activation_patch(toy, clean, corrupt, _toy_metric, site="attn_scores", progress=False)
    _, cache = toy.run_with_cache(clean)
    theirs = tlp.generic_activation_patch(
        toy,
        corrupt,
        cache,
        _toy_metric,
        tlp.layer_head_pattern_patch_setter,
        "attn_scores",
        index_axis_names=("layer", "head"),
    )
    assert torch.allclose(ours.scores, theirs, atol=TOL, rtol=0)


@torch.no_grad()
def test_neurons_equal_a_loop_of_hooked_forwards(smollm2, pairs):
    metric = mk.LogitDiff.from_pairs(pairs)
    ours = mk.activation_patch(
        smollm2, pairs, site="mlp_post", layers=[12], neurons=[7, 300, 1500], progress=False
    )
    assert ours.axes == ("layer", "neuron") and ours.labels["neuron"] == [7, 300, 1500]
    _, clean = smollm2.run_with_cache(pairs.clean_tokens)
    for i, neuron in enumerate([7, 300, 1500]):
        site = mk.Site("mlp_post", layer=12, neuron=neuron)
        value = clean["blocks.12.mlp.hook_post"][:, :, neuron]
        with mk.intervene(smollm2, mk.Patch(site, value)):
            expected = float(metric(smollm2(pairs.corrupt_tokens)))
        assert abs(float(ours.scores[0, i]) - expected) < TOL


def _tl_cells(model, corrupt, cache, metric, setter, name, rows, columns):
    df = pd.DataFrame(rows, columns=columns)
    return tlp.generic_activation_patch(
        model, corrupt, cache, metric, setter, name, index_df=df
    ).cpu()


SMOL_CASES = [
    # (site, positions, TL setter, TL column names, cells as (layer, pos/head, ...) in TL order)
    ("resid_pre", "each", tlp.layer_pos_patch_setter, ["layer", "pos"], [(0, 3), (8, 5), (25, 13)]),
    ("resid_post", "each", tlp.layer_pos_patch_setter, ["layer", "pos"], [(3, 1), (29, 13)]),
    ("resid_mid", "each", tlp.layer_pos_patch_setter, ["layer", "pos"], [(6, 4)]),
    ("mlp_out", "each", tlp.layer_pos_patch_setter, ["layer", "pos"], [(0, 1), (17, 13)]),
    ("z", "all", tlp.layer_head_vector_patch_setter, ["layer", "head"], [(9, 6), (23, 3)]),
    ("k", "all", tlp.layer_head_vector_patch_setter, ["layer", "head"], [(4, 0), (18, 2)]),
    ("v", "each", tlp.layer_pos_head_vector_patch_setter, ["layer", "pos", "head"], [(12, 5, 1)]),
    ("pattern", "all", tlp.layer_head_pattern_patch_setter, ["layer", "head"], [(18, 6), (23, 3)]),
]


@pytest.mark.parametrize(("site", "positions", "setter", "columns", "cells"), SMOL_CASES)
@torch.no_grad()
def test_smollm2_cells_equal_transformer_lens(
    smollm2, pairs, clean_cache, site, positions, setter, columns, cells
):
    metric = mk.LogitDiff.from_pairs(pairs)
    layers = sorted({c[0] for c in cells})
    ours = mk.activation_patch(
        smollm2, pairs, site=site, positions=positions, layers=layers, progress=False
    )
    theirs = _tl_cells(
        smollm2, pairs.corrupt_tokens, clean_cache, metric, setter, site, cells, columns
    )
    for cell, expected in zip(cells, theirs, strict=True):
        index = [layers.index(cell[0]), *cell[1:]]
        got = ours.scores[tuple(index)]
        assert abs(float(got) - float(expected)) < TOL, (site, cell, float(got), float(expected))
    assert ours.per_prompt is not None and ours.per_prompt.shape == (*ours.scores.shape, 2)
    assert torch.allclose(ours.per_prompt.mean(-1), ours.scores, atol=1e-5)


@torch.no_grad()
def test_grouped_query_heads_have_their_own_axis(smollm2, pairs):
    k = mk.activation_patch(smollm2, pairs, site="k", layers=[5], progress=False)
    assert k.axes == ("layer", "head") and k.scores.shape == (1, smollm2.cfg.n_key_value_heads)
    z = mk.activation_patch(smollm2, pairs, site="z", layers=[5], progress=False)
    assert z.scores.shape == (1, smollm2.cfg.n_heads)


@torch.no_grad()
def test_padded_prompts_equal_unpadded_runs(smollm2):
    """Pairs of different lengths share a batch; each prompt's scores are its own run's."""
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*IOI_PAIRS, strict=True))
    padded = mk.PromptPairs.from_lists(smollm2, clean, corrupt, answers, wrongs)
    assert padded.is_padded
    both = mk.activation_patch(smollm2, padded, site="resid_pre", layers=[10], progress=False)
    for row in (0, 2):
        alone = mk.activation_patch(
            smollm2, padded[row], site="resid_pre", layers=[10], progress=False
        )
        n = alone.scores.shape[1]
        assert torch.allclose(both.per_prompt[0, :n, row], alone.scores[0], atol=TOL)


@torch.no_grad()
def test_noising_equals_transformer_lens_with_roles_swapped(smollm2, pairs):
    metric = mk.LogitDiff.from_pairs(pairs)
    ours = mk.activation_patch(
        smollm2, pairs, site="attn_out", layers=[14], direction="noising", progress=False
    )
    _, corrupt_cache = smollm2.run_with_cache(pairs.corrupt_tokens)
    cells = [(14, p) for p in range(pairs.clean_tokens.shape[1])]
    theirs = _tl_cells(
        smollm2,
        pairs.clean_tokens,
        corrupt_cache,
        metric,
        tlp.layer_pos_patch_setter,
        "attn_out",
        cells,
        ["layer", "pos"],
    )
    assert torch.allclose(ours.scores[0], theirs, atol=TOL)
    assert ours.method == "noising" and abs(ours.base_score - ours.clean_score) < 1e-6


def _loop_ablation(model, tokens, metric, site, value_fn):
    """One hooked forward per cell, replacing the site's slice with value_fn(activation)."""
    with mk.intervene(model, mk.Transform(site, value_fn)):
        return float(metric(model(tokens)))


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
@torch.no_grad()
def test_ablations_equal_a_loop_of_hooked_forwards(smollm2, pairs, ablation):
    metric = mk.LogitDiff.from_pairs(pairs)
    ours = mk.activation_patch(
        smollm2, pairs, site="z", layers=[9, 23], ablation=ablation, seed=3, progress=False
    )
    assert ours.method == ablation and ours.corrupt_score is not None
    _, ref = smollm2.run_with_cache(pairs.corrupt_tokens)
    draw = torch.randint(0, 2, (2,), generator=torch.Generator().manual_seed(3))
    for li, layer in enumerate([9, 23]):
        acts = ref[f"blocks.{layer}.attn.hook_z"]
        for head in (0, 3, 6):
            site = mk.Site("z", layer=layer, head=head)
            if ablation == "zero":
                value = torch.zeros_like(acts[:, :, head])
            elif ablation == "mean":
                value = acts[:, :, head].mean(0, keepdim=True).expand_as(acts[:, :, head])
            else:
                value = acts[draw][:, :, head]
            expected = _loop_ablation(
                smollm2, pairs.clean_tokens, metric, site, lambda a, v=value: v
            )
            assert abs(float(ours.scores[li, head]) - expected) < TOL, (layer, head)


@torch.no_grad()
def test_site_list_and_one_site(smollm2, pairs):
    sites = [mk.Site("z", layer=9, head=6), mk.Site("resid_pre", layer=20, position=13)]
    listed = mk.activation_patch(smollm2, pairs, site=sites, progress=False)
    assert listed.axes == ("site",) and listed.scores.shape == (2,)
    grid = mk.activation_patch(smollm2, pairs, site="resid_pre", layers=[20], progress=False)
    assert abs(float(listed.scores[1]) - float(grid.scores[0, 13])) < TOL


@torch.no_grad()
def test_tiny_memory_budget_and_out_of_memory_split_give_the_same_scores(
    smollm2, pairs, monkeypatch
):
    whole = mk.activation_patch(smollm2, pairs, site="z", layers=[20, 25], progress=False)
    small = mk.activation_patch(
        smollm2, pairs, site="z", layers=[20, 25], memory_budget="1MB", progress=False
    )
    assert torch.allclose(whole.scores, small.scores, atol=TOL)

    real = engine._run_chunk
    sizes = []

    def fails_when_large(model, base, chunk, reader):
        sizes.append(len(chunk))
        if len(chunk) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, base, chunk, reader)

    monkeypatch.setattr(engine, "_run_chunk", fails_when_large)
    split = mk.activation_patch(smollm2, pairs, site="z", layers=[20, 25], progress=False)
    assert torch.allclose(whole.scores, split.scores, atol=TOL)
    assert max(sizes) > 3 and sizes[-1] <= 3  # it failed large, then ran in pieces
    assert hook_count(smollm2) == 0


@torch.no_grad()
def test_no_hook_left_when_the_metric_raises(smollm2, pairs):
    calls = {"n": 0}

    def bad_metric(logits):
        calls["n"] += 1
        if calls["n"] > 3:
            raise ValueError("boom")
        return logits[:, -1, 0].mean()

    with pytest.raises(ValueError, match="boom"):
        mk.activation_patch(smollm2, pairs, None, bad_metric, layers=[3], progress=False)
    assert hook_count(smollm2) == 0


def test_result_table_plot_and_normalization(smollm2, pairs):
    result = mk.activation_patch(smollm2, pairs, site="resid_pre", layers=[0, 15], progress=False)
    df = result.to_dataframe()
    assert list(df.columns[:4]) == ["layer", "pos", "pos_label", "score"]
    assert len(df) == result.scores.numel() and "prompt_1" in df.columns
    norm = result.normalized()
    assert norm.clean_score == 1.0 and norm.corrupt_score == 0.0
    assert torch.allclose(
        norm.scores,
        (result.scores - result.corrupt_score) / (result.clean_score - result.corrupt_score),
    )
    # the whole clean residual stream entering a layer makes the run the clean run
    whole = mk.activation_patch(smollm2, pairs, site="resid_pre", positions="all", progress=False)
    assert torch.allclose(whole.normalized().scores, torch.ones(30), atol=1e-4)
    assert result.plot().data[0].type == "heatmap"
    where, _ = result.top(1)[0]
    assert set(where) == {"layer", "pos"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"site": "embed"}, mk.InvalidSiteError, "Expected a component that activation"),
        ({"site": "resid_pree"}, mk.InvalidSiteError, "Expected a component"),
        ({"site": "z", "layers": [40]}, mk.InvalidSiteError, r"layers in \[0, 30\)"),
        ({"direction": "sideways"}, mk.MechkitError, "denoising"),
        ({"direction": "denoising", "ablation": "zero"}, mk.MechkitError, "ablation='corrupt'"),
        ({"memory_budget": "lots"}, mk.MechkitError, "memory budget"),
    ],
)
def test_bad_arguments_raise_before_running(smollm2, pairs, kwargs, error, match):
    with pytest.raises(error, match=match):
        mk.activation_patch(smollm2, pairs, progress=False, **kwargs)
    assert hook_count(smollm2) == 0


def test_unaligned_pairs_and_missing_corrupt_are_refused(smollm2):
    unaligned = mk.PromptPairs.from_lists(
        smollm2,
        ["When Mary and John went out, John"],
        ["Bob left"],
        [" Mary"],
        [" John"],
        aligned=False,
    )
    with pytest.raises(mk.PromptLengthError):
        mk.activation_patch(smollm2, unaligned, progress=False)
    with pytest.raises(mk.MechkitError, match="Expected corrupt prompts"):
        mk.activation_patch(smollm2, ["Hello there"], None, lambda x: x.sum(), progress=False)


def test_attention_only_model_refuses_mlp_sites(toy, toy_tokens):
    clean, corrupt = toy_tokens
    with pytest.raises(mk.SiteNotFoundError, match="attention-only"):
        mk.activation_patch(toy, clean, corrupt, _toy_metric, site="mlp_out", progress=False)


@pytest.fixture(scope="module")
def tiny_mlp():
    """A random three-layer model with MLPs (the toy model is attention-only), and 6 aligned
    pairs of three different lengths, right-padded."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=40, n_ctx=16,
        act_fn="gelu", normalization_type="LN", seed=1,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    generator = torch.Generator().manual_seed(2)
    clean_rows, corrupt_rows = [], []
    for length in (5, 8, 5, 7, 8, 5):
        row = torch.randint(1, 40, (length,), generator=generator)
        bad = row.clone()
        bad[1:3] = torch.randint(1, 40, (2,), generator=generator)
        clean_rows.append(row.tolist())
        corrupt_rows.append(bad.tolist())
    answers = torch.randint(1, 40, (6,), generator=generator)
    pairs = mk.PromptPairs.from_tokens(clean_rows, corrupt_rows, answers, (answers + 1) % 40)
    assert pairs.is_padded and len(set(pairs.clean_lengths.tolist())) == 3
    return model, pairs


MLP_CASES = [
    ("resid_pre", "each", tlp.get_act_patch_resid_pre),
    ("mlp_out", "each", tlp.get_act_patch_mlp_out),  # edits in the last block's MLP
    ("resid_mid", "each", tlp.get_act_patch_resid_mid),
    ("z", "all", tlp.get_act_patch_attn_head_out_all_pos),
    ("pattern", "each", tlp.get_act_patch_attn_head_pattern_by_pos),
]


@pytest.mark.parametrize(("site", "positions", "tl_fn"), MLP_CASES)
@torch.no_grad()
def test_length_buckets_and_answer_only_last_block_equal_transformer_lens(
    tiny_mlp, site, positions, tl_fn, monkeypatch
):
    """Prompts of unequal lengths run one length at a time, and the last block's MLP only at the
    answer positions; the scores and per-prompt scores equal TransformerLens's padded sweep."""
    model, pairs = tiny_mlp
    metric = mk.LogitDiff.from_pairs(pairs)
    calls = {"buckets": 0, "answers_only": 0}
    import mechkit.patching.activation as activation_module

    real_plan, real_only = activation_module.plan_patch, engine._answers_only

    def plan(*args, **kwargs):
        calls["buckets"] += 1
        return real_plan(*args, **kwargs)

    def only(*args, **kwargs):
        used = real_only(*args, **kwargs)
        calls["answers_only"] += used
        return used

    monkeypatch.setattr(activation_module, "plan_patch", plan)
    monkeypatch.setattr(engine, "_answers_only", only)
    ours = mk.activation_patch(model, pairs, site=site, positions=positions, progress=False)
    assert calls["buckets"] == 3  # one plan per length
    assert calls["answers_only"] > 0 or site == "mlp_out"
    _, cache = model.run_with_cache(pairs.clean_tokens)
    theirs = tl_fn(model, pairs.corrupt_tokens, cache, metric)
    assert ours.scores.shape == theirs.shape
    torch.testing.assert_close(ours.scores, theirs, atol=1e-5, rtol=0)
    assert ours.clean_score == pytest.approx(float(metric(model(pairs.clean_tokens))), abs=1e-5)
    assert ours.corrupt_score == pytest.approx(float(metric(model(pairs.corrupt_tokens))), abs=1e-5)
    for row in (0, 1):  # each prompt's scores are its own unpadded sweep's
        alone = pairs[row]
        _, row_cache = model.run_with_cache(alone.clean_tokens)
        expected = tl_fn(model, alone.corrupt_tokens, row_cache, mk.LogitDiff.from_pairs(alone))
        n = alone.clean_tokens.shape[1]
        got = ours.per_prompt[..., row]
        got = got[:, :, :n] if site == "pattern" else got[:, :n] if positions == "each" else got
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
