"""Perturbation methods: occlusion, exact Shapley values, KernelSHAP and LIME.

Each runs the target on copies of the prompt with some *features* (tokens, spans or words)
removed, by deletion (the default: the prompt without them, as ERASER erases rationales) or by
replacement with a baseline token (``removal="replace"``), all in batched forward passes:

- **occlusion / leave-one-out** (Zeiler & Fergus 2014; Li et al. 2016):
  ``F(x) - F(x without feature f)``;
- **exact Shapley values** (Shapley 1953), by enumerating all ``2**F`` coalitions
  (``F <= max_features``): ``phi_j = sum_S |S|! (F-|S|-1)! / F! (v(S + j) - v(S))``; they add
  up to ``F(x) - F(empty)`` (efficiency);
- **KernelSHAP** (Lundberg & Lee 2017): coalitions drawn from the Shapley kernel, then a least
  squares fit constrained to add up to ``F(x) - F(empty)``; it converges to the exact values as
  ``n_samples`` grows;
- **LIME** (Ribeiro et al. 2016) for text: features kept at random (probability 1/2), each
  sample weighted by ``exp(-d**2 / kernel_width**2)`` with ``d`` the cosine distance of its mask
  to the full prompt (LIME's text explainer: width 25 on 100 x the distance, i.e. 0.25), and a
  weighted ridge fit with intercept (``alpha``).

A feature's score is shared equally by its tokens, so a prompt's token scores still add up.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mechkit.errors import InvalidArgumentError
from mechkit.input_attribution.registry import Options, Scores, register
from mechkit.input_attribution.runs import PromptRun

__all__ = ["shapley_weights", "kernel_shap_fit", "weighted_ridge"]


def _scores(run: PromptRun, per_step: Tensor) -> Scores:
    """Scores from feature scores per step ``(step, feature)``: the total is their sum."""
    per_step = per_step.float()
    return Scores(run.spread(per_step.sum(0)), run.spread(per_step), {})


@register("occlusion", reads=())
def occlusion(run: PromptRun, options: Options) -> Scores:
    """Leave one feature out: ``F(x) - F(x without it)`` for each feature."""
    n = run.n_features
    kept = torch.ones(n + 1, n, dtype=torch.bool)
    kept[1:] &= ~torch.eye(n, dtype=torch.bool)  # row 0: the full prompt
    values = run.values(kept)  # (row, step)
    return _scores(run, (values[0] - values[1:]).T)


def shapley_weights(n: int) -> Tensor:
    """``|S|! (n-|S|-1)! / n!`` for coalition sizes ``|S| = 0 .. n-1``.

    Example:
        >>> shapley_weights(3).tolist()  # 1/3, 1/6, 1/3
        [0.3333333333333333, 0.16666666666666666, 0.3333333333333333]
    """
    return torch.tensor(
        [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)],
        dtype=torch.float64,
    )


@register("shapley", reads=("max_features",))
def shapley(run: PromptRun, options: Options) -> Scores:
    """Exact Shapley values over all ``2**F`` coalitions of the features."""
    n = run.n_features
    if n > options.max_features:
        raise InvalidArgumentError(
            f"Expected at most max_features={options.max_features} features for exact Shapley "
            f"values (2**F forward passes); prompt {run.i} has {n}. Hint: method='kernel_shap', "
            "unit='word' or a span, or a larger max_features."
        )
    index = torch.arange(2**n)
    bits = (index[:, None] >> torch.arange(n)) & 1  # (coalition, feature)
    values = run.values(bits.bool()).double()  # (coalition, step)
    sizes = bits.sum(-1)
    weights = shapley_weights(n)
    phi = torch.zeros(values.shape[1], n, dtype=torch.float64)
    for j in range(n):
        without = index[bits[:, j] == 0]
        gain = values[without | (1 << j)] - values[without]  # (coalition, step)
        phi[:, j] = (weights[sizes[without]][:, None] * gain).sum(0)
    return _scores(run, phi)


def kernel_shap_fit(
    kept: Tensor, values: Tensor, full: Tensor, empty: Tensor, weights: Tensor | None = None
) -> Tensor:
    """The weighted least-squares fit of ``values - empty ~ kept @ phi`` constrained to
    ``sum(phi) = full - empty``.

    Args:
        kept: ``(sample, feature)`` the coalitions (0/1).
        values: ``(sample, step)`` the target on each.
        full, empty: ``(step,)`` the target with every feature and with none.
        weights: ``(sample,)`` the Shapley kernel of each coalition; None (equal) for
            coalitions drawn from the kernel.

    Example:
        >>> kept = torch.tensor([[1, 0], [0, 1]])
        >>> kernel_shap_fit(kept, torch.tensor([[1.0], [2.0]]), torch.tensor([3.0]),
        ...                 torch.tensor([0.0])).round(decimals=4)
        tensor([[1., 2.]], dtype=torch.float64)
    """
    z = kept.double()
    y = values.double() - empty.double()  # (sample, step)
    delta = (full - empty).double()
    n = z.shape[1]
    if n == 1:
        return delta[:, None]
    target = y - z[:, -1:] * delta  # eliminate the last feature by the constraint
    design = z[:, :-1] - z[:, -1:]
    if weights is not None:
        root = weights.double().sqrt()[:, None]
        target, design = target * root, design * root
    head = torch.linalg.lstsq(design, target).solution  # (feature - 1, step)
    last = delta - head.sum(0)
    return torch.cat([head, last[None]]).T  # (step, feature)


@register("kernel_shap", reads=("n_samples", "seed"))
def kernel_shap(run: PromptRun, options: Options) -> Scores:
    """KernelSHAP with ``n_samples`` coalitions drawn from the Shapley kernel; when they are
    at least all ``2**F - 2`` coalitions, every coalition once with its kernel weight (then
    the fit is the exact Shapley values, as the shap library does)."""
    n = run.n_features
    gen = torch.Generator().manual_seed(options.seed + run.i)
    if n > 1 and options.n_samples >= 2**n - 2:
        index = torch.arange(1, 2**n - 1)
        coalitions = ((index[:, None] >> torch.arange(n)) & 1).bool()
        size = coalitions.sum(-1).double()
        comb = torch.tensor([math.comb(n, int(k)) for k in size], dtype=torch.float64)
        weights = (n - 1) / (comb * size * (n - size))  # the Shapley kernel
        ends = torch.zeros(2, n, dtype=torch.bool)
        ends[0] = True
        values = run.values(torch.cat([ends, coalitions]))
        phi = kernel_shap_fit(coalitions, values[2:], values[0], values[1], weights)
        return _scores(run, phi)
    kept = torch.zeros(options.n_samples + 2, n, dtype=torch.bool)
    kept[0] = True  # the full prompt; row 1: the empty coalition
    if n > 1:
        sizes = torch.arange(1, n, dtype=torch.float64)
        p = (n - 1) / (sizes * (n - sizes))
        drawn = torch.multinomial(p / p.sum(), options.n_samples, True, generator=gen) + 1
        for r, s in enumerate(drawn.tolist()):
            kept[r + 2, torch.randperm(n, generator=gen)[:s]] = True
    values = run.values(kept)
    phi = kernel_shap_fit(kept[2:], values[2:], values[0], values[1])
    return _scores(run, phi)


def weighted_ridge(x: Tensor, y: Tensor, weights: Tensor, alpha: float) -> Tensor:
    """Coefficients of a ridge regression with intercept and sample weights (as scikit-learn's
    ``Ridge(alpha).fit(x, y, sample_weight=weights)``): ``(feature, output)``.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [2.0]])
        >>> weighted_ridge(x, 3 * x + 1, torch.ones(3), 0.0).round(decimals=6)
        tensor([[3.]], dtype=torch.float64)
    """
    x, y, w = x.double(), y.double(), weights.double()
    w = w / w.sum()
    xc = x - (w[:, None] * x).sum(0)
    yc = y - (w[:, None] * y).sum(0)
    gram = xc.T @ (w[:, None] * xc) + alpha / float(weights.double().sum()) * torch.eye(x.shape[1])
    return torch.linalg.solve(gram.double(), xc.T @ (w[:, None] * yc))


@register("lime", reads=("n_samples", "seed", "kernel_width", "alpha"))
def lime(run: PromptRun, options: Options) -> Scores:
    """LIME: random masks, the cosine-distance kernel, a weighted ridge fit."""
    n = run.n_features
    gen = torch.Generator().manual_seed(options.seed + run.i)
    kept = torch.rand(options.n_samples, n, generator=gen) < 0.5
    kept[0] = True  # the prompt itself, as LIME's text explainer includes it
    size = kept.sum(-1).double()
    distance = 1 - (size / n).sqrt()  # cosine distance of the mask to all-ones
    weights = torch.exp(-(distance**2) / options.kernel_width**2)
    values = run.values(kept)  # (sample, step)
    coef = weighted_ridge(kept.double(), values, weights, options.alpha)  # (feature, step)
    return _scores(run, coef.T)
