"""``mechkit sweep CONFIG.yaml``: resumable activation-patching sweeps described by a YAML file.

A sweep config names a model, prompt pairs, a metric and a list of sweeps, each one grid of
:func:`~mechkit.patching.activation_patch` (a site, its positions, layers, heads or neurons).
:func:`run_sweep` splits the prompt pairs into batches, prepares each (entry, batch) with
:func:`~mechkit.patching.activation.plan_patch`, and appends every finished cell to a journal,
``results.jsonl``, flushed and fsync'd after each chunk of patches. Started again after a kill
at any moment, it reads the journal back, drops a torn last line and runs only the cells the
journal lacks (``PatchPlan.run(skip=...)``): nothing is lost and no cell is computed twice. The
journal starts with a fingerprint of the config; a different config is refused rather than
mixed in (``restart=True`` / ``--restart`` discards the old results). A sweep deletes or
overwrites only files it can show it wrote; any other file in its way is an
:class:`~mechkit.errors.OutputFolderError` naming it, raised before the model loads.

A cell's score is the mean over all prompt pairs: each batch's mean weighted by its size, which
is the metric of one run over every pair for the mean-of-prompts metrics offered here; the
per-prompt scores are kept. Batches keep the whole dataset's padded width, so positions mean
the same in every batch; mean and resample ablations draw from the corrupt prompts of the whole
dataset (resample with ``seed + batch index``). When every cell of an entry is in, its table
(CSV) and heatmap (HTML, PNG) are written beside the journal. The config itself (dataclasses,
YAML loading and checking, ``--help`` text, fingerprint) is :mod:`mechkit.patching.sweep_config`;
its public names are importable from here too.

``mechkit sweep examples/sweep_ioi.yaml`` runs one from the command line; :func:`run_sweep` from
Python (its example runs a small one on the toy model).

The output folder (what a sweep may delete there: :mod:`mechkit.patching.sweep_folder`)::

    run.json             the config, mechkit's version, the config's fingerprint, the status,
                         and each output's size and SHA-256 ("outputs")
    results.jsonl        the journal: a header, one "plan" line per (entry, batch), one line a cell
    results.parquet      (format: parquet) every cell as a table, written when the run completes
    NAME.csv .html .png  per sweep entry; the HTML files load plotly.min.js from the folder
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechkit.atomic_io import write_text_atomically
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.distributed.ray_executor import RayExecutor
from mechkit.errors import (
    MechkitError,
    MissingDependencyError,
    OutputFolderError,
    SweepConfigError,
)
from mechkit.models import load_model
from mechkit.patching import sweep_remote
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
from mechkit.patching.sweep_config import (
    CONFIG_KEYS,
    PromptSource,
    SweepConfig,
    SweepEntry,
    build_pairs,
    changed_keys,
    config_help,
    config_identity,
    fingerprint,
    load_config,
)
from mechkit.patching.sweep_config import config_from_dict as config_from_dict  # re-export
from mechkit.patching.sweep_folder import (
    JOURNAL,
    KIND,
    PARQUET,
    RUN_FILE,
    Journal,
    check_folder,
    check_journal,
    claim,
    clear,
    index,
    locked,
    read_run_file,
    write_outputs,
)
from mechkit.patching.sweep_remote import RemoteSetup
from mechkit.prompts import PromptPairs
from mechkit.version import __version__

__all__ = [
    "CONFIG_KEYS",
    "PromptSource",
    "SweepConfig",
    "SweepConfigError",
    "SweepEntry",
    "SweepRun",
    "config_help",
    "load_config",
    "run_sweep",
]

_locked = locked  # as the tests reach it


# ----------------------------------------------------------------------------------- folder


def _check_same_sweep(out: Path, previous: dict[str, Any] | None, identity: dict, fp: str) -> None:
    if previous is None:
        if (out / JOURNAL).exists():
            raise OutputFolderError(
                f"{out} holds {JOURNAL} but no {RUN_FILE}, so its config is unknown and its "
                "results cannot be resumed safely. Hint: rerun with --restart to discard them, "
                "or choose another --out."
            )
        return
    if previous.get("fingerprint") != fp:
        changed = changed_keys(previous.get("identity", {}), identity) or ["(unknown)"]
        raise OutputFolderError(
            f"Expected {out} to hold results of this config; it holds a sweep whose config "
            f"differs in {', '.join(changed)}, and mixing their results would be wrong. Hint: "
            "rerun with --restart to discard the old results, or choose another --out."
        )


def _write_run_file(out: Path, info: dict[str, Any], **changes: Any) -> None:
    info.update(changes, kind=KIND, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_text_atomically(out / RUN_FILE, json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """What :func:`run_sweep` did.

    Attributes:
        out: the output folder.
        results: each entry's :class:`PatchResult` over all prompt pairs, by entry name.
        files: each entry's written files (``csv``, ``html``, ``png``), by entry name.
        cells_total: cells of the whole sweep (entries x batches x grid cells).
        cells_computed: cells this call ran; the rest came from the journal.
        seconds: wall time of this call.

    Example:
        >>> import tempfile
        >>> config = config_from_dict({"model": "attn-only-2l", "device": "cpu",
        ...     "prompts": {"generator": "repeated_tokens", "n": 2, "length": 3},
        ...     "sweeps": [{"site": "z", "heads": ["L1H0", "L1H3"]}]})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     first = run_sweep(config, out=folder, progress=False)
        ...     again = run_sweep(config, out=folder, progress=False)  # resumed: all journaled
        >>> first.cells_total, first.cells_computed, again.cells_computed
        (2, 2, 0)
        >>> sorted(first.files["0_z"]), first.results["0_z"].scores.shape  # (layer, head)
        (['csv', 'html', 'png'], torch.Size([1, 2]))
        >>> torch.equal(first.results["0_z"].scores, again.results["0_z"].scores)
        True
    """

    out: Path
    results: dict[str, PatchResult]
    files: dict[str, dict[str, Path]]
    cells_total: int
    cells_computed: int
    seconds: float


def run_sweep(
    config: SweepConfig | str | Path,
    *,
    out: str | Path | None = None,
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    executor: RayExecutor | None = None,
) -> SweepRun:
    """Run (or resume) a sweep, writing results incrementally, then tables and heatmaps.

    Args:
        config: a :class:`SweepConfig` or the path of a YAML config.
        out: the output folder; None means ``config.out``, else ``runs/sweep``.
        restart: discard results already in ``out`` (else a different config is an error).
        progress: show a progress bar (stderr).
        log: called with one-line status messages (None: silent).
        executor: a :class:`~mechkit.distributed.RayExecutor` to run the cells on (kept open
            for the caller); None: the config's ``executor`` (``ray``: one is started with its
            ``ray_address`` and ``actors`` and closed at the end), by default this process.
            The journal is written by this process alone either way, and a run may be resumed
            with another executor.

    Example:
        >>> import tempfile
        >>> config = config_from_dict({"model": "attn-only-2l",
        ...     "prompts": {"generator": "repeated_tokens", "n": 2, "length": 3},
        ...     "sweeps": [{"site": "z", "heads": ["L1H0", "L1H3"]}], "device": "cpu"})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     run = run_sweep(config, out=folder, progress=False)   # killed? run it again
        ...     sorted(p.name for p in run.out.iterdir())  # doctest: +NORMALIZE_WHITESPACE
        ['.lock', '0_z.csv', '0_z.html', '0_z.png', 'plotly.min.js', 'results.jsonl', 'run.json']
        >>> run.cells_total, run.results["0_z"].axes
        (2, ('layer', 'head'))
    """
    source = None
    if not isinstance(config, SweepConfig):
        source, config = str(config), load_config(config)
    owned = None
    if executor is None and config.executor == "ray":
        executor = owned = RayExecutor(config.ray_address, actors=config.actors)
    try:
        folder = Path(out or config.out or "runs/sweep")
        return _run(config, folder, restart, progress, log, executor)
    except SweepConfigError as exc:  # checked on the model: name the file too
        if exc.source is not None or source is None:
            raise
        raise type(exc)(exc.path, exc.detail, source) from None
    finally:
        if owned is not None:
            owned.close()


def _run(
    config: SweepConfig,
    folder: Path,
    restart: bool,
    progress: bool,
    log: Callable[[str], None] | None,
    executor: RayExecutor | None,
) -> SweepRun:
    start = time.perf_counter()
    say = log or (lambda _msg: None)
    identity = config_identity(config)
    fp = fingerprint(identity)
    check_folder(folder)  # a file, or a folder that cannot be written: refused here
    journal = Journal(folder / JOURNAL)
    with locked(folder):
        # only files shown to be this tool's are ever deleted or overwritten (sweep_folder)
        previous = read_run_file(folder)
        has_journal = check_journal(folder, previous)
        if restart or not _has_cells(journal.path):  # nothing computed: nothing to mix up
            clear(folder, previous, has_journal)
            previous = None
        _check_same_sweep(folder, previous, identity, fp)
        records, torn = journal.read()
        if torn:
            say(f"dropped a torn last line from {journal.path} (the run was killed mid-write)")
        if records and records[0][1].get("fingerprint") != fp:
            raise OutputFolderError(
                f"Expected {journal.path} to be this config's journal (fingerprint {fp}); its "
                "header disagrees. Hint: rerun with --restart, or choose another --out."
            )
        plans, cells = index(journal, records, len(config.sweeps))
        info = dict(previous or {})
        manifest: dict[str, Any] = info.setdefault("outputs", {})
        claim(folder, _output_names(config), manifest)  # before any model loads
        complete = previous is not None and previous.get("status") == "complete"
        complete = complete and {i for i, _ in plans} == set(range(len(config.sweeps)))
        setup: _Setup | RemoteSetup | None = None
        if not complete:  # checks the config on the model
            setup = (
                _prepare(config, say)
                if executor is None
                else _prepare_remote(config, executor, say)
            )
        info.update(mechkit=__version__, fingerprint=fp, config=config.to_dict())
        info.update(identity=identity, out=str(folder))
        info.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_run_file(folder, info, status="running")
        if not records:
            journal.append([{"kind": "header", "fingerprint": fp, "mechkit": info["mechkit"]}])
        results: dict[str, PatchResult] = {}
        files: dict[str, dict[str, Path]] = {}

        def save() -> None:
            _write_run_file(folder, info)

        def finish(name: str, result: PatchResult) -> None:
            results[name] = result
            files[name] = _export(folder, name, result, manifest, save)

        try:
            if setup is None:
                say(f"{folder}: already complete; rewriting its tables and figures")
                for i, name in enumerate(config.entry_names):
                    finish(name, assemble(i, plans, cells))
                total, computed = sum(len(c) for c in cells.values()), 0
            elif isinstance(setup, RemoteSetup):
                assert executor is not None  # a RemoteSetup comes from one
                total, computed = sweep_remote.compute(
                    config, executor, setup, journal, plans, cells, finish, progress, say
                )
            else:
                total, computed = _compute(
                    config, setup, journal, plans, cells, finish, progress, say
                )
            if config.format == "parquet":
                write_outputs(
                    folder,
                    {PARQUET: lambda tmp: _write_parquet(tmp, config, cells)},
                    manifest,
                    save,
                )
        finally:
            journal.close()
        _write_run_file(folder, info, status="complete", cells=total)
    return SweepRun(folder, results, files, total, computed, time.perf_counter() - start)


def _has_cells(path: Path) -> bool:
    """Whether the journal holds any computed cell."""
    if not path.exists():
        return False
    with path.open("rb") as f:
        return any(b'"kind":"cell"' in line for line in f)


def _output_names(config: SweepConfig) -> list[str]:
    """The files this config's run writes besides run.json and the journal."""
    names = [f"{name}.{ext}" for name in config.entry_names for ext in ("csv", "html", "png")]
    return names + ([PARQUET] if config.format == "parquet" else [])


