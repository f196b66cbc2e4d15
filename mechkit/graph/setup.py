"""The checked inputs of a graph run, and the metric of circuits run on them.

Every edge-attribution method and both circuit evaluations start from an :class:`EdgeSetup`: the
core's :class:`~mechkit.core.Contrast` (prompts, metric, ablation, reference set) plus each
sender's clean output and the value an ablated edge carries instead, ``(batch or 1, pos or 1,
sender, d_model)``: the sender's output on the corrupt prompt, its mean over the reference
prompts (:func:`~mechkit.core.reference_mean`), or zero. Edges are scored and circuits run by
noising: the clean prompts run and dropped edges carry the ablated value.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.core import (
    Contrast,
    Model,
    each_batch,
    is_out_of_memory,
    parse_budget,
    prompts_per_pass,
    reference_mean,
    resolve_contrast,
)
from mechkit.core.metrics import batch_metric, mean_value
from mechkit.errors import InvalidArgumentError
from mechkit.graph.layout import GraphLayout
from mechkit.graph.runs import masked_logits, sender_outputs
from mechkit.metrics import Metric

__all__ = [
    "EdgeSetup",
    "EDGE_ABLATIONS",
    "edge_setup",
    "resolve_edge_contrast",
    "batch_metric",
    "mean_value",
    "circuit_values",
    "batched_circuit_values",
    "all_ablated_score",
]

EDGE_ABLATIONS: tuple[str, ...] = ("corrupt", "mean", "zero")
"""What a dropped edge can carry. ``"resample"`` is not offered: an edge carries one value per
prompt and position, and a resampled one would make scores depend on the draw."""


@dataclasses.dataclass(frozen=True, eq=False)
class EdgeSetup:
    """Checked inputs of a graph run.

    Attributes:
        layout: the model's graph.
        contrast: the core's resolved inputs (tokens, metric, ablation, reference set).
        clean_senders: every sender's output on the clean prompts.
        ablated: what an ablated edge carries instead.
        batch_size: prompts per pass.
        memory_budget: bytes for the circuits run side by side (exact scores, evaluations).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> setup = edge_setup(model, resolve_edge_contrast(model, torch.tensor([[1, 2, 3]]),
        ...     None, lambda logits: logits[:, -1, 0].mean(), ablation="zero"))
        >>> tuple(setup.clean_senders.shape), tuple(setup.ablated.shape)
        ((1, 3, 9, 128), (1, 1, 9, 128))
    """

    layout: GraphLayout
    contrast: Contrast
    clean_senders: Float[Tensor, "batch pos sender d_model"]
    ablated: Float[Tensor, "batch_or_1 pos_or_1 sender d_model"]
    batch_size: int
    memory_budget: int

    @property
    def clean_tokens(self) -> Int[Tensor, "batch pos"]:
        return self.contrast.clean_tokens

    @property
    def metric(self) -> Any:
        return self.contrast.metric

    @property
    def ablation(self) -> str:
        return self.contrast.ablation

    @property
    def n_prompts(self) -> int:
        return self.contrast.n_prompts

    def ablated_rows(self, rows: slice) -> Float[Tensor, "batch_or_1 pos_or_1 sender d_model"]:
        """The ablated values of these prompts (all of them when shared by every prompt)."""
        return self.ablated if self.ablated.shape[0] == 1 else self.ablated[rows]

    def each_batch(self, work: Callable[[slice], None]) -> None:
        """``work(rows)`` per batch of prompts (split in halves on running out of memory, when
        the metric can be restricted to a batch)."""
        can_split = isinstance(self.metric, Metric)
        each_batch(self.n_prompts, self.batch_size, work, can_split=can_split)


def resolve_edge_contrast(
    model: Model,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    direction: str | None = None,
    ablation: str | None = None,
    reference: Any = None,
) -> Contrast:
    """The core's :func:`~mechkit.core.resolve_contrast` for graphs: noising only, with the
    ablations an edge can carry (``"corrupt"``, ``"mean"``, ``"zero"``).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> c = resolve_edge_contrast(model, torch.tensor([[1, 2]]), torch.tensor([[1, 5]]),
        ...                           lambda logits: logits[:, -1, 0].mean())
        >>> c.direction, c.ablation
        ('noising', 'corrupt')
    """
    if direction == "denoising":
        raise InvalidArgumentError(
            "Expected direction='noising' (or None) for a graph: an edge's score is the change "
            "when it alone carries the ablated value in the clean run, and a circuit is run with "
            "every edge outside it ablated; got direction='denoising'. Hint: leave direction out."
        )
    return resolve_contrast(
        model,
        clean,
        corrupt,
        metric,
        direction=direction,
        ablation=ablation,
        reference=reference,
        ablations=EDGE_ABLATIONS,
        directions=("noising",),
    )


def edge_setup(
    model: Model,
    contrast: Contrast,
    *,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> EdgeSetup:
    """The senders' clean and ablated outputs for a resolved contrast (the passes they take run
    here, after every check).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> c = resolve_edge_contrast(model, torch.tensor([[1, 2], [3, 4]]), None,
        ...                           lambda logits: logits[:, -1, 0].mean(), ablation="mean")
        >>> setup = edge_setup(model, c)
        >>> torch.allclose(setup.ablated[0], setup.clean_senders.mean(0), atol=1e-5)
        True
    """
    layout = GraphLayout.from_model(model)
    size = prompts_per_pass(contrast.n_prompts, batch_size, contrast.metric)
    budget = parse_budget(memory_budget, contrast.clean_tokens.device)
    clean_senders = _senders_in_batches(model, layout, contrast.clean_tokens, size)
    if contrast.ablation == "corrupt":
        assert contrast.corrupt_tokens is not None  # resolve_contrast requires them
        ablated = _senders_in_batches(model, layout, contrast.corrupt_tokens, size)
    elif contrast.ablation == "zero":
        ablated = torch.zeros_like(clean_senders[:1, :1])
    else:
        assert contrast.reference_tokens is not None and contrast.reference_mask is not None
        reference = _senders_in_batches(model, layout, contrast.reference_tokens, size)
        ablated = reference_mean(reference, contrast.reference_mask, contrast.clean_tokens.shape[1])
    return EdgeSetup(layout, contrast, clean_senders, ablated, size, budget)


def _senders_in_batches(
    model: Model, layout: GraphLayout, tokens: Tensor, size: int
) -> Float[Tensor, "batch pos sender d_model"]:
    parts: list[Tensor] = []
    each_batch(
        len(tokens), size, lambda rows: parts.append(sender_outputs(model, layout, tokens[rows]))
    )
    return torch.cat(parts)


def circuit_values(
    model: Model,
    setup: EdgeSetup,
    tokens: Int[Tensor, "batch pos"],
    ablated: Float[Tensor, "batch_or_1 pos_or_1 sender d_model"],
    metric: Any,
    keeps: list[Bool[Tensor, "sender receiver"]],
    bar: Any = None,
) -> Float[Tensor, " circuit"]:
    """The mean metric on ``tokens`` of each kept-edge mask in ``keeps``: ``(circuit,)``
    float64.

    Circuits share batched runs, as many as fit ``setup.memory_budget``; a run that does not fit
    is split in two and retried.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> setup = edge_setup(model, resolve_edge_contrast(model, tokens, None,
        ...     lambda logits: logits[:, -1, 0].mean(), ablation="zero"))
        >>> full = setup.layout.valid
        >>> values = circuit_values(model, setup, tokens, setup.ablated, setup.metric, [full])
        >>> torch.allclose(values.float(), model(tokens)[:, -1, 0], atol=1e-4)
        True
    """
    layout = setup.layout
    n_batch, seq = tokens.shape
    per_circuit = n_batch * seq * (len(layout.senders) * layout.d_model * 4 * 3
                                   + model.cfg.d_vocab * 4)  # fmt: skip
    size = max(1, int(setup.memory_budget // max(1, per_circuit)))
    out = torch.zeros(len(keeps), dtype=torch.float64)
    first = 0
    while first < len(keeps):
        part = keeps[first : first + size]
        try:
            n_circ = len(part)
            read = functools.partial(_per_circuit, metric, n_circuits=n_circ)
            values = masked_logits(
                model, layout, tokens, ablated, torch.stack(part).to(tokens.device), read
            )
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc) or len(part) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(1, len(part) // 2)
            continue
        out[first : first + len(part)] = values[:, 0, 0].double().cpu()
        if bar is not None:
            bar.update(len(part))
        first += len(part)
    return out


def _per_circuit(metric: Any, logits: Tensor, *, n_circuits: int) -> Tensor:
    """The mean metric of each circuit's rows: logits are ``(circuit * batch, ...)``; returns
    ``(circuit * batch, 1)``, each circuit's value repeated over its rows."""
    n_batch = logits.shape[0] // n_circuits
    values = [
        mean_value(metric, logits[c * n_batch : (c + 1) * n_batch]) for c in range(n_circuits)
    ]
    return torch.stack(values).repeat_interleave(n_batch)[:, None]  # (circuit,) -> rows


