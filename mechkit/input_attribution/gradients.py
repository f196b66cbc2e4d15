"""Gradient methods: saliency, gradient x input, integrated gradients.

All three differentiate the target with respect to the token embeddings (the output of
``hook_embed``; positional embeddings, where the model has them, stay fixed):

- **saliency** (Simonyan et al. 2014): the L2 (or L1) norm of the gradient at each token;
- **gradient x input** (Shrikumar et al. 2016): ``sum_d grad_d * e_d`` at each token;
- **integrated gradients** (Sundararajan et al. 2017):
  ``IG_i = (e_i - e'_i) . integral_0^1 dF(e' + a (e - e'))/de_i da``, from a baseline ``e'``.
  IG is *complete*: ``sum_i IG_i = F(e) - F(e')``; the result reports the gap between the two
  sides (``completeness_gap``), which measures the quadrature's error.

The baseline replaces the embedding of every attributed token (a leading BOS and a
continuation's tokens keep theirs): ``"pad"`` (the pad token's embedding, the default),
``"zero"`` (the zero vector), ``"mean"`` (the mean of the embedding matrix), a token id, or
baseline prompts of the prompts' lengths (``"corrupt"`` with :class:`~mechkit.PromptPairs`).
On a model with RMSNorm the zero baseline is a bad default: RMSNorm(a x) is the same for every
a > 0 and 0 at a = 0, so F jumps at the baseline itself and no quadrature closes the gap; the
pad token's path has no such point.

The quadrature names are captum's (``"riemann_left"``, ``"riemann_right"``,
``"riemann_middle"``, ``"riemann_trapezoid"``, ``"gausslegendre"``), with captum's nodes and
weights, so results agree with captum's ``IntegratedGradients``. ``"adaptive"`` (the default)
controls its own error: IG is complete on every piece of the path, so an interval's quadrature
error is measured exactly by forward passes (its share of ``sum_i IG_i`` minus ``F(hi) -
F(lo)``). It first runs F (forward passes only) at ``n_steps + 1`` equally spaced points,
puts two-point Gauss-Legendre rules on ``n_steps // 2`` intervals holding equal shares of F's
variation, then bisects the intervals with the largest errors until the completeness gap is
within ``tolerance`` (1%) of ``|F(x) - F(x')|`` or ``max_steps`` gradient points are spent;
the result reports the gap and the points used (``n_points``). On SmolLM2, F along the path
from the pad token is jagged (its total variation is several times ``F(x) - F(x')``, measured
on the docs page), so fixed rules miss its spikes (captum's Gauss-Legendre rule is 4.9% off at
1024 points on a 30-token prompt, the default 0.17% at 480); the adaptive rule puts its points
where F moves.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, PromptLengthError, check_choice
from mechkit.input_attribution.registry import Options, Scores, register
from mechkit.input_attribution.runs import PromptRun

__all__ = ["QUADRATURES", "BASELINES", "quadrature_nodes", "baseline_embeddings", "pad_token"]

QUADRATURES: tuple[str, ...] = (
    "adaptive",
    "gausslegendre",
    "riemann_trapezoid",
    "riemann_middle",
    "riemann_left",
    "riemann_right",
)
BASELINES: tuple[str, ...] = ("pad", "zero", "mean", "corrupt")


def quadrature_nodes(rule: str, n: int) -> tuple[Tensor, Tensor]:
    """The points ``alpha`` in [0, 1] and weights of a quadrature rule with ``n`` points (the
    weights sum to 1), as captum's ``approximation_parameters`` gives them.

    Example:
        >>> alphas, weights = quadrature_nodes("riemann_trapezoid", 3)
        >>> alphas.tolist(), weights.tolist()
        ([0.0, 0.5, 1.0], [0.16666666666666666, 0.3333333333333333, 0.16666666666666666])
    """
    check_choice("quadrature", rule, [q for q in QUADRATURES if q != "adaptive"])
    if n < (1 if rule == "gausslegendre" else 2):
        raise InvalidArgumentError(
            f"Expected n_steps >= {1 if rule == 'gausslegendre' else 2} for {rule}; got {n}."
        )
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return torch.tensor(0.5 * (1 + x)), torch.tensor(0.5 * w)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        alphas = torch.linspace(0, 1, n, dtype=torch.float64)
        weights[0] /= 2
        weights[-1] /= 2
    elif rule == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n, dtype=torch.float64)
    elif rule == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=torch.float64)
    else:
        alphas = torch.linspace(1 / n, 1, n, dtype=torch.float64)
    return alphas, weights


def pad_token(model: Model) -> int:
    """The id of the pad baseline: the tokenizer's pad token, else its EOS, else 0.

    Example:
        >>> pad_token(mk.load_model("attn-only-2l"))
        0
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if t is not None:
                return int(t)
    return 0


