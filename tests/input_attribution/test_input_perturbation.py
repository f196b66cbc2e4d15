"""Perturbation methods against naive loops of forward passes, captum's FeatureAblation, a
brute-force Shapley enumeration over permutations, and scikit-learn's weighted ridge."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import mechkit as mk

PROMPT = [1, 7, 3, 9, 4, 12]
ANSWER = 11


def logprob(model, tokens: list[int], answer: int = ANSWER) -> float:
    """One forward pass of one prompt, written here: log p(answer | tokens)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))
    return float(logits[0, -1].log_softmax(-1)[answer])


def test_occlusion_deletion_equals_naive_loop(toy):
    r = mk.attribute_inputs(toy, [PROMPT], ANSWER, method="occlusion", progress=False)
    full = logprob(toy, PROMPT)
    naive = [full - logprob(toy, PROMPT[:p] + PROMPT[p + 1 :]) for p in range(len(PROMPT))]
    assert torch.allclose(r.scores[0], torch.tensor(naive), atol=1e-5)
    # rows in passes of 2 (split by the cost knob) give the same scores
    small = mk.attribute_inputs(
        toy, [PROMPT], ANSWER, method="occlusion", batch_size=2, progress=False
    )
    assert torch.allclose(small.scores, r.scores, atol=1e-6)


@pytest.mark.parametrize("unit", ["token", 2])
def test_occlusion_replacement_equals_captum_feature_ablation(toy, unit):
    from captum.attr import FeatureAblation

    tokens = torch.tensor([PROMPT])
    x = toy.W_E[tokens].detach()
    base = toy.W_E[torch.full_like(tokens, 17)].detach()

    def forward(emb):
        logits = toy.run_with_hooks(
            tokens.expand(emb.shape[0], -1), fwd_hooks=[("hook_embed", lambda a, hook: emb)]
        )
        return logits[:, -1].log_softmax(-1)[:, ANSWER]

    group = torch.arange(len(PROMPT)) // (1 if unit == "token" else unit)
    mask = group[None, :, None].expand_as(x)
    theirs = FeatureAblation(forward).attribute(x, baselines=base, feature_mask=mask)
    theirs = theirs[0, :, 0] / torch.bincount(group)[group]  # a group's score shared by its tokens
    ours = mk.attribute_inputs(
        toy,
        tokens,
        ANSWER,
        method="occlusion",
        removal="replace",
        replacement=17,
        unit=unit,
        progress=False,
    )
    assert torch.allclose(ours.scores[0], theirs, atol=1e-5)


def brute_force_shapley(model, tokens: list[int]) -> list[float]:
    """Shapley values by their definition: the mean marginal contribution of each token over
    every order of the tokens (deleted tokens are left out of the prompt)."""
    n = len(tokens)
    cache: dict[frozenset[int], float] = {}

    def v(kept: frozenset[int]) -> float:
        if kept not in cache:
            cache[kept] = logprob(model, [tokens[p] for p in range(n) if p in kept])
        return cache[kept]

    phi = [0.0] * n
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        kept: frozenset[int] = frozenset()
        for p in order:
            phi[p] += v(kept | {p}) - v(kept)
            kept = kept | {p}
    return [x / len(orders) for x in phi]


def test_exact_shapley_equals_brute_force(toy):
    # with every token removed the prompt is empty: keep a BOS (id 0) in front, never removed
    tokens = [0, 1, 7, 3, 9, 4]
    r = mk.attribute_inputs(toy, [tokens], ANSWER, method="shapley", progress=False)
    body = brute_force_shapley_with_bos(toy, tokens)
    assert torch.allclose(r.scores[0, 1:], torch.tensor(body), atol=1e-5)
    # efficiency: they add up to F(x) - F(empty)
    empty = logprob(toy, [0])
    assert math.isclose(float(r.scores[0].sum()), r.target_values[0].item() - empty, abs_tol=1e-4)


def brute_force_shapley_with_bos(model, tokens: list[int]) -> list[float]:
    n = len(tokens) - 1

    def v(kept: frozenset[int]) -> float:
        return logprob(model, [tokens[0]] + [tokens[1 + p] for p in range(n) if p in kept])

    cache: dict[frozenset[int], float] = {}
    phi = [0.0] * n
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        kept: frozenset[int] = frozenset()
        for p in order:
            for s in (kept, kept | {p}):
                if s not in cache:
                    cache[s] = v(s)
            phi[p] += cache[kept | {p}] - cache[kept]
            kept = kept | {p}
    return [x / len(orders) for x in phi]