@dataclasses.dataclass
class _Setup:
    model: Model
    pairs: PromptPairs
    batches: list[slice]
    total: int  # cells of the whole sweep


def _prepare(config: SweepConfig, say: Callable[[str], None]) -> _Setup:
    """Load the model and the pairs, and check every entry on them before anything runs."""
    say(f"loading {config.model} ...")
    try:
        model = load_model(config.model, device=config.device, dtype=config.dtype)
    except MechkitError as exc:
        raise SweepConfigError("model", str(exc)) from None
    pairs = build_pairs(model, config)
    batches = batch_slices(len(pairs), config.batch_size)
    seq = pairs.clean_tokens.shape[1]
    counts = [count_cells(model, entry, i, seq) for i, entry in enumerate(config.sweeps)]
    return _Setup(model, pairs, batches, sum(counts) * len(batches))


def _prepare_remote(
    config: SweepConfig, executor: RayExecutor, say: Callable[[str], None]
) -> RemoteSetup:
    """Start the executor's actors (each loads the model) and prepare the sweep on one."""
    say(f"loading {config.model} on the Ray actors ...")
    try:
        return sweep_remote.prepare(config, executor)
    except (SweepConfigError, MissingDependencyError):
        raise
    except MechkitError as exc:
        raise SweepConfigError("model", str(exc)) from None


