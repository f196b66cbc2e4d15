"""Sparse feature circuits: dictionary latents and error terms as the nodes of a circuit graph.

Marks et al. (2024, "Sparse Feature Circuits") splice sparse dictionaries (SAEs, transcoders)
into a model, each activation read as ``x = decode(f) + skip(x_in) + error``, and take every
latent and every dictionary's error term as a node. With ``M`` the metric on the clean run and
``Δv = v_ablated - v_clean`` for a node's value:

- **node score** ``IE(v) = Σ_pos Δv · ∂M/∂v`` (:mod:`mechkit.sae.feature_nodes`): the
  first-order effect on ``M`` of ablating ``v`` alone;
- **edge score** ``IE(u -> d)`` (:mod:`mechkit.sae.feature_edges`): the part of ``u``'s effect
  that passes through ``d`` first. A node's edges sum exactly to its node score.

Nodes are summed over positions (Marks et al.'s choice for prompts of differing templates).
The graph keeps the ``latents_per_dictionary`` latents of largest ``|IE|`` in each dictionary
(or those above ``node_threshold``) and every error term. Node names: ``input``, then
``<dictionary>.f<latent>`` (``r1.f12``) and ``<dictionary>.err``, then ``logits``; a dictionary
is named by the user (``{name: sae}``) or by its site (``r12``: the residual stream after block
12, ``m12``/``a12``: the MLP/attention output of block 12). The result is a
:class:`mechkit.CircuitGraph`; :mod:`mechkit.sae.feature_evaluation` measures faithfulness.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.batching import check_budget, each_batch, parse_budget, prompts_per_pass
from mechkit.core.inputs import Contrast, resolve_contrast
from mechkit.core.labels import metric_name, model_name
from mechkit.core.metrics import batch_metric
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, check_choice, check_positive_int
from mechkit.graph.circuit import CircuitGraph
from mechkit.graph.feature_layout import FeatureLayout
from mechkit.sae.feature_edges import edge_scores
from mechkit.sae.feature_evaluation import FeatureCircuitEvaluation, evaluate_feature_circuit
from mechkit.sae.feature_nodes import (
    FEATURE_ABLATIONS,
    DictionaryEntry,
    FeatureAblation,
    NodeValues,
    ablated_values,
    dictionary_entries,
    node_gradients,
    node_gradients_ig,
    summed_metric,
)

if TYPE_CHECKING:
    from mechkit.distributed import RayExecutor

# evaluate_feature_circuit and FeatureCircuitEvaluation lived here: importable from here still
__all__ = ["feature_circuit", "evaluate_feature_circuit", "FeatureCircuitEvaluation"]


def feature_circuit(
    model: Model,
    dictionaries: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    latents_per_dictionary: int = 20,
    node_threshold: float | None = None,
    ablation: FeatureAblation = "corrupt",
    direction: Literal["noising"] | None = None,
    reference: Any = None,
    method: Literal["attribution", "ig"] = "attribution",
    steps: int = 10,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
    executor: RayExecutor | None = None,
) -> CircuitGraph:
    """Score a sparse feature circuit: latents and error terms of spliced dictionaries as nodes.

    Args:
        model: a HookedTransformer.
        dictionaries: one SAE or transcoder, a list of them, or ``{name: sae}`` (names default
            to the site: ``r12`` after block 12, ``m12`` the MLP of block 12...).
        clean, corrupt, metric: a :class:`~mechkit.PromptPairs` (its logit difference the
            default metric), or prompts and a metric, as in :func:`mechkit.core.resolve_contrast`.
        latents_per_dictionary: how many latents of each dictionary become nodes, those of
            largest ``|node score|``.
        node_threshold: if given, instead every latent with ``|node score|`` at least this.
        ablation: the value a node is moved to: ``"corrupt"`` (its value on the corrupt prompt),
            ``"mean"`` (its mean over ``reference``) or ``"zero"``.
        direction: only ``"noising"`` (the default whatever the ablation): unlike the core's
            default of ``"denoising"`` for ``ablation="corrupt"``, the scores are gradients at
            the clean run times the move to the ablated value, as in Marks et al.
        reference: the prompts of ``ablation="mean"`` (default: the corrupt prompts, else the
            clean ones).
        method: ``"attribution"`` (gradients at the clean run) or ``"ig"``: integrated
            gradients (Marks et al.'s choice), each dictionary's latents and error moved
            together from the ablated to the clean value in ``steps`` steps and ``∂M/∂v``
            averaged over the points ``k/steps``, ``k = 1..steps`` (the edge Jacobians stay at
            the clean run, as in the paper). One step is exactly ``"attribution"``.
        steps: integration steps for ``"ig"``.
        batch_size: prompts per pass (None: all; splitting needs a mechkit Metric).
        memory_budget: bytes (or ``"2GB"``) for the stacked gradients of one batched backward
            pass of the edge pass (None: 256 MiB).
        progress: a progress bar over the passes (nodes, then one per receiving node).
        executor: a :class:`~mechkit.distributed.RayExecutor`: each batch of ``batch_size``
            prompts is one task on its actors (the model and dictionaries shipped once), its
            node pass kept there for its edge pass; the latents are chosen here from the
            summed node scores, as in one process.

    Returns:
        A :class:`mechkit.CircuitGraph` over a :class:`mechkit.graph.FeatureLayout`: ``scores``
        ``(sender, receiver)`` are edge effects on the mean metric, ``node_scores`` each node's
        effect (input, chosen latents, error terms).

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> clean = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        >>> corrupt = torch.tensor([[1, 9, 3, 4], [5, 9, 7, 8]])
        >>> graph = mk.feature_circuit(model, sae, clean, corrupt,
        ...                            lambda logits: logits[:, -1, 3].mean(),
        ...                            latents_per_dictionary=2, progress=False)
        >>> [node.name for node in graph.layout.senders]  # doctest: +ELLIPSIS
        ['input', 'r0.f...', 'r0.f...', 'r0.err']
        >>> # the input, the 2 latents of largest |score|, the error term; then the edges:
        >>> graph.scores.shape                            # (sender, receiver)
        torch.Size([4, 4])
    """
    if latents_per_dictionary < 0:
        raise InvalidArgumentError(
            f"Expected latents_per_dictionary >= 0; got {latents_per_dictionary}. Hint: 0 keeps "
            "only the error terms."
        )
    check_choice("method", method, ["attribution", "ig"])
    check_positive_int("steps", steps)
    check_budget(memory_budget)
    entries = dictionary_entries(model, dictionaries)
    contrast = resolve_contrast(
        model,
        clean,
        corrupt,
        metric,
        direction=direction,
        ablation=ablation,
        reference=reference,
        ablations=FEATURE_ABLATIONS,
        directions=("noising",),
    )
    n_batch = contrast.n_prompts
    size = prompts_per_pass(n_batch, batch_size, contrast.metric)
    budget = (
        None if memory_budget is None else parse_budget(memory_budget, model.cfg.device or "cpu")
    )
    n_ig = (len(entries) + 1) * steps if method == "ig" else 0
    node_sum = [torch.zeros(d.site.d_sae, dtype=torch.float64) for d in entries]
    err_sum = torch.zeros(len(entries), dtype=torch.float64)
    totals = {"input": 0.0, "clean": 0.0, "source": 0.0}

    def add(sums: _NodeSums) -> None:
        for k in range(len(entries)):
            node_sum[k] += sums.latents[k]
        err_sum.add_(sums.errors)
        for name in totals:
            totals[name] += getattr(sums, name)

    if executor is None:
        ablated = ablated_values(model, entries, contrast)
        cache: list[tuple[slice, NodeValues, NodeValues]] = []

        def nodes(rows: slice) -> None:
            delta, grads, sums = _node_pass(
                model, entries, contrast, ablated, rows, method, steps, bar
            )
            cache.append((rows, delta, grads))  # nothing is kept from a batch that failed
            bar.update(1)
            add(sums)

        with progress_bar(
            -(-n_batch // size) * (1 + n_ig), "feature circuit: nodes", enabled=progress
        ) as bar:
            each_batch(n_batch, size, nodes)
        chosen = [_choose(s / n_batch, latents_per_dictionary, node_threshold) for s in node_sum]
        n_receivers = sum(len(c) + 1 for c in chosen) + 1

        scores = torch.zeros(1, dtype=torch.float64)
        with progress_bar(
            len(cache) * n_receivers, "feature circuit: edges", enabled=progress
        ) as bar:
            for rows, delta, grads in cache:
                tokens = contrast.clean_tokens[rows]
                m = batch_metric(contrast.metric, rows, n_batch)
                scores = scores + edge_scores(
                    model, entries, tokens, m, chosen, delta, grads, bar, budget=budget
                )
    else:  # each batch one task, its node pass kept on the actor for its edge pass
        call = uuid.uuid4().hex
        inputs = executor.share(
            (dictionaries, (clean, corrupt, metric), {"ablation": ablation, "reference": reference})
        )
        batches = [slice(i, min(i + size, n_batch)) for i in range(0, n_batch, size)]
        node_tasks = [(call, inputs, rows, method, steps) for rows in batches]
        for _, sums in executor.map(model, _nodes_on_actor, node_tasks):
            add(sums)
        chosen = [_choose(s / n_batch, latents_per_dictionary, node_threshold) for s in node_sum]
        edge_tasks = [(*task, chosen, budget) for task in node_tasks]
        scores = torch.zeros(1, dtype=torch.float64)
        for _, part in executor.map(model, _edges_on_actor, edge_tasks):
            scores = scores + part
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
        ablation=contrast.ablation,
        metric_name=metric_name(contrast.metric),
        clean_score=totals["clean"] / n_batch,
        ablated_score=totals["source"] / n_batch if contrast.ablation == "corrupt" else None,
        model_name=model_name(model),
        node_scores=node_scores,
    )


@dataclasses.dataclass
class _NodeSums:
    """One batch's node scores summed over its prompts (divided by all prompts' count later)."""

    latents: list[Tensor]  # per dictionary, (d_sae,) float64
    errors: Tensor  # (dictionary,) float64
    input: float
    clean: float
    source: float


def _node_pass(
    model: Model,
    entries: list[DictionaryEntry],
    contrast: Contrast,
    ablated: Any,
    rows: slice,
    method: str,
    steps: int,
    bar: Any,
) -> tuple[NodeValues, NodeValues, _NodeSums]:
    """The node pass of prompts ``rows``: the move to the ablated values, the gradients, and the
    batch's summed node scores."""
    n_batch = contrast.n_prompts
    tokens = contrast.clean_tokens[rows]
    m = batch_metric(contrast.metric, rows, n_batch)
    values, grads, clean_value = node_gradients(model, entries, tokens, m)
    away, source_logits = ablated(rows, values)
    if method == "ig":
        grads = node_gradients_ig(model, entries, tokens, m, values, away, steps, bar)
    delta = away.minus(values)
    source_value = 0.0
    if source_logits is not None:  # the corrupt run, read while recording its nodes
        with torch.no_grad():
            source_value = float(summed_metric(m, source_logits, tokens.shape[0]))
    sums = _NodeSums(
        latents=[(delta.f[k] * grads.f[k]).sum((0, 1)).double().cpu() for k in range(len(entries))],
        errors=torch.tensor(
            [float((delta.e[k] * grads.e[k]).sum()) for k in range(len(entries))],
            dtype=torch.float64,
        ),
        input=float((delta.x0 * grads.x0).sum()),
        clean=clean_value,
        source=source_value,
    )
    return delta, grads, sums


