"""A sweep's cells as tasks on an executor's actors (``mechkit sweep --ray``, ``executor: ray``).

The driver (this process) never loads the model: one actor builds the prompt pairs and counts
each entry's cells (:func:`prepare_task`), then every (entry, batch) not complete in the journal
becomes one or more tasks (:func:`cells_task`), each a contiguous range of the plan's cells less
those the journal holds. An actor plans an (entry, batch) once (reference runs, patches
decided, with :func:`~mechkit.patching.sweep_cells.plan_batch` as the local runner does) and
keeps the plan in its cache for the next range. Only the driver appends to the journal: a
finished task's plan record (once) and its cells, each cell at most once even when a task was
run twice after its actor died. A driver killed mid-run leaves a journal that the local runner
and this one resume alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.distributed.ray_executor import RayExecutor
from mechkit.errors import OutputFolderError
from mechkit.patching.result import PatchResult
from mechkit.patching.sweep_cells import (
    assemble,
    batch_slices,
    cell_records,
    count_cells,
    plan_batch,
    plan_record,
    reference_of,
)
from mechkit.patching.sweep_config import SweepConfig, build_pairs, config_identity, fingerprint
from mechkit.patching.sweep_folder import Journal
from mechkit.prompts import PromptPairs

__all__: list[str] = []

_PLANS_KEPT = 2  # plans an actor keeps (each holds its batch's reference activations)


@dataclasses.dataclass
class RemoteSetup:
    """What the driver knows before the cells run: the pairs (on CPU), batches, cell counts."""

    pairs: PromptPairs
    batches: list[slice]
    counts: list[int]  # cells of each entry, per batch

    @property
    def total(self) -> int:
        return sum(self.counts) * len(self.batches)


def absolute_files(config: SweepConfig) -> SweepConfig:
    """The config with its prompt files as absolute paths (actors may run in another folder)."""
    prompts = config.prompts
    changes: dict[str, Any] = {
        key: str(Path(getattr(prompts, key)).resolve())
        for key in ("file", "tokens")
        if getattr(prompts, key) is not None
    }
    return dataclasses.replace(config, prompts=dataclasses.replace(prompts, **changes))


def prepare_task(model: Model, cache: dict, config: SweepConfig) -> RemoteSetup:
    """On an actor: the prompt pairs and each entry's cell count, every entry checked."""
    pairs = build_pairs(model, config)
    batches = batch_slices(len(pairs), config.batch_size)
    seq = pairs.clean_tokens.shape[1]
    counts = [count_cells(model, entry, i, seq) for i, entry in enumerate(config.sweeps)]
    cpu = {
        f.name: getattr(pairs, f.name).cpu()
        for f in dataclasses.fields(pairs)
        if hasattr(getattr(pairs, f.name), "cpu")
    }
    return RemoteSetup(dataclasses.replace(pairs, **cpu), batches, counts)


def cells_task(
    model: Model,
    cache: dict,
    config: SweepConfig,
    pairs: PromptPairs,
    entry: int,
    batch: int,
    rows: slice,
    cells: slice,
    skip: frozenset,
) -> tuple[dict[str, Any], dict]:
    """On an actor: the (entry, batch)'s plan record and the scores of the plan's cells in range
    ``cells`` that are not in ``skip``."""
    key = (fingerprint(config_identity(config)), entry, batch)
    plan = cache.get(key)
    if plan is None:
        pairs = pairs.to(model.cfg.device or "cpu")
        plan = plan_batch(model, config, pairs, entry, batch, rows, reference_of(config, pairs))
        plans = cache.setdefault("plans", [])
        plans.append(key)
        while len(plans) > _PLANS_KEPT:
            cache.pop(plans.pop(0), None)
        cache[key] = plan
    wanted = set(plan.cells[cells])
    done: dict = {}
    for chunk in plan.run(
        skip=set(plan.cells) - wanted | set(skip),
        memory_budget=config.memory_budget,
        progress=False,
    ):
        done.update(chunk)
    return plan_record(plan, entry, batch, rows), done


def prepare(config: SweepConfig, executor: RayExecutor) -> RemoteSetup:
    """Build the pairs and count the cells on one actor (loading the models of all)."""
    ((_, setup),) = list(
        executor.map(
            config.model,
            prepare_task,
            [(absolute_files(config),)],
            device=config.device,
            dtype=config.dtype,
        )
    )
    return setup


def compute(
    config: SweepConfig,
    executor: RayExecutor,
    setup: RemoteSetup,
    journal: Journal,
    plans: dict,
    cells: dict,
    finish: Callable[[str, PatchResult], None],
    progress: bool,
    say: Callable[[str], None],
) -> tuple[int, int]:
    """Run every cell the journal lacks on the executor; ``finish(name, result)`` as each entry
    completes. Returns (cells of the sweep, cells computed now)."""
    remote_config = absolute_files(config)
    total = setup.total
    already = sum(len(c) for c in cells.values())
    units = [
        (i, b)
        for i in range(len(config.sweeps))
        for b in range(len(setup.batches))
        if not ((i, b) in plans and len(cells.get((i, b), {})) == plans[(i, b)]["cells"])
    ]
    say(
        f"{len(setup.pairs)} prompt pairs in {len(setup.batches)} batch(es), {total} cells on "
        f"{executor.size} Ray actor(s); "
        + (f"resuming with {already} already done" if already else "starting")
    )
    pairs = executor.share(setup.pairs)
    tasks = []
    for i, b in units:
        n = setup.counts[i]
        parts = executor.chunks(n, len(units))
        skip = frozenset(cells.get((i, b), {}))
        for k in range(parts):
            span = slice(k * n // parts, (k + 1) * n // parts)
            tasks.append((remote_config, pairs, i, b, setup.batches[b], span, skip))
    left = {i: sum(1 for t in tasks if t[2] == i) for i in range(len(config.sweeps))}
    for i, name in enumerate(config.entry_names):  # complete in the journal already
        if left[i] == 0:
            finish(name, assemble(i, plans, cells))
    bar = progress_bar(total, "sweep", enabled=progress, unit="cell", initial=already, leave=True)
    computed = 0
    try:
        for index, (record, chunk) in executor.map(
            config.model, cells_task, tasks, device=config.device, dtype=config.dtype
        ):
            i, b = tasks[index][2], tasks[index][3]
            key = (i, b)
            if key not in plans:
                journal.append([record])
                plans[key] = record
            elif any(plans[key][k] != record[k] for k in ("cells", "axes", "labels")):
                raise OutputFolderError(
                    f"Expected the journal's plan of {config.entry_names[i]}, batch {b}, to "
                    "match this run's; they differ (the model or prompt files changed?). Hint: "
                    "rerun with --restart, or choose another --out."
                )
            done = cells.setdefault(key, {})
            new = {cell: value for cell, value in chunk.items() if cell not in done}
            if new:  # a retried task may repeat cells: each is written once
                journal.append(cell_records(i, b, new))
                done.update(new)
                computed += len(new)
                bar.update(len(new))
            left[i] -= 1
            if left[i] == 0:
                finish(config.entry_names[i], assemble(i, plans, cells))
    finally:
        bar.close()
    return total, computed
