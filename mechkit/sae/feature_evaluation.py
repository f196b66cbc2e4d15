"""Faithfulness of sparse feature circuits (Marks et al. 2024): nodes outside a circuit ablated.

``faithfulness = (M(C) - M(∅)) / (M(model) - M(∅))`` with ``M(C)`` the mean metric when every
latent and error term outside the circuit ``C`` carries its ablated value (the nodes in ``C``
computed normally from what reaches them) and ``M(∅)`` with every node ablated (the input is
never ablated). The counterpart of :func:`mechkit.evaluate_circuit` for feature circuits.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

from mechkit.core.batching import each_batch, prompts_per_pass
from mechkit.core.inputs import resolve_contrast
from mechkit.core.metrics import batch_metric
from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, InvalidTypeError, SiteNotFoundError, did_you_mean
from mechkit.graph.circuit import CircuitGraph
from mechkit.hook_scope import hook_scope
from mechkit.sae.feature_nodes import (
    FEATURE_ABLATIONS,
    DictionaryEntry,
    FeatureAblation,
    NodeValues,
    ablated_values,
    dictionary_entries,
    dictionary_hooks,
    node_parts,
    record_nodes,
    summed_metric,
)

__all__ = ["evaluate_feature_circuit", "FeatureCircuitEvaluation"]


@dataclasses.dataclass(frozen=True)
class FeatureCircuitEvaluation:
    """Faithfulness of one or several feature circuits (module docstring).

    Attributes:
        rows: per circuit, ``(n_nodes, faithfulness, circuit_score)``.
        model_score, ablated_score: ``M(model)`` and ``M(∅)`` (every node ablated; named as in
            :class:`mechkit.graph.CircuitEvaluation`; ``empty_score`` is its old name).
        ablation: the ablated value (``corrupt``, ``mean``, ``zero``).
        nodes: per circuit, its node names.

    Example:
        >>> ev = FeatureCircuitEvaluation(((2, 0.5, 1.0), (5, 0.9, 1.8)), 2.0, 0.0, "zero",
        ...                               (("r0.f1", "r0.err"), ()))
        >>> ev.faithfulness, ev.top(1)                  # circuits by faithfulness
        (0.5, [(1, 0.9)])
    """

    rows: tuple[tuple[int, float, float], ...]
    model_score: float
    ablated_score: float
    ablation: str
    nodes: tuple[tuple[str, ...], ...]

    @property
    def empty_score(self) -> float:
        """Deprecated name of :attr:`ablated_score`."""
        warnings.warn(
            "FeatureCircuitEvaluation.empty_score is deprecated; use ablated_score (the name "
            "CircuitEvaluation uses).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.ablated_score

    @property
    def faithfulness(self) -> float:
        """The first (or only) circuit's faithfulness."""
        return self.rows[0][1]

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[int, float]]:
        """The ``n`` circuits of highest faithfulness as ``(index of the circuit, faithfulness)``,
        by the rule of :func:`mechkit.core.rank`."""
        return rank(list(range(len(self.rows))), [r[1] for r in self.rows], n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per circuit: ``n_nodes``, ``faithfulness``, ``circuit_score``."""
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
    model: Model,
    dictionaries: Any,
    circuits: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    ablation: FeatureAblation | None = None,
    direction: str | None = None,
    reference: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> FeatureCircuitEvaluation:
    """Faithfulness of one or several feature circuits (Marks et al. 2024, node ablation).

    Args:
        model, dictionaries: as given to :func:`mechkit.feature_circuit`.
        circuits: a :class:`CircuitGraph` from :func:`mechkit.feature_circuit` (its selected
            edges' nodes: :meth:`~mechkit.CircuitGraph.nodes_in_circuit`), a list of node names
            (``"r12.f345"``, ``"r12.err"``), or a list of either.
        clean, corrupt, metric, direction, reference, batch_size: as for
            :func:`mechkit.feature_circuit`.
        ablation: what the nodes outside a circuit carry (None: the first graph's own ablation,
            as :func:`mechkit.evaluate_circuit` does, else ``"corrupt"``).
        progress: a progress bar over the batches (off by default: one pass per circuit).

    Returns:
        A :class:`FeatureCircuitEvaluation`; the input is never ablated.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> clean = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        >>> every = [f"r0.f{i}" for i in range(64)] + ["r0.err"]
        >>> ev = mk.evaluate_feature_circuit(model, sae, [every, []], clean, None,
        ...                                  lambda logits: logits[:, -1, 3].mean(),
        ...                                  ablation="zero")
        >>> [(n, round(f, 3) + 0.0) for n, f, _ in ev.rows]  # (nodes, faithfulness): the extremes
        [(65, 1.0), (0, 0.0)]
    """
    many = isinstance(circuits, list) and circuits and not isinstance(circuits[0], str)
    circuit_list = circuits if many else [circuits]
    first = circuit_list[0]
    if ablation is None:  # the graph's own, as evaluate_circuit does
        chosen = first.ablation if isinstance(first, CircuitGraph) else "corrupt"
    else:
        chosen = ablation
    entries = dictionary_entries(model, dictionaries)
    contrast = resolve_contrast(
        model,
        clean,
        corrupt,
        metric,
        direction=direction,
        ablation=chosen,
        reference=reference,
        ablations=FEATURE_ABLATIONS,
        directions=("noising",),
    )
    node_sets = [_node_names(c) for c in circuit_list]
    names = {d.site.name: k for k, d in enumerate(entries)}
    keeps = [_keep_masks(nodes, entries, names) for nodes in node_sets]
    none_kept = [(torch.zeros(d.site.d_sae, dtype=torch.bool), False) for d in entries]
    runs = [none_kept, *keeps]
    n_batch = contrast.n_prompts
    size = prompts_per_pass(n_batch, batch_size, contrast.metric)
    ablated = ablated_values(model, entries, contrast)
    sums = [0.0] * (1 + len(runs))  # the model, then each run

    def work(rows: slice) -> None:
        tokens = contrast.clean_tokens[rows]
        m = batch_metric(contrast.metric, rows, n_batch)
        clean_values, clean_logits = record_nodes(model, entries, tokens)  # every node kept
        away, _ = ablated(rows, clean_values)
        got = [float(summed_metric(m, clean_logits, tokens.shape[0]))]
        got += [_ablated_run(model, entries, tokens, m, keep, away) for keep in runs]
        for i, value in enumerate(got):
            sums[i] += value
        bar.update(1)

    with progress_bar(-(-n_batch // size), "feature circuit: evaluation", enabled=progress) as bar:
        each_batch(n_batch, size, work)
    scores = [s / n_batch for s in sums]
    full, empty = scores[0], scores[1]
    span = full - empty
    rows = tuple(
        (len(nodes), (score - empty) / span if span else float("nan"), score)
        for nodes, score in zip(node_sets, scores[2:], strict=True)
    )
    return FeatureCircuitEvaluation(rows, full, empty, contrast.ablation, tuple(node_sets))


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
    nodes: tuple[str, ...], entries: list[DictionaryEntry], names: dict[str, int]
) -> list[tuple[Tensor, bool]]:
    """Per dictionary, ``(latents kept (d_sae,), error kept)``; unknown names raise."""
    latents = [torch.zeros(d.site.d_sae, dtype=torch.bool) for d in entries]  # (d_sae,) each
    errors = [False] * len(entries)
    for node in nodes:
        dictionary, _, part = node.partition(".")
        k = names.get(dictionary)
        if k is None or not (part == "err" or (part[:1] == "f" and part[1:].isdigit())):
            raise SiteNotFoundError(
                f"Expected nodes '<dictionary>.f<latent>' or '<dictionary>.err' with "
                f"dictionaries {sorted(names)}; got {node!r}."
                + (
                    did_you_mean(dictionary, names)
                    or " Hint: the names are those of graph.layout.nodes."
                )
            )
        if part == "err":
            errors[k] = True
        else:
            i = int(part[1:])
            if not 0 <= i < entries[k].site.d_sae:
                raise InvalidArgumentError(
                    f"Expected a latent of {dictionary!r} in [0, {entries[k].site.d_sae}); got "
                    f"{i}. Hint: latents are numbered 0..d_sae-1."
                )
            latents[k][i] = True
    return list(zip(latents, errors, strict=True))


@torch.no_grad()
def _ablated_run(
    model: Model,
    entries: list[DictionaryEntry],
    tokens: Tensor,
    metric: Any,
    keep: list[tuple[Tensor, bool]],
    away: NodeValues,
) -> float:
    """The metric (summed over prompts) with the nodes outside ``keep`` ablated."""

    def write(k: int, x: Tensor, target: Tensor) -> Tensor:
        sae = entries[k].sae
        f, e, skip = node_parts(sae, x, target)
        kept_f, kept_e = keep[k]
        f = torch.where(kept_f.to(f.device), f, away.f[k].to(f.dtype))
        e = e if kept_e else away.e[k].to(e.dtype)
        out = sae.decode(f) + e
        return out if skip is None else out + skip

    with hook_scope(model, fwd_hooks=dictionary_hooks(entries, write)):
        logits = model(tokens)
    return float(summed_metric(metric, logits, tokens.shape[0]))