def baseline_embeddings(
    run: PromptRun, baseline: object, baseline_tokens: list[int] | None = None
) -> Float[Tensor, "pos d_model"]:
    """The baseline of ``run``'s prompt: its embeddings with every attributed token's replaced.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> from mechkit.input_attribution.targets import resolve_target
        >>> run = PromptRun.build(model, resolve_target(model, [[1, 2, 3]], 5), 0)
        >>> baseline_embeddings(run, "zero").abs().sum().item()
        0.0
    """
    model = run.model
    x = run.embeddings()
    out = x.clone()
    where = run.positions
    if baseline_tokens is not None:
        n = len(run.target.prompts[run.i])
        if len(baseline_tokens) != n:
            raise PromptLengthError(
                f"Expected a baseline prompt of the prompt's length ({n} tokens, one per "
                f"position); got {len(baseline_tokens)} tokens for prompt {run.i}. Hint: "
                "corrupt prompts with as many tokens as their clean prompts, or a baseline of "
                "'pad', 'zero', 'mean' or one token id."
            )
        ids = torch.tensor([baseline_tokens], device=x.device)
        out[where] = run.embeddings(ids)[where]
    elif baseline == "zero":
        out[where] = 0.0
    elif baseline == "mean":
        out[where] = model.W_E.detach().mean(0).to(out.dtype)
    else:
        token = pad_token(model) if baseline == "pad" else int(baseline)  # type: ignore[call-overload]
        out[where] = model.W_E.detach()[token].to(out.dtype)
    return out


def _prompt_part(run: PromptRun, t: Tensor) -> Tensor:
    return t[..., : len(run.target.prompts[run.i])].float().cpu()


@register("saliency", reads=("norm",))
def saliency(run: PromptRun, options: Options) -> Scores:
    """The norm of the gradient at each token's embedding (``norm``: ``"l2"`` or ``"l1"``)."""
    check_choice("norm", options.norm, ["l2", "l1"])
    found: list[Tensor] = []
    run.gradients(run.embeddings()[None], True, lambda rows, v, g: found.append(g[0]))
    grads = found[0]  # (output, pos, d_model)
    scores = grads.norm(p=2 if options.norm == "l2" else 1, dim=-1)
    return _split(run, _prompt_part(run, scores))


@register("input_x_gradient")
def input_x_gradient(run: PromptRun, options: Options) -> Scores:
    """``sum_d grad_d * e_d`` at each token (captum's ``InputXGradient``, summed over d)."""
    x = run.embeddings()
    found: list[Tensor] = []
    run.gradients(x[None], True, lambda rows, v, g: found.append(g[0]))
    scores = (found[0] * x[None]).sum(-1)  # (output, pos)
    return _split(run, _prompt_part(run, scores))