def _actor_setup(model: Model, cache: dict, call: str, inputs: tuple) -> tuple:
    """On an actor: this call's dictionaries, contrast and ablated values (made once)."""
    if cache.get("feature_circuit", (None,))[0] != call:
        dictionaries, (clean, corrupt, metric), options = inputs
        entries = dictionary_entries(model, dictionaries)
        contrast = resolve_contrast(
            model,
            clean,
            corrupt,
            metric,
            direction="noising",
            ablations=FEATURE_ABLATIONS,
            directions=("noising",),
            **options,
        )
        passes: dict[tuple[int, int], tuple[NodeValues, NodeValues]] = {}
        setup = (entries, contrast, ablated_values(model, entries, contrast), passes)
        cache["feature_circuit"] = (call, setup)  # one call's batches at a time
    return cache["feature_circuit"][1]


def _nodes_on_actor(
    model: Model, cache: dict, call: str, inputs: tuple, rows: slice, method: str, steps: int
) -> _NodeSums:
    """On an actor: the node pass of one batch (kept for its edge pass)."""
    entries, contrast, ablated, passes = _actor_setup(model, cache, call, inputs)
    bar = progress_bar(0, "", enabled=False)
    delta, grads, sums = _node_pass(model, entries, contrast, ablated, rows, method, steps, bar)
    passes[(rows.start, rows.stop)] = (delta, grads)
    return sums