def _compute(
    config: SweepConfig,
    setup: _Setup,
    journal: Journal,
    plans: dict,
    cells: dict,
    finish: Callable[[str, PatchResult], None],
    progress: bool,
    say: Callable[[str], None],
) -> tuple[int, int]:
    """Run every cell the journal lacks; ``finish(name, result)`` as each entry completes."""
    model, pairs, batches, total = setup.model, setup.pairs, setup.batches, setup.total
    already = sum(len(c) for c in cells.values())
    say(
        f"{len(pairs)} prompt pairs in {len(batches)} batch(es), {total} cells; "
        + (f"resuming with {already} already done" if already else "starting")
    )
    bar = progress_bar(total, "sweep", enabled=progress, unit="cell", initial=already, leave=True)
    reference = reference_of(config, pairs)  # mean, resample: the whole dataset's corrupt prompts
    computed = 0
    try:
        for i, name in enumerate(config.entry_names):
            for b, rows in enumerate(batches):
                key = (i, b)
                done = cells.setdefault(key, {})
                if key in plans and len(done) == plans[key]["cells"]:
                    continue
                bar.set_description(f"{name} batch {b + 1}/{len(batches)}")
                plan = plan_batch(model, config, pairs, i, b, rows, reference)
                record = plan_record(plan, i, b, rows)
                if key not in plans:
                    journal.append([record])
                    plans[key] = record
                elif {k: plans[key][k] for k in ("cells", "axes", "labels")} != {
                    k: record[k] for k in ("cells", "axes", "labels")
                }:
                    raise OutputFolderError(
                        f"Expected the journal's plan of {name}, batch {b}, to match this run's; "
                        "they differ (the model or prompt files changed?). Hint: rerun with "
                        "--restart, or choose another --out."
                    )
                for chunk in plan.run(
                    skip=set(done), memory_budget=config.memory_budget, progress=False
                ):
                    journal.append(cell_records(i, b, chunk))
                    done.update(chunk)
                    computed += len(chunk)
                    bar.update(len(chunk))
            finish(name, assemble(i, plans, cells))
    finally:
        bar.close()
    return total, computed