@register(
    "integrated_gradients", reads=("baseline", "n_steps", "quadrature", "tolerance", "max_steps")
)
def integrated_gradients(run: PromptRun, options: Options) -> Scores:
    """Integrated gradients from ``baseline`` with ``n_steps`` points of ``quadrature``; the
    points run in batches (``batch_size`` or the memory budget). ``"adaptive"`` refines its
    intervals until the completeness gap is within ``tolerance`` (at most ``max_steps``
    gradient points)."""
    given = options.baseline_tokens[run.i] if options.baseline_tokens is not None else None
    x = run.embeddings()
    b = baseline_embeddings(run, options.baseline, given)
    if options.quadrature == "adaptive":
        return _adaptive_ig(run, options, x, b)
    alphas, weights = quadrature_nodes(options.quadrature, options.n_steps)
    a = alphas.to(x.dtype).to(x.device)[:, None, None]
    path = torch.cat([b + a * (x - b), b[None], x[None]])  # (n_steps + 2, pos, d_model)
    n = len(alphas)
    total: list[Tensor] = []
    values = torch.zeros(n + 2, run.n_steps)
    w = weights.to(x.device)

    def add(rows: slice, v: Tensor, g: Tensor) -> None:
        values[rows] = v
        idx = torch.arange(rows.start, rows.stop, device=g.device)
        weight = torch.where(idx < n, w[idx.clamp(max=n - 1)], 0.0).to(g.dtype)
        total.append((g * weight[:, None, None, None]).sum(0).double())  # (output, pos, d)

    run.gradients(path, True, add)
    mean_grad = torch.stack(total).sum(0)  # (output, pos, d_model)
    ig = ((x - b).double()[None] * mean_grad).sum(-1)  # (output, pos)
    out = _split(run, _prompt_part(run, ig))
    fb, fx = values[n].sum().item(), values[n + 1].sum().item()
    gap = float(ig[0].sum()) - (fx - fb)
    out.extras.update(target_value=fx, baseline_value=fb, completeness_gap=gap, n_points=n)
    return out


MIN_WIDTH = 2.0**-20
"""Intervals of the adaptive rule narrower than this are not split again (a jump of F, such
as RMSNorm's at the zero baseline, is no quadrature error and would absorb every point)."""