@torch.no_grad()
def batched_circuit_values(
    model: Model, setup: EdgeSetup, keeps: list[Bool[Tensor, "sender receiver"]]
) -> Float[Tensor, " circuit"]:
    """The metric over all prompts for each kept-edge mask: ``(circuit,)`` float64.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> setup = edge_setup(model, resolve_edge_contrast(model, tokens, None,
        ...     lambda logits: logits[:, -1, 0].mean(), ablation="zero"))
        >>> values = batched_circuit_values(model, setup, [setup.layout.valid])
        >>> torch.allclose(values.float(), model(tokens)[:, -1, 0].mean(), atol=1e-4)
        True
    """
    n_prompts = setup.n_prompts
    totals = torch.zeros(len(keeps), dtype=torch.float64)

    def work(rows: slice) -> None:
        metric = batch_metric(setup.metric, rows, n_prompts)
        tokens = setup.clean_tokens[rows]
        values = circuit_values(model, setup, tokens, setup.ablated_rows(rows), metric, keeps)
        totals.add_(values * (rows.stop - rows.start) / n_prompts)

    setup.each_batch(work)
    return totals


def all_ablated_score(model: Model, setup: EdgeSetup) -> float:
    """The metric with every edge ablated (the corrupt run itself for corrupt ablation).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> clean, corrupt = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 7, 3]])
        >>> metric = lambda logits: logits[:, -1, 0].mean()
        >>> setup = edge_setup(model, resolve_edge_contrast(model, clean, corrupt, metric))
        >>> abs(all_ablated_score(model, setup) - float(metric(model(corrupt)).detach())) < 1e-4
        True
    """
    return float(batched_circuit_values(model, setup, [torch.zeros_like(setup.layout.valid)])[0])
