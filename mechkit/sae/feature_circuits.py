"""Sparse feature circuits: dictionary latents and error terms as the nodes of a circuit graph.

Marks et al. (2024, "Sparse Feature Circuits") splice sparse dictionaries (SAEs, transcoders)
into a model, each activation read as ``x = decode(f) + skip(x_in) + error``, and take every
latent and every dictionary's error term as a node. With ``M`` the metric on the clean run and
``Δv = v_ablated - v_clean`` for a node's value (its corrupt-run, mean or zero value):

- **node score** ``IE(v) = Σ_pos Δv · ∂M/∂v``: the first-order effect on ``M`` of ablating ``v``
  alone (attribution patching; all paths through later nodes included);
- **edge score** ``IE(u -> d) = Σ_pos ∇_d M · (∂d/∂u)|_direct · Δu``: the part of ``u``'s
  effect that passes through ``d`` first, where ``direct`` counts only the paths from ``u`` to
  ``d`` that cross no other dictionary (the gradient is stopped at every other dictionary's
  nodes). ``u -> logits`` is ``u``'s direct effect on ``M``.

Because every path from a node to the output reaches some later dictionary first (or none), a
node's edges into all later nodes and the logits sum exactly to its node score: the graph
decomposes each node's effect (tested). Nodes are summed over positions (Marks et al.'s choice
for prompts of differing templates).

Node scores need one forward and backward pass per batch (plus the corrupt run; integrated
gradients ``steps`` of them per dictionary), edges one vector-Jacobian product per receiving
node (the receivers of a dictionary stacked into batched backward passes, ``is_grads_batched``,
as many as fit a memory budget), so the graph keeps the ``latents_per_dictionary`` latents of
largest ``|IE|`` in each dictionary (or those above ``node_threshold``), and every error term.
The result is a :class:`mechkit.CircuitGraph`: select edges, prune, plot, save and draw it like
a graph of heads.

    >>> saes = {"r6": mk.load_sae("smollm2-135m-res6-topk"), "r12": mk.load_sae(...)}
    >>> graph = mk.feature_circuit(model, saes, pairs, latents_per_dictionary=10)
    >>> graph.node_scores["r12.err"], graph.scores.shape    # (sender, receiver)
    >>> graph = mk.feature_circuit(model, saes, pairs, method="ig", steps=10)   # the paper's
    >>> graph.threshold(0.05).prune().plot()
    >>> mk.evaluate_feature_circuit(model, saes, graph.top_edges(40), pairs).faithfulness
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from mechkit.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    SiteNotFoundError,
    check_batch_size,
    check_choice,
    check_positive_int,
)
from mechkit.graph.circuit import CircuitGraph
from mechkit.graph.edges import _bar, batch_metric, each_batch, mean_value
from mechkit.graph.feature_layout import DictionarySite, FeatureLayout, dictionary_site
from mechkit.hook_scope import hook_scope
from mechkit.patching.activation import _metric_name, resolve_inputs
from mechkit.prompts import PromptPairs
from mechkit.sae.splice import as_rows, check_hooks, sae_sites

__all__ = ["feature_circuit", "evaluate_feature_circuit", "FeatureCircuitEvaluation"]

Ablation = Literal["corrupt", "mean", "zero"]
_INPUT_HOOK = "blocks.0.hook_resid_pre"


@dataclasses.dataclass(frozen=True, eq=False)
class _Dictionary:
    site: DictionarySite
    sae: Any
    d_in: int
    d_out: int


def _dictionaries(model: Any, dictionaries: Any) -> list[_Dictionary]:
    """The user's dictionaries (one, a list, or ``{name: sae}``), checked against the model."""
    if isinstance(dictionaries, Mapping):
        named = [(str(k), v) for k, v in dictionaries.items()]
    elif isinstance(dictionaries, list | tuple):
        named = [(None, d) for d in dictionaries]
    else:
        named = [(None, dictionaries)]
    if not named:
        raise InvalidArgumentError("Expected at least one SAE or transcoder; got none.")
    out = []
    for name, sae in named:
        sites = sae_sites(sae)
        check_hooks(model, sites)
        site = dictionary_site(sites.in_hook, sites.out_hook, sites.d_sae, name)
        out.append(_Dictionary(site, sae, sites.d_in, sites.d_out))
    out.sort(key=lambda d: (d.site.writes, d.site.reads))
    FeatureLayout.build([d.site for d in out], [() for _ in out])  # names and hooks distinct
    return out


