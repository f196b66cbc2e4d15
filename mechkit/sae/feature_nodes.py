"""The nodes of a sparse feature circuit and their scores (Marks et al. 2024).

With dictionaries spliced into the model, each activation they reconstruct reads
``x = decode(f) + skip(x_in) + error``; every latent of ``f`` and every error term is a node,
and so is the residual stream entering block 0 (``input``). This module records node values
(``(batch, pos, d_sae)`` latents, ``(batch, pos, d_out)`` errors, ``(batch, pos, d_model)``
input), their ablated values (the corrupt run's, the reference mean, or zero), and the
gradients of the metric with respect to them: at the clean run (attribution patching) or
averaged along the straight line from the ablated to the clean values (integrated gradients).
:mod:`mechkit.sae.feature_edges` uses the same hooks for the edges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.core.inputs import Contrast, reference_mean
from mechkit.core.metrics import mean_value
from mechkit.core.types import Model, SparseDictionaryLike
from mechkit.errors import InvalidArgumentError
from mechkit.graph.feature_layout import DictionarySite, FeatureLayout, dictionary_site
from mechkit.hook_scope import hook_scope
from mechkit.sae.splice import as_rows, check_hooks, sae_sites, skip_term

__all__ = [
    "FEATURE_ABLATIONS",
    "FeatureAblation",
    "DictionaryEntry",
    "NodeValues",
    "dictionary_entries",
    "node_parts",
    "dictionary_hooks",
    "record_nodes",
    "ablated_values",
    "input_leaf",
    "summed_metric",
    "node_gradients",
    "node_gradients_ig",
]

FeatureAblation = Literal["corrupt", "mean", "zero"]
FEATURE_ABLATIONS: tuple[str, ...] = ("corrupt", "mean", "zero")
"""The ablations of feature circuits and their evaluation (``"resample"`` is not offered: one
random draw per prompt would make a gradient estimate noisier without a use the others lack)."""

INPUT_HOOK = "blocks.0.hook_resid_pre"
"""Where the ``input`` node is read: the residual stream entering block 0."""


@dataclasses.dataclass(frozen=True, eq=False)
class DictionaryEntry:
    """One spliced dictionary: its site (name, hooks, where it reads and writes) and widths.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> entries[0].site.name, entries[0].d_in, entries[0].d_out
        ('r0', 128, 128)
    """

    site: DictionarySite
    sae: SparseDictionaryLike
    d_in: int
    d_out: int


def dictionary_entries(model: Model, dictionaries: Any) -> list[DictionaryEntry]:
    """The user's dictionaries (one, a list, or ``{name: sae}``), checked against the model and
    sorted in forward order (by where they write).

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> [entry.site.name for entry in dictionary_entries(model, [sae])]   # named by site
        ['r0']
    """
    named: list[tuple[str | None, Any]]
    if isinstance(dictionaries, Mapping):
        named = [(str(k), v) for k, v in dictionaries.items()]
    elif isinstance(dictionaries, list | tuple):
        named = [(None, d) for d in dictionaries]
    else:
        named = [(None, dictionaries)]
    if not named:
        raise InvalidArgumentError(
            "Expected at least one SAE or transcoder; got none. Hint: pass one, a list, or "
            "{name: sae}."
        )
    out = []
    for name, sae in named:
        sites = sae_sites(sae)
        check_hooks(model, sites)
        site = dictionary_site(sites.in_hook, sites.out_hook, sites.d_sae, name)
        out.append(DictionaryEntry(site, sae, sites.d_in, sites.d_out))
    out.sort(key=lambda d: (d.site.writes, d.site.reads))
    FeatureLayout.build([d.site for d in out], [() for _ in out])  # names and hooks distinct
    return out


def node_parts(
    sae: SparseDictionaryLike,
    x: Float[Tensor, "batch pos d_in"],
    target: Float[Tensor, "batch pos d_out"],
) -> tuple[
    Float[Tensor, "batch pos d_sae"],
    Float[Tensor, "batch pos d_out"],
    Float[Tensor, "batch pos d_out"] | None,
]:
    """``(f, error, skip)`` of one activation: ``target = decode(f) + skip + error``.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> x = torch.randn(1, 3, 128)
        >>> f, error, skip = node_parts(sae, x, x)                 # an SAE reconstructs its input
        >>> torch.allclose(sae.decode(f) + error, x, atol=1e-5), skip is None
        (True, True)
    """
    f = sae.encode(x)
    skip = skip_term(sae, x)
    x_hat = sae.decode(f) if skip is None else sae.decode(f) + skip
    return f, target - x_hat, skip


def dictionary_hooks(
    entries: list[DictionaryEntry],
    write: Callable[[int, Tensor, Tensor], Tensor | None],
    input_hook: Callable[[Tensor], Tensor | None] | None = None,
) -> list[tuple[str, Callable[..., Any]]]:
    """Forward hooks calling ``write(k, x_in, target)`` at dictionary ``k``'s output hook, with
    ``x_in`` its input (as rows, in the dictionary's dtype) and ``target`` the activation it
    reconstructs; a tensor returned replaces the activation. ``input_hook`` sees (and may
    replace) the residual stream entering block 0.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> seen = []
        >>> hooks = dictionary_hooks(entries, lambda k, x, target: seen.append(x.shape))
        >>> with model.hooks(fwd_hooks=hooks):
        ...     _ = model(tokens)
        >>> seen
        [torch.Size([1, 4, 128])]
    """
    held: dict[int, Tensor] = {}
    hooks: list[tuple[str, Callable[..., Any]]] = []
    if input_hook is not None:
        hooks.append((INPUT_HOOK, lambda act, hook: input_hook(act)))

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
class NodeValues:
    """Per-batch node values (or their gradients): ``x0 (batch, pos, d_model)``, and per
    dictionary ``f[k] (batch, pos, d_sae)`` and ``e[k] (batch, pos, d_out)``.

    Example:
        >>> v = NodeValues(torch.ones(1, 2, 3), [torch.ones(1, 2, 4)], [torch.ones(1, 2, 3)])
        >>> v.minus(v.map(torch.zeros_like)).f[0].sum()
        tensor(8.)
    """

    x0: Tensor
    f: list[Tensor]
    e: list[Tensor]

    def map(self, fn: Callable[[Tensor], Tensor]) -> NodeValues:
        """``fn`` applied to every tensor."""
        return NodeValues(fn(self.x0), [fn(t) for t in self.f], [fn(t) for t in self.e])

    def minus(self, other: NodeValues) -> NodeValues:
        """``self - other``, tensor by tensor."""
        return NodeValues(
            self.x0 - other.x0,
            [a - b for a, b in zip(self.f, other.f, strict=True)],
            [a - b for a, b in zip(self.e, other.e, strict=True)],
        )


@torch.no_grad()
def record_nodes(
    model: Model, entries: list[DictionaryEntry], tokens: Int[Tensor, "batch pos"]
) -> tuple[NodeValues, Float[Tensor, "batch pos d_vocab"]]:
    """Node values and logits of an un-intervened run.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> values, logits = record_nodes(model, entries, tokens)
        >>> values.x0.shape, values.f[0].shape, logits.shape  # d_model, d_sae, d_vocab
        (torch.Size([1, 4, 128]), torch.Size([1, 4, 64]), torch.Size([1, 4, 500]))
    """
    f: list[Any] = [None] * len(entries)
    e: list[Any] = [None] * len(entries)
    x0: list[Tensor] = []

    def write(k: int, x: Tensor, target: Tensor) -> None:
        f[k], e[k], _ = node_parts(entries[k].sae, x, target)

    hooks = dictionary_hooks(entries, write, lambda act: x0.append(act.detach()))
    with hook_scope(model, fwd_hooks=hooks):
        logits = model(tokens)
    return NodeValues(x0[0], f, e), logits


def ablated_values(
    model: Model, entries: list[DictionaryEntry], contrast: Contrast
) -> Callable[[slice, NodeValues], tuple[NodeValues, Tensor | None]]:
    """``(rows, clean values) -> (ablated values, the corrupt run's logits or None)`` for the
    contrast's ablation: the corrupt run's values, the reference mean (per position when the
    reference prompts allow it, :func:`mechkit.core.reference_mean`), or zero.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> from mechkit.core import resolve_contrast
        >>> contrast = resolve_contrast(model, tokens, None, lambda lg: lg[:, -1, 0].mean(),
        ...                             ablation="zero")
        >>> clean, _ = record_nodes(model, entries, tokens)
        >>> away, corrupt_logits = ablated_values(model, entries, contrast)(slice(0, 1), clean)
        >>> float(away.f[0].abs().sum()), corrupt_logits is None
        (0.0, True)
    """
    if contrast.ablation == "corrupt":
        source = contrast.corrupt_tokens
        assert source is not None  # resolve_contrast requires corrupt prompts for "corrupt"
        return lambda rows, clean: record_nodes(model, entries, source[rows])
    if contrast.ablation == "zero":
        return lambda rows, clean: (clean.map(torch.zeros_like), None)
    assert contrast.reference_tokens is not None and contrast.reference_mask is not None
    values, _ = record_nodes(model, entries, contrast.reference_tokens)
    seq = contrast.clean_tokens.shape[1]
    mask = contrast.reference_mask
    means = values.map(lambda t: reference_mean(t, mask, seq))  # (1, seq or 1, width)

    def mean(rows: slice, clean: NodeValues) -> tuple[NodeValues, None]:
        return (
            NodeValues(
                means.x0.expand_as(clean.x0),
                [m.expand_as(t) for m, t in zip(means.f, clean.f, strict=True)],
                [m.expand_as(t) for m, t in zip(means.e, clean.e, strict=True)],
            ),
            None,
        )

    return mean


def summed_metric(
    metric: Any, logits: Float[Tensor, "batch pos d_vocab"], n: int
) -> Float[Tensor, ""]:
    """The metric summed over the batch's ``n`` prompts (its mean times ``n``).

    Example:
        >>> summed_metric(lambda logits: logits[:, -1, 0], torch.ones(3, 2, 5), 3)  # 3 x mean
        tensor(3.)
    """
    return mean_value(metric, logits) * n


def input_leaf() -> tuple[list[Tensor], Callable[[Tensor], Tensor]]:
    """A hook making the residual entering block 0 a leaf, and the list it is kept in.

    Example:
        >>> held, leaf = input_leaf()
        >>> leaf(torch.zeros(1, 2, 3)).requires_grad, len(held)
        (True, 1)
    """
    held: list[Tensor] = []

    def leaf(act: Tensor) -> Tensor:
        held.append(act.detach().requires_grad_(True))
        return held[-1]

    return held, leaf


def node_gradients(
    model: Model, entries: list[DictionaryEntry], tokens: Int[Tensor, "batch pos"], metric: Any
) -> tuple[NodeValues, NodeValues, float]:
    """Clean values, ``∂M/∂v`` for every node (M summed over prompts) and M itself, the error
    and latents held apart: ``x = decode(f) + skip + error`` with ``f`` and ``error`` separate
    tensors.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> metric = lambda lg: lg[:, -1, 0].mean()
        >>> values, grads, value = node_gradients(model, entries, tokens, metric)
        >>> grads.f[0].shape == values.f[0].shape, isinstance(value, float)
        (True, True)
    """
    f: list[Any] = [None] * len(entries)
    e: list[Any] = [None] * len(entries)
    x0, leaf = input_leaf()

    def write(k: int, x: Tensor, target: Tensor) -> Tensor:
        sae = entries[k].sae
        f[k] = sae.encode(x)  # read only by the decoder below: its gradient is the latents'
        _, e[k], skip = node_parts(sae, x, target)  # the error: its own tensor, from x and target
        out = sae.decode(f[k]) + e[k]
        return out if skip is None else out + skip

    with torch.enable_grad(), hook_scope(model, fwd_hooks=dictionary_hooks(entries, write, leaf)):
        logits = model(tokens)
        value = summed_metric(metric, logits, tokens.shape[0])
        grads = torch.autograd.grad(value, [x0[0], *f, *e])
    n = len(entries)
    values = NodeValues(x0[0].detach(), [t.detach() for t in f], [t.detach() for t in e])
    return (
        values,
        NodeValues(grads[0], list(grads[1 : n + 1]), list(grads[n + 1 :])),
        float(value.detach()),
    )


def node_gradients_ig(
    model: Model,
    entries: list[DictionaryEntry],
    tokens: Int[Tensor, "batch pos"],
    metric: Any,
    clean: NodeValues,
    away: NodeValues,
    steps: int,
    bar: Any,
) -> NodeValues:
    """``∂M/∂v`` averaged over ``v = away + (k/steps) (clean - away)``, ``k = 1..steps``, one
    dictionary (or the input) moved at a time while the others compute normally.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> entries = dictionary_entries(model, {"r0": sae})
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> from mechkit.core import progress_bar
        >>> metric = lambda lg: lg[:, -1, 0].mean()
        >>> values, grads, _ = node_gradients(model, entries, tokens, metric)
        >>> away = values.map(torch.zeros_like)
        >>> one = node_gradients_ig(model, entries, tokens, metric, values, away, 1,
        ...                         progress_bar(0, "", enabled=False))  # one step: at clean
        >>> torch.allclose(one.f[0], grads.f[0], atol=1e-6)
        True
    """
    out = clean.map(torch.zeros_like)
    for moved in range(-1, len(entries)):  # -1: the input
        for k in range(1, steps + 1):
            grads = _ig_point(model, entries, tokens, metric, clean, away, moved, k / steps)
            bar.update(1)
            if moved == -1:
                out.x0 += grads[0] / steps
            else:
                out.f[moved] += grads[0] / steps
                out.e[moved] += grads[1] / steps
    return out


def _ig_point(
    model: Model,
    entries: list[DictionaryEntry],
    tokens: Int[Tensor, "batch pos"],
    metric: Any,
    clean: NodeValues,
    away: NodeValues,
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
            f, e, skip = held["f"], held["e"], skip_term(sae, x)
        else:  # computed from what reaches it, as in the model
            f, e, skip = node_parts(sae, x, target)
        out = sae.decode(f) + e
        return out if skip is None else out + skip

    with torch.enable_grad(), hook_scope(model, fwd_hooks=dictionary_hooks(entries, write, leaf)):
        value = summed_metric(metric, model(tokens), tokens.shape[0])
        wrt = [held["x0"]] if moved == -1 else [held["f"], held["e"]]
        return torch.autograd.grad(value, wrt)
