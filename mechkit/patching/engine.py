"""The batched runner behind activation and path patching.

A patch changes the model's computation from some block ``layer`` and some position ``start``
on: every activation before that block, and every activation at positions before ``start``
(causal attention), is exactly the reference run's. So instead of one full forward per patch,
as ``transformer_lens.patching`` does, the runner

1. runs the reference ("base") prompts once, keeping the residual stream entering every block
   and every block's attention keys and values;
2. groups patches by ``start`` (merging small groups) and, within a group, orders them by
   ``layer``;
3. runs each group as one "staircase" batch: the rows of a patch join the batch at its own
   block (copies of the cached residual from ``start`` on), earlier positions are supplied to
   attention as a key/value prefix from the cache, and each patch's edits are applied to its own
   rows by hooks;
4. reads the logits only where the metric reads them (the answer positions) when it can.

The result is the same computation as the one-forward-per-patch loop, in a fraction of the
arithmetic and in a few large batches. Work is chunked to a memory budget; a chunk that runs out
of memory is split in two and retried.

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> base = run_base(model, torch.tensor([[1, 2, 3, 4]]))
    >>> reader = MetricReader(lambda logits: logits[:, -1, 3].mean(), base)
    >>> def zero_head_0(rows, first):  # rows cover positions first.. of block 1's z
    ...     rows[:, :, 0] = 0.0
    >>> job = PatchJob("L1H0", layer=1, start=0, edits={"blocks.1.attn.hook_z": zero_head_0})
    >>> [[(r.key, r.score.ndim) for r in chunk] for chunk in run_jobs(model, base, [job], reader,
    ...                                                               budget=2**30)]
    [[('L1H0', 0)]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from mechkit.core.batching import check_budget, each_batch, parse_budget
from mechkit.core.types import Model
from mechkit.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    OutOfMemoryError,
    ShapeError,
    UnsupportedModelError,
)
from mechkit.hook_scope import hook_scope
from mechkit.lens.logit_lens import decode_residual
from mechkit.metrics import Metric, Normalized, check_metric_value

__all__ = [
    "Edit",
    "PatchJob",
    "JobResult",
    "BaseRun",
    "MetricReader",
    "run_base",
    "run_jobs",
    "plan_chunks",
    "base_score",
    "score_logits",
    "first_difference",
    "check_supported",
    "metric_positions",
    # moved to mechkit.core.batching; re-exported here for the modules that still import them
    "parse_budget",
    "check_budget",
]


Edit = Callable[[Tensor, int], None]
"""An edit: changes, in place, one patch's rows of an activation that covers the positions from
the batch's first computed position on (given as the second argument) to the end."""


@dataclasses.dataclass
class PatchJob:
    """One patched run: what changes, from which block and position on (the module's example
    runs one).

    Attributes:
        key: the job's cell in the result (any hashable).
        layer: the first block whose computation the edits change.
        start: the first position whose values the edits change.
        edits: hook name -> in-place edit of this job's rows. Activations cover positions
            from the batch's first computed position ``s`` on (passed to the edit; ``s <= start``,
            since batches may merge jobs of several starts), so absolute position ``p`` is index
            ``p - s``; attention patterns keep every key position. Edits sit only at blocks
            ``layer`` and later.
        capture: hook names whose (suffix) activation of this job's rows is returned.
        stop: run blocks only up to this one (exclusive) and skip the metric: for jobs that
            only capture. None runs the whole model and scores it.

    Example:
        >>> def zero_head_2(rows, first):  # rows: block 1's z, (rows, pos - first, head, d_head)
        ...     rows[:, :, 2] = 0.0
        >>> job = PatchJob("L1H2", layer=1, start=0, edits={"blocks.1.attn.hook_z": zero_head_2})
        >>> job.key, job.layer, job.start, list(job.edits), job.capture, job.stop
        ('L1H2', 1, 0, ['blocks.1.attn.hook_z'], (), None)
    """

    key: Any
    layer: int
    start: int
    edits: dict[str, Edit]
    capture: tuple[str, ...] = ()
    stop: int | None = None