def _skip(sae: Any, x: Tensor) -> Tensor | None:
    """The skip transcoder's linear term (None for other dictionaries)."""
    if not getattr(sae.cfg, "skip", False):
        return None
    if hasattr(sae, "skip_term"):
        return sae.skip_term(x)
    return sae(x) - sae.decode(sae.encode(x))


def _parts(sae: Any, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(f, error, skip)`` of one activation: ``target = decode(f) + skip + error``."""
    f = sae.encode(x)
    skip = _skip(sae, x)
    x_hat = sae.decode(f) if skip is None else sae.decode(f) + skip
    return f, target - x_hat, skip


def _hooks(
    entries: list[_Dictionary],
    write: Callable[[int, Tensor, Tensor], Tensor | None],
    input_hook: Callable[[Tensor], Tensor | None] | None = None,
) -> list[tuple[str, Callable[..., Any]]]:
    """Forward hooks calling ``write(k, x_in, target)`` at dictionary ``k``'s output hook, with
    ``x_in`` its input (as rows, in the dictionary's dtype) and ``target`` the activation it
    reconstructs; a tensor returned replaces the activation."""
    held: dict[int, Tensor] = {}
    hooks: list[tuple[str, Callable[..., Any]]] = []
    if input_hook is not None:
        hooks.append((_INPUT_HOOK, lambda act, hook: input_hook(act)))

    def as_input(k: int, act: Tensor) -> Tensor:
        d = entries[k]
        x = as_rows(act, d.d_in, d.site.in_hook)
        return x.to(d.sae.W_dec.device, d.sae.W_dec.dtype)

    for k, d in enumerate(entries):

        def read(act: Tensor, hook: Any, k: int = k) -> None:
            held[k] = as_input(k, act)

        def out(act: Tensor, hook: Any, k: int = k) -> Tensor | None:
            d = entries[k]
            if d.site.in_hook == d.site.out_hook:
                held[k] = as_input(k, act)
            target = as_rows(act, d.d_out, d.site.out_hook).to(held[k].dtype)
            new = write(k, held.pop(k), target)
            return None if new is None else new.to(act.dtype).reshape(act.shape)

        if d.site.in_hook != d.site.out_hook:
            hooks.append((d.site.in_hook, read))
        hooks.append((d.site.out_hook, out))
    return hooks


@dataclasses.dataclass
class _Values:
    """Per-batch node values ``x0 (b, t, d_model)``, ``f[k] (b, t, d_sae)``, ``e[k]``."""

    x0: Tensor
    f: list[Tensor]
    e: list[Tensor]


@torch.no_grad()
def _record(model: Any, entries: list[_Dictionary], tokens: Tensor) -> tuple[_Values, Tensor]:
    """Node values and logits of an un-intervened run."""
    f: list[Any] = [None] * len(entries)
    e: list[Any] = [None] * len(entries)
    x0: list[Tensor] = []

    def write(k: int, x: Tensor, target: Tensor) -> None:
        f[k], e[k], _ = _parts(entries[k].sae, x, target)

    with hook_scope(model, fwd_hooks=_hooks(entries, write, lambda act: x0.append(act.detach()))):
        logits = model(tokens)
    return _Values(x0[0], f, e), logits


def _ablated(setup: Any, entries: list[_Dictionary], ablation: Ablation, model: Any) -> Any:
    """``(rows, clean values) -> (ablated values, the corrupt run's logits or None)``."""
    if ablation == "corrupt":
        return lambda rows, clean: _record(
            model, entries, setup.source_tokens[rows].to(model.cfg.device)
        )
    if ablation == "zero":
        return lambda rows, clean: (
            _Values(
                torch.zeros_like(clean.x0),
                [torch.zeros_like(t) for t in clean.f],
                [torch.zeros_like(t) for t in clean.e],
            ),
            None,
        )
    means = _means(model, entries, setup)

    def mean(rows: slice, clean: _Values) -> tuple[_Values, None]:
        values = _Values(
            means.x0.expand_as(clean.x0),
            [m.expand_as(t) for m, t in zip(means.f, clean.f, strict=True)],
            [m.expand_as(t) for m, t in zip(means.e, clean.e, strict=True)],
        )
        return values, None

    return mean


def _means(model: Any, entries: list[_Dictionary], setup: Any) -> _Values:
    """Every node's mean over the clean prompts' real tokens."""
    tokens, mask = setup.clean_tokens, setup.mask
    values, _ = _record(model, entries, tokens.to(model.cfg.device))
    keep = mask.to(values.x0.device)[..., None].to(values.x0.dtype)  # (batch, pos, 1)
    n = keep.sum()

    def avg(t: Tensor) -> Tensor:
        return (t * keep.to(t.device, t.dtype)).sum((0, 1), keepdim=True) / n

    return _Values(avg(values.x0), [avg(t) for t in values.f], [avg(t) for t in values.e])


@dataclasses.dataclass
class _Setup:
    clean_tokens: Tensor
    source_tokens: Tensor | None
    mask: Tensor
    metric: Any


def _setup(model: Any, clean: Any, corrupt: Any, metric: Any, ablation: str) -> _Setup:
    check_choice("ablation", ablation, ["corrupt", "mean", "zero"])
    if ablation == "corrupt":
        s = resolve_inputs(model, clean, corrupt, metric, "noising", None, None)
    else:
        s = resolve_inputs(model, clean, corrupt, metric, None, "zero", None)
    mask = (
        clean.clean_mask
        if isinstance(clean, PromptPairs)
        else torch.ones(s.clean_tokens.shape, dtype=torch.bool)
    )
    return _Setup(
        s.clean_tokens, s.corrupt_tokens if ablation == "corrupt" else None, mask, s.metric
    )


def _batch_size(setup: _Setup, batch_size: int | None) -> tuple[int, int]:
    """``(n_prompts, prompts per pass)``; splitting needs a metric that can be restricted."""
    from mechkit.metrics import Metric

    n_batch = setup.clean_tokens.shape[0]
    size = check_batch_size(batch_size) or n_batch
    if size < n_batch and not isinstance(setup.metric, Metric):
        raise InvalidTypeError(
            "Expected a mechkit Metric (it can be restricted to a batch) when batch_size splits "
            f"the prompts; got {type(setup.metric).__name__}. Hint: batch_size=None, or "
            "mk.LogitDiff(answer, wrong)."
        )
    return n_batch, size


def _summed_metric(metric: Any, logits: Tensor, n: int) -> Tensor:
    """The metric summed over the batch's prompts (a mean times the batch size)."""
    return mean_value(metric, logits) * n


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _input_leaf() -> tuple[list[Tensor], Callable[[Tensor], Tensor]]:
    """A hook making the residual entering block 0 a leaf, and the list it is kept in."""
    held: list[Tensor] = []

    def leaf(act: Tensor) -> Tensor:
        held.append(act.detach().requires_grad_(True))
        return held[-1]

    return held, leaf


def _node_pass(model: Any, entries: list[_Dictionary], tokens: Tensor, metric: Any) -> Any:
    """Clean values and ``∂M/∂v`` for every node (M summed over prompts), the error and latents
    held apart: ``x = decode(f) + skip + error`` with ``f`` and ``error`` separate tensors."""
    f: list[Any] = [None] * len(entries)
    e: list[Any] = [None] * len(entries)
    x0, leaf = _input_leaf()

    def write(k: int, x: Tensor, target: Tensor) -> Tensor:
        sae = entries[k].sae
        f[k] = sae.encode(x)  # read only by the decoder below: its gradient is the latents'
        _, e[k], skip = _parts(sae, x, target)  # the error: its own tensor, from x and target
        out = sae.decode(f[k]) + e[k]
        return out if skip is None else out + skip

    with torch.enable_grad(), hook_scope(model, fwd_hooks=_hooks(entries, write, leaf)):
        logits = model(tokens)
        value = _summed_metric(metric, logits, tokens.shape[0])
        grads = torch.autograd.grad(value, [x0[0], *f, *e])
    n = len(entries)
    values = _Values(x0[0].detach(), [t.detach() for t in f], [t.detach() for t in e])
    return (
        values,
        _Values(grads[0], list(grads[1 : n + 1]), list(grads[n + 1 :])),
        float(value.detach()),
    )


def _node_pass_ig(
    model: Any,
    entries: list[_Dictionary],
    tokens: Tensor,
    metric: Any,
    clean: _Values,
    away: _Values,
    steps: int,
    bar: Any = None,
) -> _Values:
    """``∂M/∂v`` averaged over ``v = away + (k/steps) (clean - away)``, ``k = 1..steps``, one
    dictionary (or the input) moved at a time while the others compute normally."""
    out = _Values(
        torch.zeros_like(clean.x0),
        [torch.zeros_like(t) for t in clean.f],
        [torch.zeros_like(t) for t in clean.e],
    )
    for moved in range(-1, len(entries)):  # -1: the input
        for k in range(1, steps + 1):
            grads = _ig_point(model, entries, tokens, metric, clean, away, moved, k / steps)
            if bar is not None:
                bar.update(1)
            if moved == -1:
                out.x0 += grads[0] / steps
            else:
                out.f[moved] += grads[0] / steps
                out.e[moved] += grads[1] / steps
    return out


def _ig_point(
    model: Any,
    entries: list[_Dictionary],
    tokens: Tensor,
    metric: Any,
    clean: _Values,
    away: _Values,
    moved: int,
    alpha: float,
) -> tuple[Tensor, ...]:
    """Gradients of M with respect to the moved dictionary's ``(f, error)`` (or the input) set
    to ``away + alpha (clean - away)``."""
    held: dict[str, Tensor] = {}

    def point(a: Tensor, c: Tensor) -> Tensor:
        return (a + alpha * (c - a)).detach().requires_grad_(True)

    def leaf(act: Tensor) -> Tensor | None:
        if moved != -1:
            return None
        held["x0"] = point(away.x0, clean.x0).to(act.dtype)
        return held["x0"]

    def write(j: int, x: Tensor, target: Tensor) -> Tensor:
        sae = entries[j].sae
        if j == moved:
            held["f"], held["e"] = point(away.f[j], clean.f[j]), point(away.e[j], clean.e[j])
            f, e, skip = held["f"], held["e"], _skip(sae, x)
        else:  # computed from what reaches it, as in the model
            f, e, skip = _parts(sae, x, target)
        out = sae.decode(f) + e
        return out if skip is None else out + skip

    with torch.enable_grad(), hook_scope(model, fwd_hooks=_hooks(entries, write, leaf)):
        value = _summed_metric(metric, model(tokens), tokens.shape[0])
        wrt = [held["x0"]] if moved == -1 else [held["f"], held["e"]]
        return torch.autograd.grad(value, wrt)


def _edge_pass(
    model: Any,
    entries: list[_Dictionary],
    tokens: Tensor,
    metric: Any,
    chosen: list[Tensor],
    delta: _Values,
    grad: _Values,
    bar: Any = None,
) -> Tensor:
    """Edge scores ``(sender, receiver)`` of one batch (M summed over prompts), in the order of
    :class:`FeatureLayout`: senders input, then per dictionary its chosen latents and error;
    receivers the same without the input, then the logits."""
    leaves_f: list[Any] = [None] * len(entries)
    leaves_e: list[Any] = [None] * len(entries)
    live_f: list[Any] = [None] * len(entries)
    live_e: list[Any] = [None] * len(entries)
    x0, leaf = _input_leaf()

    def write(k: int, x: Tensor, target: Tensor) -> Tensor:
        sae = entries[k].sae
        live_f[k], live_e[k], skip = _parts(sae, x, target)  # read from upstream leaves
        leaves_f[k] = live_f[k].detach().requires_grad_(True)  # stops paths through this one
        leaves_e[k] = live_e[k].detach().requires_grad_(True)
        out = sae.decode(leaves_f[k]) + leaves_e[k]
        return out if skip is None else out + skip  # the skip path bypasses the nodes

    n_send = 1 + sum(len(c) + 1 for c in chosen)
    n_recv = n_send
    scores = torch.zeros(n_send, n_recv, dtype=torch.float64)
    first = [1]
    for c in chosen:
        first.append(first[-1] + len(c) + 1)

    def sender_rows(grads: list[Tensor | None], upto: int, n_rows: int) -> Tensor:
        """Edge scores ``(receiver, sender)`` from every sender before dictionary ``upto``,
        given a stack of receivers' gradients with respect to ``[x0, f_0, e_0, f_1, ...]``,
        each ``(receiver, batch, pos, ...)``."""
        rows = torch.zeros(n_rows, n_send, dtype=torch.float64)
        if grads[0] is not None:
            rows[:, 0] = (delta.x0[None] * grads[0]).sum((1, 2, 3)).double().cpu()
        for k in range(upto):
            g_f, g_e = grads[1 + 2 * k], grads[2 + 2 * k]
            if g_f is not None:
                picked = (delta.f[k][None] * g_f)[..., chosen[k]].sum((1, 2))  # (rows, latent)
                rows[:, first[k] : first[k] + len(chosen[k])] = picked.double().cpu()
            if g_e is not None:
                rows[:, first[k] + len(chosen[k])] = (
                    (delta.e[k][None] * g_e).sum((1, 2, 3)).double().cpu()
                )
        return rows

    with torch.enable_grad(), hook_scope(model, fwd_hooks=_hooks(entries, write, leaf)):
        logits = model(tokens)
        value = _summed_metric(metric, logits, tokens.shape[0])
        leaves: list[Tensor] = [x0[0]]
        for k in range(len(entries)):
            leaves += [leaves_f[k], leaves_e[k]]
        for k in range(len(entries)):
            upstream = leaves[: 1 + 2 * k]
            # receivers of dictionary k: its chosen latents, then its error. Receiver r's
            # gradient is that of sum(G_r * v_r); a stack of them is one batched backward pass
            # (is_grads_batched) through the graph from the receivers' values
            idx = chosen[k].to(live_f[k].device)
            outputs = [live_f[k][..., idx], live_e[k]]  # (b, t, n) and (b, t, d_out)
            n_r = len(idx) + 1
            per_row = tokens.numel() * sum(leaf.shape[-1] for leaf in upstream) * 8
            size = max(1, min(n_r, _RECEIVER_BYTES // max(1, per_row)))
            for lo in range(0, n_r, size):
                hi = min(lo + size, n_r)
                seeds = _receiver_seeds(outputs, grad.f[k][..., idx], grad.e[k], lo, hi)
                got = _batched_grad(outputs, upstream, seeds)
                scores[:, first[k] - 1 + lo : first[k] - 1 + hi] = sender_rows(got, k, hi - lo).T
                if bar is not None:
                    bar.update(hi - lo)
        got = torch.autograd.grad(value, leaves, allow_unused=True)
        scores[:, -1] = sender_rows([None if g is None else g[None] for g in got], len(entries), 1)[
            0
        ]
        if bar is not None:
            bar.update(1)
    return scores


_RECEIVER_BYTES = 256 * 1024**2
"""Memory for the stacked upstream gradients of one batched backward pass of the edge pass."""


def _receiver_seeds(
    outputs: list[Tensor], g_f: Tensor, g_e: Tensor, lo: int, hi: int
) -> list[Tensor]:
    """The gradients fed to ``outputs = [f (b, t, n), e (b, t, d)]`` for receivers ``lo..hi``
    (latents ``0..n-1``, then the error ``n``): receiver ``r < n`` is ``G_f[..., r]`` on latent
    ``r`` alone; the error receiver is ``G_e`` on the error. ``(receiver, b, t, ...)`` each."""
    f, e = outputs
    n = f.shape[-1]
    seed_f = torch.zeros(hi - lo, *f.shape, dtype=f.dtype, device=f.device)
    seed_e = torch.zeros(hi - lo, *e.shape, dtype=e.dtype, device=e.device)
    for row, r in enumerate(range(lo, hi)):
        if r < n:
            seed_f[row, ..., r] = g_f[..., r].to(f.dtype)
        else:
            seed_e[row] = g_e.to(e.dtype)
    return [seed_f, seed_e]


def _batched_grad(
    outputs: list[Tensor], inputs: list[Tensor], seeds: list[Tensor]
) -> list[Tensor | None]:
    """Vector-Jacobian products of ``outputs`` for a stack of ``seeds``: one backward pass,
    ``(seed, *input.shape)`` per input (None where an input does not reach the outputs)."""
    try:
        got = torch.autograd.grad(
            outputs, inputs, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return list(got)
    except RuntimeError as exc:  # an operation without a batching rule: one pass per seed
        if "vmap" not in str(exc).lower() and "batch" not in str(exc).lower():
            raise
    return _grad_per_seed(outputs, inputs, seeds)


def _grad_per_seed(
    outputs: list[Tensor], inputs: list[Tensor], seeds: list[Tensor]
) -> list[Tensor | None]:
    """:func:`_batched_grad` the slow way: one backward pass per seed."""
    rows = []
    for i in range(seeds[0].shape[0]):
        rows.append(
            torch.autograd.grad(
                outputs, inputs, [s[i] for s in seeds], retain_graph=True, allow_unused=True
            )
        )
    return [
        None if rows[0][j] is None else torch.stack([row[j] for row in rows])
        for j in range(len(inputs))
    ]


def feature_circuit(
    model: Any,
    dictionaries: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    latents_per_dictionary: int = 20,
    node_threshold: float | None = None,
    ablation: Ablation = "corrupt",
    method: Literal["attribution", "ig"] = "attribution",
    steps: int = 10,
    batch_size: int | None = None,
    progress: bool = True,
) -> CircuitGraph:
    """Score a sparse feature circuit: latents and error terms of spliced dictionaries as nodes.

    Args:
        model: a HookedTransformer.
        dictionaries: one SAE or transcoder, a list of them, or ``{name: sae}`` (names default
            to the site: ``r12`` after block 12, ``m12`` the MLP of block 12...).
        clean, corrupt, metric: as for :func:`mechkit.edge_attribution` (a PromptPairs holds
            all three; the metric defaults to its logit difference).
        latents_per_dictionary: how many latents of each dictionary become nodes, those of
            largest ``|node score|``.
        node_threshold: if given, instead every latent with ``|node score|`` at least this.
        ablation: the value a node is moved to: its value in the ``corrupt`` run, its ``mean``
            over the clean prompts, or ``zero``.
        method: ``"attribution"`` (gradients at the clean run) or ``"ig"``: integrated
            gradients (Marks et al.'s choice), each dictionary's latents and error moved
            together from the ablated to the clean value in ``steps`` steps (the rest of the
            model running normally) and ``∂M/∂v`` averaged over the points ``k/steps``,
            ``k = 1..steps``; node scores use the averages, and so do edges as the weights of
            their receiving nodes (the edge Jacobians stay at the clean run, as in the paper).
            One step is exactly ``"attribution"``.
        steps: integration steps for ``"ig"``.
        batch_size: prompts per pass (None: all).
        progress: a progress bar over the passes (nodes, then one per receiving node).

    Returns:
        A :class:`mechkit.CircuitGraph` over a :class:`mechkit.graph.FeatureLayout`: ``scores``
        ``(sender, receiver)`` are edge effects on the mean metric, ``node_scores`` each node's
        effect (input, chosen latents, error terms).
    """
    if latents_per_dictionary < 0:
        raise InvalidArgumentError(
            f"Expected latents_per_dictionary >= 0; got {latents_per_dictionary}."
        )
    check_choice("method", method, ["attribution", "ig"])
    check_choice("ablation", ablation, ["corrupt", "mean", "zero"])
    check_positive_int("steps", steps)
    check_batch_size(batch_size)
    entries = _dictionaries(model, dictionaries)
    setup = _setup(model, clean, corrupt, metric, ablation)
    n_batch, size = _batch_size(setup, batch_size)
    ablated = _ablated(setup, entries, ablation, model)
    node_sum = [torch.zeros(d.site.d_sae, dtype=torch.float64) for d in entries]
    err_sum = torch.zeros(len(entries), dtype=torch.float64)
    totals = {"input": 0.0, "clean": 0.0, "source": 0.0}
    cache: list[tuple[slice, _Values, _Values]] = []

    def nodes(rows: slice) -> None:
        tokens = setup.clean_tokens[rows].to(model.cfg.device)
        m = batch_metric(setup.metric, rows, n_batch)
        values, grads, clean_value = _node_pass(model, entries, tokens, m)
        away, source_logits = ablated(rows, values)
        if method == "ig":
            grads = _node_pass_ig(model, entries, tokens, m, values, away, steps, bar)
        delta = _Values(
            away.x0 - values.x0,
            [a - v for a, v in zip(away.f, values.f, strict=True)],
            [a - v for a, v in zip(away.e, values.e, strict=True)],
        )
        source_value = 0.0
        if source_logits is not None:  # the corrupt run, read while recording its nodes
            with torch.no_grad():
                source_value = float(_summed_metric(m, source_logits, tokens.shape[0]))
        # nothing is kept from a batch that failed (it is retried in halves)
        cache.append((rows, delta, grads))
        if bar is not None:
            bar.update(1)
        for k in range(len(entries)):
            node_sum[k] += (delta.f[k] * grads.f[k]).sum((0, 1)).double().cpu()
            err_sum[k] += float((delta.e[k] * grads.e[k]).sum())
        totals["input"] += float((delta.x0 * grads.x0).sum())
        totals["clean"] += clean_value
        totals["source"] += source_value

    n_ig = (len(entries) + 1) * steps if method == "ig" else 0
    bar = _bar(-(-n_batch // size) * (1 + n_ig), "feature circuit: nodes", progress)
    each_batch(n_batch, size, nodes)
    if bar is not None:
        bar.close()
    chosen = [_choose(s / n_batch, latents_per_dictionary, node_threshold) for s in node_sum]
    n_receivers = sum(len(c) + 1 for c in chosen) + 1
    bar = _bar(len(cache) * n_receivers, "feature circuit: edges", progress)

    scores = torch.zeros(1, dtype=torch.float64)
    for rows, delta, grads in cache:
        tokens = setup.clean_tokens[rows].to(model.cfg.device)
        m = batch_metric(setup.metric, rows, n_batch)
        scores = scores + _edge_pass(model, entries, tokens, m, chosen, delta, grads, bar)
    if bar is not None:
        bar.close()
    scores = scores / n_batch

    layout = FeatureLayout.build(
        [d.site for d in entries],
        [c.tolist() for c in chosen],
        _describe(model, entries, chosen),
    )
    node_scores = {"input": totals["input"] / n_batch}
    for k, d in enumerate(entries):
        for i in chosen[k].tolist():
            node_scores[f"{d.site.name}.f{i}"] = float(node_sum[k][i] / n_batch)
        node_scores[f"{d.site.name}.err"] = float(err_sum[k] / n_batch)
    return CircuitGraph(
        layout=layout,
        scores=(scores * layout.valid).float(),
        method=(
            "sparse feature circuit (attribution patching)"
            if method == "attribution"
            else f"sparse feature circuit (integrated gradients, {steps} steps)"
        ),
        ablation=ablation,
        metric_name=_metric_name(setup.metric),
        clean_score=totals["clean"] / n_batch,
        ablated_score=totals["source"] / n_batch if setup.source_tokens is not None else None,
        model_name=model.cfg.model_name,
        node_scores=node_scores,
    )


def _choose(scores: Tensor, n: int, threshold: float | None) -> Tensor:
    """Latent indices by decreasing ``|score|``: the top ``n``, or all above ``threshold``."""
    order = scores.abs().argsort(descending=True, stable=True)
    if threshold is not None:
        return order[scores.abs()[order] >= threshold]
    return order[: min(n, len(order))]


@torch.no_grad()
def _describe(model: Any, entries: list[_Dictionary], chosen: list[Tensor]) -> dict[str, str]:
    """For latents writing the residual's width: the tokens their decoder rows promote most
    through the unembedding (the final norm's scale ignored)."""
    out: dict[str, str] = {}
    if getattr(model, "tokenizer", None) is None:
        return out
    w_u = model.W_U  # (d_model, d_vocab)
    for d, picked in zip(entries, chosen, strict=True):
        if d.d_out != model.cfg.d_model or not len(picked):
            continue
        rows = d.sae.W_dec[picked].to(w_u.device, w_u.dtype) @ w_u  # (n, d_vocab)
        top = rows.topk(3, dim=-1).indices.tolist()
        for i, ids in zip(picked.tolist(), top, strict=True):
            tokens = ", ".join(repr(model.tokenizer.decode([t])) for t in ids)
            out[f"{d.site.name}.f{i}"] = f"promotes {tokens}"
    return out


# ----------------------------------------------------------------------------------------------
# Faithfulness
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureCircuitEvaluation:
    """Faithfulness of feature circuits (Marks et al. 2024): nodes outside a circuit ablated.

    ``faithfulness = (M(C) - M(∅)) / (M(model) - M(∅))`` with ``M(C)`` the mean metric when
    every latent and error term outside the circuit ``C`` carries its ablated value (the nodes in
    ``C`` computed normally from what reaches them) and ``M(∅)`` with every node ablated.

    Attributes:
        rows: per circuit, ``(n_nodes, faithfulness, circuit_score)``.
        model_score, empty_score: ``M(model)`` and ``M(∅)``.
        ablation: the ablated value (``corrupt``, ``mean``, ``zero``).
        nodes: per circuit, its node names.
    """

    rows: tuple[tuple[int, float, float], ...]
    model_score: float
    empty_score: float
    ablation: str
    nodes: tuple[tuple[str, ...], ...]

    @property
    def faithfulness(self) -> float:
        """The first (or only) circuit's faithfulness."""
        return self.rows[0][1]

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["n_nodes", "faithfulness", "circuit_score"])

    def plot(self, *, title: str | None = None) -> Any:
        """Faithfulness against the number of nodes in the circuit."""
        import plotly.graph_objects as go

        frame = self.to_dataframe().sort_values("n_nodes")
        fig = go.Figure()
        fig.add_scatter(x=frame["n_nodes"], y=frame["faithfulness"], mode="lines+markers")
        fig.update_layout(
            title=title or f"Feature circuit faithfulness ({self.ablation} ablation)",
            xaxis_title="nodes in the circuit (latents and error terms)",
            yaxis_title="faithfulness",
        )
        return fig


def evaluate_feature_circuit(
    model: Any,
    dictionaries: Any,
    circuits: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    ablation: Ablation = "corrupt",
    batch_size: int | None = None,
) -> FeatureCircuitEvaluation:
    """Faithfulness of one or several feature circuits (Marks et al. 2024, node ablation).

    Args:
        model, dictionaries: as given to :func:`feature_circuit`.
        circuits: a :class:`CircuitGraph` from :func:`feature_circuit` (its selected edges'
            nodes: :meth:`~mechkit.CircuitGraph.nodes_in_circuit`), a list of node names
            (``"r12.f345"``, ``"r12.err"``), or a list of either.
        clean, corrupt, metric, ablation, batch_size: as for :func:`feature_circuit`.

    Returns:
        A :class:`FeatureCircuitEvaluation`; the input is never ablated.
    """
    check_choice("ablation", ablation, ["corrupt", "mean", "zero"])
    check_batch_size(batch_size)
    entries = _dictionaries(model, dictionaries)
    setup = _setup(model, clean, corrupt, metric, ablation)
    many = isinstance(circuits, list) and circuits and not isinstance(circuits[0], str)
    node_sets = [_node_names(c) for c in (circuits if many else [circuits])]
    names = {d.site.name: k for k, d in enumerate(entries)}
    keeps = [_keep_masks(nodes, entries, names) for nodes in node_sets]
    none_kept = [(torch.zeros(d.site.d_sae, dtype=torch.bool), False) for d in entries]
    runs = [none_kept, *keeps]
    n_batch, size = _batch_size(setup, batch_size)
    ablated = _ablated(setup, entries, ablation, model)
    sums = [0.0] * (1 + len(runs))  # the model, then each run

    def work(rows: slice) -> None:
        tokens = setup.clean_tokens[rows].to(model.cfg.device)
        m = batch_metric(setup.metric, rows, n_batch)
        clean_values, clean_logits = _record(model, entries, tokens)  # every node kept
        away, _ = ablated(rows, clean_values)
        got = [float(_summed_metric(m, clean_logits, tokens.shape[0]))]
        got += [_ablated_run(model, entries, tokens, m, keep, away) for keep in runs]
        for i, value in enumerate(got):
            sums[i] += value

    each_batch(n_batch, size, work)
    scores = [s / n_batch for s in sums]
    full, empty = scores[0], scores[1]
    span = full - empty
    rows = tuple(
        (len(nodes), (score - empty) / span if span else float("nan"), score)
        for nodes, score in zip(node_sets, scores[2:], strict=True)
    )
    return FeatureCircuitEvaluation(rows, full, empty, ablation, tuple(node_sets))


def _node_names(circuit: Any) -> tuple[str, ...]:
    if isinstance(circuit, CircuitGraph):
        return tuple(n for n in circuit.nodes_in_circuit() if n not in ("input", "logits"))
    if isinstance(circuit, str):
        raise InvalidTypeError(
            f"Expected a CircuitGraph or a list of node names; got the string {circuit!r}. "
            "Hint: wrap one node in a list."
        )
    return tuple(str(n) for n in circuit if n not in ("input", "logits"))


def _keep_masks(
    nodes: tuple[str, ...], entries: list[_Dictionary], names: dict[str, int]
) -> list[tuple[Tensor, bool]]:
    """Per dictionary, ``(latents kept (d_sae,), error kept)``; unknown names raise."""
    keep = [[torch.zeros(d.site.d_sae, dtype=torch.bool), False] for d in entries]
    for node in nodes:
        dictionary, _, part = node.partition(".")
        k = names.get(dictionary)
        if k is None or not (part == "err" or (part[:1] == "f" and part[1:].isdigit())):
            from mechkit.errors import did_you_mean

            raise SiteNotFoundError(
                f"Expected nodes '<dictionary>.f<latent>' or '<dictionary>.err' with "
                f"dictionaries {sorted(names)}; got {node!r}." + did_you_mean(dictionary, names)
            )
        if part == "err":
            keep[k][1] = True
        else:
            i = int(part[1:])
            if not 0 <= i < entries[k].site.d_sae:
                raise InvalidArgumentError(
                    f"Expected a latent of {dictionary!r} in [0, {entries[k].site.d_sae}); got {i}."
                )
            keep[k][0][i] = True
    return [(f, bool(e)) for f, e in keep]


@torch.no_grad()
def _ablated_run(
    model: Any,
    entries: list[_Dictionary],
    tokens: Tensor,
    metric: Any,
    keep: list[tuple[Tensor, bool]],
    away: _Values,
) -> float:
    """The metric (summed over prompts) with the nodes outside ``keep`` ablated."""

    def write(k: int, x: Tensor, target: Tensor) -> Tensor:
        sae = entries[k].sae
        f, e, skip = _parts(sae, x, target)
        kept_f, kept_e = keep[k]
        f = torch.where(kept_f.to(f.device), f, away.f[k].to(f.dtype))
        e = e if kept_e else away.e[k].to(e.dtype)
        out = sae.decode(f) + e
        return out if skip is None else out + skip

    with hook_scope(model, fwd_hooks=_hooks(entries, write)):
        logits = model(tokens)
    return float(_summed_metric(metric, logits, tokens.shape[0]))