def test_kernel_shap_converges_to_exact(toy):
    tokens = [0, 1, 7, 3, 9, 4, 12, 8, 5]  # 8 features: 254 coalitions besides the ends
    exact = mk.attribute_inputs(toy, [tokens], ANSWER, method="shapley", progress=False).scores
    errors = []
    for n in (16, 200, 254):  # drawn from the kernel, then every coalition once
        est = mk.attribute_inputs(toy, [tokens], ANSWER, method="kernel_shap", n_samples=n,
                                  progress=False).scores  # fmt: skip
        assert math.isclose(float(est.sum()), float(exact.sum()), abs_tol=1e-4)  # efficiency
        errors.append(float((est - exact).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def test_lime_equals_naive_loop_and_sklearn_ridge(toy):
    from sklearn.linear_model import Ridge

    n_samples, width = 64, 0.25
    r = mk.attribute_inputs(
        toy,
        [PROMPT],
        ANSWER,
        method="lime",
        n_samples=n_samples,
        kernel_width=width,
        alpha=1.0,
        seed=3,
        progress=False,
    )
    gen = torch.Generator().manual_seed(3)  # the documented sampling: features kept w.p. 1/2
    kept = torch.rand(n_samples, len(PROMPT), generator=gen) < 0.5
    kept[0] = True
    # every token deleted: the replacement (pad, id 0 here) alone
    y = [logprob(toy, [t for t, k in zip(PROMPT, row, strict=True) if k] or [0]) for row in kept]
    size = kept.sum(-1).double()
    weights = torch.exp(-((1 - (size / len(PROMPT)).sqrt()) ** 2) / width**2)
    fit = Ridge(alpha=1.0).fit(kept.double().numpy(), y, sample_weight=weights.numpy())
    assert torch.allclose(r.scores[0], torch.tensor(fit.coef_, dtype=torch.float32), atol=1e-4)


def test_attention_equals_cached_pattern(toy):
    r = mk.attribute_inputs(
        toy, [PROMPT], ANSWER, method="attention", layer=1, head=2, progress=False
    )
    _, cache = toy.run_with_cache(torch.tensor([PROMPT]))
    pattern = cache["blocks.1.attn.hook_pattern"][0]  # (head, query, key)
    assert torch.allclose(r.scores[0], pattern[2, -1], atol=1e-6)
    mean = mk.attribute_inputs(toy, [PROMPT], ANSWER, method="attention", progress=False)
    assert torch.allclose(mean.scores[0], pattern.mean(0)[-1], atol=1e-6)


def test_word_units_and_word_aggregation(toy):
    r = mk.attribute_inputs(toy, [PROMPT], ANSWER, method="occlusion", unit=3, progress=False)
    # a span's score is shared equally: both halves of the prompt are constant within a span
    assert torch.allclose(r.scores[0, :3], r.scores[0, :1].expand(3))
    spans = r.scores[0].reshape(2, 3).sum(-1)
    full = logprob(toy, PROMPT)
    naive = torch.tensor([full - logprob(toy, PROMPT[3:]), full - logprob(toy, PROMPT[:3])])
    assert torch.allclose(spans, naive, atol=1e-5)


def test_perturbed_rows_run_once_each_and_equal_single_passes(toy, monkeypatch):
    """Identical perturbed prompts run once, rows of several lengths are padded per pass, and
    the target (read through the final norm and unembedding at the answer positions only)
    equals one full forward pass per row, also for every step of a continuation."""
    from mechkit.input_attribution.runs import PromptRun
    from mechkit.input_attribution.targets import Continuation, resolve_target

    target = resolve_target(toy, [PROMPT], Continuation(n_tokens=3))
    run = PromptRun.build(toy, target, 0, batch_size=3)
    answers = target.answers[0]
    keep = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1],
         [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]],
        dtype=torch.bool,
    )  # fmt: skip
    forward = type(toy).forward
    rows_run = []

    def counted(self, tokens, *args, **kwargs):
        rows_run.append(tokens.shape[0])
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(type(toy), "forward", counted)
    values = run.values_of_positions(keep)  # (row, step)
    monkeypatch.undo()
    assert sum(rows_run) == 5 and max(rows_run) <= 3  # 7 rows, 5 distinct, 3 per pass
    for row, got in zip(keep.tolist(), values, strict=True):
        kept = [t for t, k in zip(PROMPT, row, strict=True) if k] or [0]
        with torch.no_grad():
            logits = toy(torch.tensor([kept + answers[:-1]]))[0]
        logp = logits[len(kept) - 1 :].log_softmax(-1)
        naive = torch.stack([logp[s, a] for s, a in enumerate(answers)])
        assert torch.allclose(got, naive, atol=1e-5)