# ----------------------------------------------------------------------------------- export


def _export(
    folder: Path,
    name: str,
    result: PatchResult,
    manifest: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Path]:
    """``NAME.csv`` (a row per cell, with ``normalized`` when defined), ``.html`` and ``.png``,
    each recorded in the manifest (``save()`` stores it)."""
    df = result.to_dataframe()
    with contextlib.suppress(ValueError):  # no corrupt run, or clean == corrupt
        df.insert(
            df.columns.get_loc("score") + 1,
            "normalized",
            result.normalized().scores.flatten().tolist(),
        )
    title = f"{name}: {result.method} {result.site}, {result.metric_name}"
    writers = {
        f"{name}.csv": lambda tmp: df.to_csv(tmp, index=False),
        f"{name}.html": lambda tmp: result.plot(title=title).write_html(
            tmp, include_plotlyjs="directory"
        ),
        f"{name}.png": lambda tmp: _write_png(result, title, tmp),
    }
    paths = write_outputs(folder, writers, manifest, save)
    return {ext: paths[f"{name}.{ext}"] for ext in ("csv", "html", "png")}


def _write_png(result: PatchResult, title: str, path: str) -> None:
    """A static heatmap with matplotlib (no browser needed): rows = first axis, columns = last,
    one panel per value of the axes between (e.g. one layer x head panel per position)."""
    from matplotlib.figure import Figure

    z = result.scores.float().numpy()
    centre = result.base_score if result.base_score is not None else 0.0
    span = float(max(abs(z.max() - centre), abs(z.min() - centre))) or 1.0
    ticks = result.tick_labels
    if z.ndim == 1:
        axis = result.axes[0]
        fig = Figure(figsize=(min(2 + 0.25 * len(z), 20), 4), layout="constrained")
        ax = fig.subplots()
        ax.bar(range(len(z)), z, color="tab:blue")
        _set_ticks(ax.set_xticks, ticks[axis], rotation=90)
        ax.axhline(centre, color="grey", linestyle=":", label="unpatched")
        ax.set(xlabel=axis, ylabel=result.metric_name, title=title)
        fig.savefig(path, format="png", dpi=100)
        return
    rows, cols, middle = result.axes[0], result.axes[-1], result.axes[1:-1]
    grids = z.reshape(z.shape[0], -1, z.shape[-1]).transpose(1, 0, 2)  # (panels, rows, cols)
    names = [" ".join(c) for c in itertools.product(*[ticks[a] for a in middle])] or [""]
    shown = min(len(grids), 64)
    n_cols = math.ceil(math.sqrt(shown))
    n_rows = math.ceil(shown / n_cols)
    cell_w = min(max(0.25 * z.shape[-1], 3.5), 12)
    cell_h = min(max(0.22 * z.shape[0], 2.0), 10)
    fig = Figure(
        figsize=(min(n_cols * cell_w + 1.5, 40), min(n_rows * cell_h + 1, 40)), layout="constrained"
    )
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= shown:
            ax.set_visible(False)
            continue
        image = ax.imshow(
            grids[k],
            cmap="RdBu",
            vmin=centre - span,
            vmax=centre + span,
            aspect="auto",
            interpolation="nearest",
        )
        _set_ticks(ax.set_xticks, ticks[cols], rotation=90 if cols == "pos" else 0)
        _set_ticks(ax.set_yticks, ticks[rows])
        ax.set(xlabel=cols, ylabel=rows, title=f"{' x '.join(middle)} {names[k]}" if middle else "")
    more = f" (first {shown} of {len(grids)} panels; all in the HTML)" if shown < len(grids) else ""
    fig.suptitle(title + more)
    assert image is not None  # at least one panel is shown
    fig.colorbar(image, ax=axes, label=result.metric_name, shrink=0.8)
    fig.savefig(path, format="png", dpi=100)


def _set_ticks(setter: Callable[..., Any], labels: list[str], rotation: int = 0) -> None:
    step = max(1, math.ceil(len(labels) / 40))  # at most ~40 labelled ticks
    where = list(range(0, len(labels), step))
    setter(where, [labels[i] for i in where], rotation=rotation, fontsize=7)


def _write_parquet(path: str, config: SweepConfig, cells: dict) -> None:
    import pandas as pd

    names = config.entry_names
    rows = [
        {
            "entry": names[entry],
            "site": config.sweeps[entry].site,
            "batch": batch,
            "cell": list(cell),
            "score": score,
            "per_prompt": prompts,
        }
        for (entry, batch), done in sorted(cells.items())
        for cell, (score, prompts) in sorted(done.items())
    ]
    frame = pd.DataFrame(rows, columns=["entry", "site", "batch", "cell", "score", "per_prompt"])
    frame.to_parquet(path, index=False)
