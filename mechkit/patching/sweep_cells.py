"""The pieces of a sweep that both runners share: batches of prompt pairs, one (entry, batch)'s
plan, its journal record, and an entry's result assembled from the journal.

:mod:`mechkit.patching.sweep` runs the cells in this process; :mod:`mechkit.patching.sweep_remote`
runs them as tasks on an executor's actors (``mechkit sweep --ray``). Both plan an (entry, batch)
with :func:`plan_batch` and assemble with :func:`assemble`, so their results agree. Nothing here
is public API (``__all__`` is empty).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mechkit.core.labels import model_name
from mechkit.core.types import Model
from mechkit.errors import FileFormatError, MechkitError, SweepConfigError
from mechkit.patching.activation import PaddedPrompts, PatchPlan, plan_cells, plan_patch
from mechkit.patching.result import PatchResult
from mechkit.patching.sweep_config import METRICS, SweepConfig, SweepEntry, lower_first
from mechkit.prompts import PromptPairs

__all__: list[str] = []


def batch_slices(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def batch_rows(pairs: PromptPairs, rows: slice) -> PromptPairs:
    """Rows of ``pairs`` at the full padded width, so a position means the same in each batch."""
    if rows == slice(0, len(pairs)):
        return pairs
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(pairs):
        value = getattr(pairs, field.name)
        if isinstance(value, torch.Tensor | tuple):
            changes[field.name] = value[rows]
    return dataclasses.replace(pairs, **changes)


def positions_arg(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def count_cells(model: Model, entry: SweepEntry, index: int, seq: int) -> int:
    """The entry's number of cells; checks its layers, heads, neurons, positions on ``model``."""
    cfg = model.cfg
    heads = (cfg.n_key_value_heads or cfg.n_heads) if entry.site in ("k", "v") else cfg.n_heads
    sizes = {"layers": cfg.n_layers, "heads": heads, "neurons": cfg.d_mlp or 0}
    if isinstance(entry.positions, tuple):
        sizes["positions"] = seq
    for key, size in sizes.items():
        values = getattr(entry, key)
        bad = [v for v in values or () if not -size <= v < size]
        if bad:
            raise SweepConfigError(
                f"sweeps[{index}].{key}",
                f"expected values in [0, {size}) (negative counts from the end); got {bad} "
                f"({model_name(model)} has {size} {key}"
                + (" in the longest prompt" if key == "positions" else "")
                + ")",
            )
    try:
        _, _, planned = plan_cells(
            model,
            entry.site,
            positions_arg(entry.positions),
            entry.layers,
            entry.heads,
            entry.neurons,
            seq,
        )
    except MechkitError as exc:
        raise SweepConfigError(f"sweeps[{index}].site", lower_first(str(exc))) from None
    return len(planned)


def plan_record(plan: PatchPlan, entry: int, batch: int, rows: slice) -> dict[str, Any]:
    result = plan.result({c: (0.0, None) for c in plan.cells})  # labels and baselines only
    return {
        "kind": "plan",
        "entry": entry,
        "batch": batch,
        "rows": [rows.start, rows.stop],
        "cells": len(plan.cells),
        "axes": list(result.axes),
        "labels": result.labels,
        "tick_labels": result.tick_labels,
        "clean": result.clean_score,
        "corrupt": result.corrupt_score,
        "method": result.method,
        "site": result.site,
        "metric": result.metric_name,
    }


def assemble(entry: int, plans: dict, cells: dict) -> PatchResult:
    """One entry's result over every batch: size-weighted mean scores, per-prompt scores joined."""
    keys = sorted(k for k in plans if k[0] == entry)
    first = plans[keys[0]]
    axes = tuple(first["axes"])
    shape = tuple(len(first["labels"][a]) for a in axes)
    sizes = [plans[k]["rows"][1] - plans[k]["rows"][0] for k in keys]
    total = sum(sizes)
    scores = torch.zeros(shape, dtype=torch.float64)
    per_prompt: torch.Tensor | None = torch.full((*shape, total), float("nan"))
    offset = 0
    for key, size in zip(keys, sizes, strict=True):
        done = cells.get(key, {})
        if len(done) != plans[key]["cells"]:
            raise FileFormatError(
                f"Expected every cell of sweep entry {entry}, batch {key[1]}, in the journal; "
                f"{plans[key]['cells'] - len(done)} are missing. Hint: rerun to compute them."
            )
        for cell, (score, prompts) in done.items():
            scores[cell] += score * size
            if prompts is None:
                per_prompt = None
            elif per_prompt is not None:
                per_prompt[cell][offset : offset + size] = torch.tensor(prompts)
        offset += size

    def mean(field: str) -> float | None:
        values = [plans[k][field] for k in keys]
        if any(v is None for v in values):
            return None
        return sum(v * s for v, s in zip(values, sizes, strict=True)) / total

    return PatchResult(
        scores=(scores / total).float(),
        per_prompt=per_prompt,
        axes=axes,
        labels=first["labels"],
        tick_labels=first["tick_labels"],
        clean_score=mean("clean"),
        corrupt_score=mean("corrupt"),
        method=first["method"],
        site=first["site"],
        metric_name=first["metric"],
    )


def reference_of(config: SweepConfig, pairs: PromptPairs) -> PaddedPrompts | None:
    """The whole dataset's corrupt prompts for mean and resample ablation (else None)."""
    if config.ablation in ("mean", "resample"):
        return PaddedPrompts(pairs.corrupt_tokens, pairs.corrupt_mask)
    return None


def plan_batch(
    model: Model,
    config: SweepConfig,
    pairs: PromptPairs,
    entry: int,
    batch: int,
    rows: slice,
    reference: PaddedPrompts | None,
) -> PatchPlan:
    """Entry ``entry``'s plan on the pairs' ``rows`` (reference runs done, patches decided)."""
    part = batch_rows(pairs, rows)
    spec = config.sweeps[entry]
    return plan_patch(
        model,
        part,
        None,
        METRICS[config.metric].from_pairs(part),
        site=spec.site,
        positions=positions_arg(spec.positions),
        layers=spec.layers,
        heads=spec.heads,
        neurons=spec.neurons,
        direction=config.direction,
        ablation=config.ablation,
        reference=reference,
        seed=config.seed + batch,
    )


def cell_records(entry: int, batch: int, chunk: dict) -> list[dict[str, Any]]:
    """The journal lines of finished cells ``{cell: (score, per-prompt scores)}``."""
    return [
        {
            "kind": "cell",
            "entry": entry,
            "batch": batch,
            "cell": list(cell),
            "score": score,
            "per_prompt": prompts,
        }
        for cell, (score, prompts) in chunk.items()
    ]