def _adaptive_ig(run: PromptRun, options: Options, x: Tensor, b: Tensor) -> Scores:
    """IG by adaptive composite two-point Gauss-Legendre quadrature with error control.

    IG is complete on every piece of the path: over ``[lo, hi]`` the exact integral of
    ``dF/da`` is ``F(hi) - F(lo)``, which forward passes give. So each interval's *local gap*
    (its quadrature of ``dF/da = sum_i grad_i . (x_i - b_i)`` minus ``F(hi) - F(lo)``) is its
    quadrature error, measured. F is first scanned (forward passes only) at ``n_steps + 1``
    equally spaced points; ``n_steps // 2`` intervals with cuts on the scan hold equal shares
    of F's variation; then, round by round, the fewest intervals with the largest local gaps
    whose removal would bring the sum of the local gaps' magnitudes (a bound on the
    completeness gap) within ``tolerance * |F(x) - F(b)|`` are bisected (one forward pass at
    the midpoints, two gradient points per half), until it is within or ``max_steps``
    gradient points are spent.
    """
    dx = (x - b).double()
    scan = torch.linspace(0, 1, options.n_steps + 1, dtype=torch.float64)
    f_scan = _path_values(run, x, b, scan)
    cuts = _cut_indices(f_scan, max(1, options.n_steps // 2))
    lo, hi = scan[cuts[:-1]], scan[cuts[1:]]
    f_lo, f_hi = f_scan[cuts[:-1]], f_scan[cuts[1:]]
    node_x, node_w = (torch.tensor(v) for v in np.polynomial.legendre.leggauss(2))
    n_out = run.n_steps + 1 if run.n_steps > 1 else 1
    parts = torch.zeros(0, n_out, x.shape[0], dtype=torch.float64)  # per interval (output, pos)
    fresh = torch.arange(len(lo))  # intervals whose nodes are not run yet
    delta = float(f_scan[-1] - f_scan[0])
    bound = options.tolerance * abs(delta) + 1e-6
    used = 0
    while True:
        parts = torch.cat([parts, _interval_parts(run, x, b, dx, lo[fresh], hi[fresh],
                                                  node_x, node_w)])  # fmt: skip
        used += 2 * len(fresh)
        local = parts[:, 0].sum(-1) - (f_hi - f_lo)
        err = local.abs()
        room = (options.max_steps - used) // 4
        if float(err.sum()) <= bound or room < 1:
            break
        # the fewest intervals whose errors, if removed, would meet the bound
        order = err.argsort(descending=True)
        order = order[hi[order] - lo[order] > MIN_WIDTH]
        if len(order) == 0:
            break
        cover = int(torch.searchsorted(err[order].cumsum(0), float(err.sum()) - bound)) + 1
        chosen = order[: min(cover, room)]
        mid = 0.5 * (lo[chosen] + hi[chosen])
        f_mid = _path_values(run, x, b, mid)
        keep = torch.ones(len(lo), dtype=torch.bool)
        keep[chosen] = False
        lo = torch.cat([lo[keep], lo[chosen], mid])
        hi = torch.cat([hi[keep], mid, hi[chosen]])
        f_lo = torch.cat([f_lo[keep], f_lo[chosen], f_mid])
        f_hi = torch.cat([f_hi[keep], f_mid, f_hi[chosen]])
        parts = parts[keep]
        fresh = torch.arange(len(parts), len(lo))
    ig = parts.sum(0)  # (output, pos)
    out = _split(run, _prompt_part(run, ig))
    fb, fx = float(f_scan[0]), float(f_scan[-1])
    gap = float(ig[0].sum()) - (fx - fb)
    out.extras.update(target_value=fx, baseline_value=fb, completeness_gap=gap, n_points=used)
    return out


def _path_values(run: PromptRun, x: Tensor, b: Tensor, alphas: Tensor) -> Tensor:
    """The total target at the points ``alphas`` of the straight path (forward passes)."""
    a = alphas.to(x.dtype).to(x.device)[:, None, None]
    return run.embedding_values(b + a * (x - b)).sum(-1).double()


def _cut_indices(values: Tensor, m: int) -> list[int]:
    """Indices into an equally spaced scan cutting it into at most ``m`` intervals of equal
    shares of the path's variation (plus a uniform share, so flat stretches keep some)."""
    steps = values.diff().abs()
    mass = steps + (steps.sum() + 1e-12) / len(steps)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)])
    targets = torch.linspace(0, float(cumulative[-1]), m + 1, dtype=torch.float64)
    idx = torch.searchsorted(cumulative, targets).clamp(max=len(values) - 1).tolist()
    return sorted({0, len(values) - 1, *idx})


def _interval_parts(
    run: PromptRun,
    x: Tensor,
    b: Tensor,
    dx: Tensor,
    lo: Tensor,
    hi: Tensor,
    node_x: Tensor,
    node_w: Tensor,
) -> Tensor:
    """Each interval's two-point Gauss-Legendre share of IG, ``(interval, output, pos)``."""
    alphas = (lo[:, None] + (hi - lo)[:, None] * 0.5 * (1 + node_x[None])).flatten()
    weights = ((hi - lo)[:, None] * 0.5 * node_w[None]).flatten()
    a = alphas.to(x.dtype).to(x.device)[:, None, None]
    rows: list[Tensor] = []

    def add(part: slice, v: Tensor, g: Tensor) -> None:
        # (row, output, pos): each node's gradient . (x - b), weighted
        w = weights[part].to(dx.device)
        rows.append((g.double() * dx[None, None]).sum(-1) * w[:, None, None])

    run.gradients(b + a * (x - b), True, add)
    per_node = torch.cat(rows).cpu()
    return per_node.view(len(lo), 2, *per_node.shape[1:]).sum(1)


def _split(run: PromptRun, per_output: Float[Tensor, "output pos"]) -> Scores:
    """Scores of the total (the first output) and each step (the rest, or the total when
    there is one step); positions that are not attributed get 0."""
    keep = torch.zeros(per_output.shape[-1], dtype=torch.bool)
    keep[run.positions] = True
    per_output = torch.where(keep, per_output, 0.0)
    steps = per_output[1:] if per_output.shape[0] > 1 else per_output[:1]
    return Scores(per_output[0], steps, {})
