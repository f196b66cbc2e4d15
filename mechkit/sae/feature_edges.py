"""The edges of a sparse feature circuit (Marks et al. 2024).

The score of the edge ``u -> d`` is ``Σ_pos ∇_d M · (∂d/∂u)|_direct · Δu``: the part of ``u``'s
effect on the metric ``M`` that passes through ``d`` first, where ``direct`` counts only the
paths from ``u`` to ``d`` that cross no other dictionary (the gradient is stopped at every other
dictionary's nodes); ``u -> logits`` is ``u``'s direct effect. Since every path from a node to
the output reaches some later dictionary first (or none), a node's edges sum to its node score.
One vector-Jacobian product per receiving node, the receivers of a dictionary stacked into
batched backward passes (``is_grads_batched``), as many as fit :data:`RECEIVER_BYTES`.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.core.types import Model
from mechkit.hook_scope import hook_scope
from mechkit.sae.feature_nodes import (
    DictionaryEntry,
    NodeValues,
    dictionary_hooks,
    input_leaf,
    node_parts,
    summed_metric,
)

__all__ = ["edge_scores", "RECEIVER_BYTES"]


def edge_scores(
    model: Model,
    entries: list[DictionaryEntry],
    tokens: Int[Tensor, "batch pos"],
    metric: Any,
    chosen: list[Tensor],
    delta: NodeValues,
    grad: NodeValues,
    bar: Any,
    *,
    budget: int | None = None,
) -> Float[Tensor, "sender receiver"]:
    """Edge scores ``(sender, receiver)`` of one batch (M summed over prompts), in the order of
    :class:`FeatureLayout`: senders input, then per dictionary its chosen latents and error;
    receivers the same without the input, then the logits.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> from mechkit.sae.feature_nodes import dictionary_entries
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> from mechkit.core import progress_bar
        >>> from mechkit.sae.feature_nodes import node_gradients
        >>> metric = lambda lg: lg[:, -1, 0].mean()
        >>> values, grads, _ = node_gradients(model, entries, tokens, metric)
        >>> delta = values.map(torch.zeros_like).minus(values)          # zero ablation
        >>> chosen = [torch.tensor([0, 1])]
        >>> scores = edge_scores(model, entries, tokens, metric, chosen, delta, grads,
        ...                      progress_bar(0, "", enabled=False))
        >>> scores.shape          # (sender, receiver): input + 2 latents + error, then logits
        torch.Size([4, 4])
    """
    leaves_f: list[Any] = [None] * len(entries)
    leaves_e: list[Any] = [None] * len(entries)
    live_f: list[Any] = [None] * len(entries)
    live_e: list[Any] = [None] * len(entries)
    x0, leaf = input_leaf()

    def write(k: int, x: Tensor, target: Tensor) -> Tensor:
        sae = entries[k].sae
        live_f[k], live_e[k], skip = node_parts(sae, x, target)  # read from upstream leaves
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

    with torch.enable_grad(), hook_scope(model, fwd_hooks=dictionary_hooks(entries, write, leaf)):
        logits = model(tokens)
        value = summed_metric(metric, logits, tokens.shape[0])
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
            size = max(1, min(n_r, (budget or RECEIVER_BYTES) // max(1, per_row)))
            for lo in range(0, n_r, size):
                hi = min(lo + size, n_r)
                seeds = _receiver_seeds(outputs, grad.f[k][..., idx], grad.e[k], lo, hi)
                got = _batched_grad(outputs, upstream, seeds)
                scores[:, first[k] - 1 + lo : first[k] - 1 + hi] = sender_rows(got, k, hi - lo).T
                bar.update(hi - lo)
        direct = torch.autograd.grad(value, leaves, allow_unused=True)  # receiver: logits
        stacked: list[Tensor | None] = [None if g is None else g[None] for g in direct]
        scores[:, -1] = sender_rows(stacked, len(entries), 1)[0]
        bar.update(1)
    return scores


RECEIVER_BYTES = 256 * 1024**2
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