@dataclasses.dataclass
class JobResult:
    """What :func:`run_jobs` returns for one job: its metric, per-prompt scores and captures.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> base = run_base(model, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
        >>> reader = MetricReader(lambda logits: logits[:, -1, 3], base)  # one value per prompt
        >>> def zero_head_2(rows, first):
        ...     rows[:, :, 2] = 0.0
        >>> job = PatchJob("L1H2", layer=1, start=0, edits={"blocks.1.attn.hook_z": zero_head_2})
        >>> [result] = [r for chunk in run_jobs(model, base, [job], reader, budget=2**30)
        ...             for r in chunk]
        >>> result.key, result.score.shape, result.per_prompt.shape, result.captured
        ('L1H2', torch.Size([]), torch.Size([2]), {})
        >>> torch.allclose(result.score, result.per_prompt.mean())  # the score: their mean
        True
    """

    key: Any
    score: Tensor  # () the metric
    per_prompt: Tensor | None  # (batch,) when the metric gives one value per prompt
    captured: dict[str, Tensor]  # suffix activations from position ``captured_from`` on
    captured_from: int = 0


@dataclasses.dataclass
class BaseRun:
    """The reference run's tokens and cached internals (:func:`run_base` makes one).

    Example:
        >>> base = run_base(mk.load_model("attn-only-2l"), torch.tensor([[1, 2, 3]]))
        >>> base.batch, base.seq, len(base.resid_pre), tuple(base.keys[0].shape)
        (1, 3, 2, (1, 3, 4, 32))
    """

    tokens: Int[Tensor, "batch pos"]
    resid_pre: list[Tensor]  # per layer (batch, pos, d_model)
    keys: list[Tensor]  # per layer, what attention appends to its cache (batch, pos, kv, d_head)
    values: list[Tensor]
    logits: Float[Tensor, "batch pos d_vocab"]
    acts: dict[str, Tensor]  # requested hook activations, full

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq(self) -> int:
        return self.tokens.shape[1]


def check_supported(model: Model) -> None:
    """Refuse models the staircase runs cannot patch (shortformer, several devices).

    Example:
        >>> check_supported(mk.load_model("attn-only-2l"))  # supported: nothing happens
    """
    cfg = model.cfg
    if cfg.positional_embedding_type == "shortformer":
        raise UnsupportedModelError(
            "Expected a model whose positional information enters through the residual stream "
            "or attention (standard or rotary); got a shortformer model, which mechkit's "
            "patching does not support yet."
        )
    if getattr(cfg, "n_devices", 1) > 1:
        raise UnsupportedModelError(
            f"Expected a model on one device; got n_devices={cfg.n_devices}. "
            "Hint: load the model on a single device for patching."
        )


@torch.no_grad()
def run_base(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    hook_names: set[str] | frozenset[str] = frozenset(),
) -> BaseRun:
    """Run ``tokens`` block by block, keeping what the staircase runs need (and the
    activations at ``hook_names``).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> base = run_base(model, torch.tensor([[1, 2, 3]]), {"blocks.0.attn.hook_z"})
        >>> tuple(base.acts["blocks.0.attn.hook_z"].shape), tuple(base.logits.shape)
        ((1, 3, 4, 32), (1, 3, 500))
    """
    check_supported(model)
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act.detach().clone()

    resid_pre, keys, values = [], [], []
    with hook_scope(model, fwd_hooks=[(name, keep) for name in sorted(hook_names)]):
        x = model(tokens, stop_at_layer=0)  # embeddings, as the full forward makes them
        for block in model.blocks:
            resid_pre.append(x)
            entry = TransformerLensKeyValueCacheEntry.init_cache_entry(
                model.cfg, x.device, tokens.shape[0]
            )
            x = block(x, past_kv_cache_entry=entry)
            keys.append(entry.past_keys)
            values.append(entry.past_values)
        logits = decode_residual(model, x)
    return BaseRun(tokens, resid_pre, keys, values, logits, acts)