def _edges_on_actor(
    model: Model,
    cache: dict,
    call: str,
    inputs: tuple,
    rows: slice,
    method: str,
    steps: int,
    chosen: list[Tensor],
    budget: int | None,
) -> Tensor:
    """On an actor: one batch's edge scores (its node pass redone if another actor ran it)."""
    entries, contrast, ablated, passes = _actor_setup(model, cache, call, inputs)
    found = passes.pop((rows.start, rows.stop), None)
    bar = progress_bar(0, "", enabled=False)
    if found is None:
        delta, grads, _ = _node_pass(model, entries, contrast, ablated, rows, method, steps, bar)
    else:
        delta, grads = found
    tokens = contrast.clean_tokens[rows]
    m = batch_metric(contrast.metric, rows, contrast.n_prompts)
    return edge_scores(model, entries, tokens, m, chosen, delta, grads, bar, budget=budget)


def _choose(scores: Float[Tensor, " d_sae"], n: int, threshold: float | None) -> Tensor:
    """Latent indices by decreasing ``|score|``: the top ``n``, or all above ``threshold``."""
    order = scores.abs().argsort(descending=True, stable=True)
    if threshold is not None:
        return order[scores.abs()[order] >= threshold]
    return order[: min(n, len(order))]


@torch.no_grad()
def _describe(model: Model, entries: list[DictionaryEntry], chosen: list[Tensor]) -> dict[str, str]:
    """For latents writing the residual's width: the tokens their decoder rows promote most
    through the unembedding (the final norm's scale ignored)."""
    out: dict[str, str] = {}
    tokenizer = model.tokenizer
    if tokenizer is None:
        return out
    w_u = model.W_U  # (d_model, d_vocab)
    for d, picked in zip(entries, chosen, strict=True):
        if d.d_out != model.cfg.d_model or not len(picked):
            continue
        rows = d.sae.W_dec[picked].to(w_u.device, w_u.dtype) @ w_u  # (n, d_vocab)
        top = rows.topk(3, dim=-1).indices.tolist()
        for i, ids in zip(picked.tolist(), top, strict=True):
            tokens = ", ".join(repr(tokenizer.decode([t])) for t in ids)
            out[f"{d.site.name}.f{i}"] = f"promotes {tokens}"
    return out