# ----------------------------------------------------------------------------------- metrics


def metric_positions(metric: Any) -> Int[Tensor, " batch"] | None | bool:
    """The answer positions a mechkit metric reads; False when it is a plain callable.

    Example:
        >>> metric_positions(lambda logits: logits.sum())
        False
    """
    while isinstance(metric, Normalized):
        metric = metric.metric
    if isinstance(metric, Metric):
        return getattr(metric, "positions", None)
    return False


class MetricReader:
    """Applies the user's metric to one patch's logits.

    A mechkit :class:`Metric` reads only the answer positions, so only those logits are made; a
    plain callable gets the full ``(batch, pos, d_vocab)`` logits, like TransformerLens's
    patching functions give it.

    Example:
        >>> base = run_base(mk.load_model("attn-only-2l"), torch.tensor([[1, 2, 3]]))
        >>> reader = MetricReader(lambda logits: logits[:, -1, 0], base)
        >>> reader.full, float(reader.score(base.logits)[0]) == float(base.logits[0, -1, 0])
        (True, True)
    """

    def __init__(self, metric: Any, base: BaseRun) -> None:
        if not callable(metric):
            raise InvalidTypeError(
                f"Expected a metric: a mechkit Metric or a function logits -> score; got "
                f"{type(metric).__name__}. Hint: mk.LogitDiff.from_pairs(pairs)."
            )
        self.metric = metric
        found = metric_positions(metric)
        self.full = found is False
        if self.full:
            self.positions = None
        elif found is None:
            self.positions = torch.full((base.batch,), base.seq - 1, dtype=torch.long)
        else:
            self.positions = torch.as_tensor(found, dtype=torch.long).cpu()
            if self.positions.shape != (base.batch,):
                raise InvalidArgumentError(
                    f"Expected the metric to be bound to the {base.batch} prompts being patched; "
                    f"it reads {tuple(self.positions.shape)} answer positions. Hint: build it "
                    "from the same PromptPairs (metric.select(rows) for a subset)."
                )
            if int(self.positions.max()) >= base.seq or int(self.positions.min()) < 0:
                raise InvalidArgumentError(
                    f"Expected answer positions inside the prompts (0..{base.seq - 1}); got "
                    f"{self.positions.tolist()}."
                )

    @property
    def answer_positions(self) -> Int[Tensor, " batch"]:
        """The positions the metric reads (a mechkit metric only: ``full`` is False)."""
        if self.positions is None:
            raise InvalidTypeError(
                "Expected a mechkit Metric (it names its answer positions); this metric reads "
                "the full logits."
            )
        return self.positions

    def score(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(mean score, per-prompt scores or None)`` for one patch's logits."""
        value = check_metric_value(self.metric(logits), logits.shape[0])
        per_prompt = None
        if isinstance(self.metric, Metric):
            try:
                per_prompt = self.metric.per_prompt(logits).detach().float().cpu()
            except ValueError:  # a normalized metric with a prompt whose span is zero
                per_prompt = None
        elif value.ndim == 1:
            per_prompt, value = value.detach().float().cpu(), value.mean()
        if value.ndim != 0:
            raise ShapeError(
                f"Expected the metric to return a scalar (or one value per prompt); got shape "
                f"{tuple(value.shape)}."
            )
        return value.detach().float().cpu(), per_prompt


# ----------------------------------------------------------------------------------- memory


def _bytes_per_row(model: Model, seq: int, suffix: int, full_logits: bool) -> int:
    """A generous estimate of the peak memory one row of a staircase batch needs."""
    cfg = model.cfg
    item = torch.finfo(cfg.dtype).bits // 8
    d_mlp = cfg.d_mlp or 0
    per_token = 14 * cfg.d_model + 5 * d_mlp + 4 * cfg.n_heads * seq + 6 * cfg.n_heads * cfg.d_head
    logits = cfg.d_vocab * 4 * (2 * seq if full_logits else 2)
    return suffix * per_token * item + logits


# ----------------------------------------------------------------------------------- running


def plan_chunks(
    model: Model, base: BaseRun, jobs: list[PatchJob], budget: int, full_logits: bool
) -> list[list[PatchJob]]:
    """Group jobs by start position, order by layer, and cut into chunks that fit ``budget``.

    Groups too small to keep the hardware busy (a one-layer sweep gives one job per position)
    are merged with the next start's group: the merged batch computes from the earliest start,
    some redundant positions for far larger matrix products.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> base = run_base(model, torch.tensor([[1, 2, 3]]))
        >>> jobs = [PatchJob(i, layer=i % 2, start=0, edits={}) for i in range(4)]
        >>> [[job.key for job in chunk] for chunk in plan_chunks(model, base, jobs, 2**30, False)]
        [[0, 2, 1, 3]]
    """
    groups: dict[int, list[PatchJob]] = {}
    for job in jobs:
        groups.setdefault(job.start, []).append(job)
    merged: list[list[PatchJob]] = []
    tokens = 0
    for start in sorted(groups):
        group = groups[start]
        if merged and tokens < _MERGE_TOKENS:
            merged[-1].extend(group)
        else:
            merged.append(list(group))
            tokens = 0
        first = merged[-1][0].start
        tokens += len(group) * base.batch * (base.seq - first)
    chunks = []
    for group in merged:
        group.sort(key=lambda j: j.layer)
        first = min(j.start for j in group)
        per_row = _bytes_per_row(model, base.seq, base.seq - first, full_logits)
        per_job = per_row * base.batch
        size = max(1, budget // per_job)
        for i in range(0, len(group), size):
            chunks.append(group[i : i + size])
    return chunks


_MERGE_TOKENS = 2048
"""Rows x positions below which a start group is merged with the next one."""


def run_jobs(
    model: Model,
    base: BaseRun,
    jobs: list[PatchJob],
    reader: MetricReader,
    *,
    budget: int,
    progress: Any = None,
) -> Iterator[list[JobResult]]:
    """Run ``jobs``, yielding each finished chunk's results (in no promised order). Each job's
    score equals a full forward pass with its edits as TransformerLens hooks.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])  # (batch, pos)
        >>> base = run_base(model, tokens)
        >>> reader = MetricReader(lambda logits: logits[:, -1, 3], base)
        >>> def zero_head(head):
        ...     def edit(rows, first):  # rows: (rows, pos - first, head, d_head)
        ...         rows[:, :, head] = 0.0
        ...     return edit
        >>> jobs = [PatchJob(f"L1H{h}", layer=1, start=0,
        ...                  edits={"blocks.1.attn.hook_z": zero_head(h)}) for h in range(4)]
        >>> results = {r.key: r for chunk in run_jobs(model, base, jobs, reader, budget=2**30)
        ...            for r in chunk}
        >>> sorted(results)
        ['L1H0', 'L1H1', 'L1H2', 'L1H3']
        >>> hand = model.run_with_hooks(  # the same patch, one full forward
        ...     tokens, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: zero_head(2)(z, 0))])
        >>> torch.allclose(results["L1H2"].per_prompt, hand[:, -1, 3], atol=1e-5)
        True
    """
    for chunk in plan_chunks(model, base, jobs, budget, reader.full):
        yield from _run_with_split(model, base, chunk, reader, progress)


def _run_with_split(
    model: Model, base: BaseRun, chunk: list[PatchJob], reader: MetricReader, progress: Any
) -> Iterator[list[JobResult]]:
    """The chunk's results; a part that runs out of memory is retried in halves
    (:func:`~mechkit.core.each_batch`, here over patches rather than prompts)."""
    parts: list[list[JobResult]] = []

    def work(rows: slice) -> None:
        parts.append(_run_chunk(model, base, chunk[rows], reader))  # kept only on success
        if progress is not None:
            progress.update(rows.stop - rows.start)

    try:
        each_batch(len(chunk), None, work)
    except OutOfMemoryError as exc:  # one patch alone: say so, not "one prompt"
        raise OutOfMemoryError(
            f"Out of memory running one patch on {base.batch} prompts of {base.seq} tokens. "
            "Hint: patch fewer prompts at once (a smaller batch_size)."
        ) from exc.__cause__
    yield from parts


@torch.no_grad()
def _run_chunk(
    model: Model, base: BaseRun, chunk: list[PatchJob], reader: MetricReader
) -> list[JobResult]:
    """One staircase batch from the chunk's first start on; rows join at their job's layer."""
    start = min(job.start for job in chunk)
    n_batch = base.batch
    rows_of = {id(job): slice(i * n_batch, (i + 1) * n_batch) for i, job in enumerate(chunk)}
    edits_at: dict[str, list[tuple[slice, Edit]]] = {}
    captures_at: dict[str, list[tuple[int, slice]]] = {}
    for i, job in enumerate(chunk):
        for name, edit in job.edits.items():
            edits_at.setdefault(name, []).append((rows_of[id(job)], edit))
        for name in job.capture:
            captures_at.setdefault(name, []).append((i, rows_of[id(job)]))
    captured: list[dict[str, Tensor]] = [{} for _ in chunk]

    def edit_hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        for rows, edit in edits_at[hook.name]:
            if rows.start < act.shape[0]:
                edit(out[rows], start)
        return out

    def capture_hook(act: Tensor, hook: Any) -> None:
        for i, rows in captures_at[hook.name]:
            if rows.start < act.shape[0]:
                captured[i][hook.name] = act[rows].clone()

    hooks: list[tuple[str, Callable[..., Any]]] = [(name, edit_hook) for name in edits_at]
    hooks += [(name, capture_hook) for name in captures_at]
    x: Tensor | None = None
    next_job = 0
    n_layers = model.cfg.n_layers
    stops = [n_layers if job.stop is None else job.stop for job in chunk]
    answers_only = max(stops) == n_layers and _answers_only(model, reader, edits_at, captures_at)
    if answers_only:
        # the last block's MLP only at the answer positions: after its attention (which needs
        # every position's keys and values) the residual keeps one position per row
        relative = (reader.answer_positions.to(base.tokens.device) - start).clamp(min=0)

        def answer_rows(act: Tensor, hook: Any) -> Tensor:
            rows = torch.arange(act.shape[0], device=act.device)
            at = relative.repeat(act.shape[0] // n_batch)  # (copies * batch,)
            return act[rows, at][:, None]  # (copies * batch, 1, d_model)

        hooks.append((f"blocks.{n_layers - 1}.hook_resid_mid", answer_rows))
    with hook_scope(model, fwd_hooks=hooks):
        for layer in range(chunk[0].layer, max(stops)):
            joining = 0
            while next_job + joining < len(chunk) and chunk[next_job + joining].layer == layer:
                joining += 1
            if joining:
                fresh = base.resid_pre[layer][:, start:].repeat(joining, 1, 1)
                x = fresh if x is None else torch.cat([x, fresh])
                next_job += joining
            assert x is not None
            copies = x.shape[0] // n_batch
            entry = TransformerLensKeyValueCacheEntry(
                past_keys=base.keys[layer][:, :start].repeat(copies, 1, 1, 1),
                past_values=base.values[layer][:, :start].repeat(copies, 1, 1, 1),
                frozen=True,
            )
            x = model.blocks[layer](x, past_kv_cache_entry=entry)
    assert x is not None and next_job == len(chunk), "jobs must be sorted by layer"
    if max(stops) < n_layers:  # capture-only jobs: no metric
        nan = torch.tensor(float("nan"))
        return [JobResult(job.key, nan, None, captured[i], start) for i, job in enumerate(chunk)]
    return _score_rows(model, base, chunk, x, start, reader, captured, answers_only)


def _answers_only(
    model: Model, reader: MetricReader, edits_at: dict[str, Any], captures_at: dict[str, Any]
) -> bool:
    """Whether the last block can run its MLP at the answer positions only: the metric reads
    only those, and nothing is edited or captured in the last block after ``hook_resid_mid``
    (edits there run before the hook that keeps the answer positions)."""
    cfg = model.cfg
    if reader.full or cfg.attn_only or getattr(cfg, "parallel_attn_mlp", False):
        return False
    last = f"blocks.{cfg.n_layers - 1}."
    after = ("hook_resid_post", "mlp", "ln2")
    names = [*edits_at, *captures_at]
    return not any(n.startswith(last) and any(a in n for a in after) for n in names)


def _score_rows(
    model: Model,
    base: BaseRun,
    chunk: list[PatchJob],
    resid: Tensor,
    start: int,
    reader: MetricReader,
    captured: list[dict[str, Tensor]],
    answers_only: bool = False,
) -> list[JobResult]:
    n_batch, copies = base.batch, len(chunk)
    if reader.full:
        # (copies*batch, pos, d_vocab): the unchanged prefix from the base run
        suffix_logits = decode_residual(model, resid)
        prefix = base.logits[:, :start].repeat(copies, 1, 1)
        logits = torch.cat([prefix, suffix_logits], dim=1)
    else:
        positions = reader.answer_positions.to(resid.device)
        relative = (positions - start).repeat(copies)  # (copies*batch,)
        inside = relative >= 0
        rows = torch.arange(resid.shape[0], device=resid.device)
        # (copies*batch, d_model); the residual holds only the answer positions already when
        # the last block ran on those alone
        picked = resid[:, 0] if answers_only else resid[rows, relative.clamp(min=0)]
        logits = decode_residual(model, picked[:, None])[:, 0]  # (copies*batch, d_vocab)
        unchanged = base.logits[torch.arange(n_batch, device=resid.device), positions]
        logits = torch.where(inside[:, None], logits, unchanged.repeat(copies, 1))
    results = []
    for i, job in enumerate(chunk):
        score, per_prompt = reader.score(logits[i * n_batch : (i + 1) * n_batch])
        results.append(JobResult(job.key, score, per_prompt, captured[i], start))
    return results


def base_score(
    reader: MetricReader, base: BaseRun
) -> tuple[Float[Tensor, ""], Float[Tensor, " batch"] | None]:
    """The metric on the unpatched base run, read the same way as the patched runs.

    Example:
        >>> base = run_base(mk.load_model("attn-only-2l"), torch.tensor([[1, 2, 3]]))
        >>> value, per_prompt = base_score(MetricReader(lambda x: x[:, -1, 0].mean(), base), base)
        >>> value.ndim, per_prompt
        (0, None)
    """
    return score_logits(reader, base.logits)


def score_logits(
    reader: MetricReader, logits: Float[Tensor, "batch pos d_vocab"]
) -> tuple[Float[Tensor, ""], Float[Tensor, " batch"] | None]:
    """The metric on full ``(batch, pos, d_vocab)`` logits of an unpatched run.

    Example:
        >>> base = run_base(mk.load_model("attn-only-2l"), torch.tensor([[1, 2, 3]]))
        >>> reader = MetricReader(lambda x: x[:, -1, 0].mean(), base)
        >>> bool(score_logits(reader, base.logits)[0] == base_score(reader, base)[0])
        True
    """
    if reader.full:
        return reader.score(logits)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return reader.score(logits[rows, reader.answer_positions.to(logits.device)])


def first_difference(a: Tensor, b: Tensor, position_axis: int) -> int | None:
    """The first position where ``a`` and ``b`` differ anywhere, or None if they are equal.

    Example:
        >>> first_difference(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5, 6]]), 1)
        1
    """
    differs = (a != b).movedim(position_axis, 0).reshape(a.shape[position_axis], -1).any(-1)
    hits = differs.nonzero()
    return None if hits.numel() == 0 else int(hits[0, 0])
