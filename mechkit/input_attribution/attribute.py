"""``mk.attribute_inputs``: which input tokens drove a prediction, by any registered method.

One entry point for every method (gradients, perturbations, attention), so that their results
have one layout and compare side by side: prompts are resolved by the core (strings, token ids
or :class:`~mechkit.PromptPairs`), the target by :mod:`~mechkit.input_attribution.targets`, and
each prompt's runs are batched to a memory budget by
:class:`~mechkit.input_attribution.runs.PromptRun`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mechkit.core.batching import check_budget
from mechkit.core.inputs import resolve_contrast
from mechkit.core.labels import model_name
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import EmptyDatasetError, InvalidArgumentError, check_batch_size, check_choice
from mechkit.input_attribution.gradients import BASELINES, pad_token
from mechkit.input_attribution.registry import METHODS, READS, Options, Scores
from mechkit.input_attribution.result import InputAttribution
from mechkit.input_attribution.runs import PromptRun, word_starts
from mechkit.input_attribution.targets import Target, resolve_target
from mechkit.tokens import bos_token_id, check_tokens, pad_right, token_batch

__all__ = ["attribute_inputs", "prompt_runs", "token_labels"]


def attribute_inputs(
    model: Model,
    prompts: Any,
    target: Any = None,
    *,
    method: str = "integrated_gradients",
    kind: str = "logprob",
    unit: str | int = "token",
    removal: str = "delete",
    replacement: int | None = None,
    baseline: Any = None,
    n_steps: int | None = None,
    quadrature: str | None = None,
    tolerance: float | None = None,
    max_steps: int | None = None,
    norm: str | None = None,
    n_samples: int | None = None,
    kernel_width: float | None = None,
    alpha: float | None = None,
    seed: int | None = None,
    layer: int | None = None,
    head: int | None = None,
    max_features: int | None = None,
    skip_bos: bool = True,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
) -> InputAttribution:
    """Attribute a target to each input token of each prompt.

    Args:
        model: a HookedTransformer.
        prompts: strings, token ids ``(batch, pos)``, or a :class:`~mechkit.PromptPairs` (its
            clean prompts; its logit difference is the default target and its corrupt prompts
            the ``baseline="corrupt"`` of IG).
        target: what is explained (:mod:`~mechkit.input_attribution.targets`): None (the
            model's prediction), a token or one per prompt, a metric, a
            :class:`~mechkit.input_attribution.Continuation`, or the ``.resolved`` target of
            an earlier attribution of the same prompts (its answers, not resolved again: a
            second method then explains exactly what the first did).
        method: ``"integrated_gradients"`` (default), ``"saliency"``, ``"input_x_gradient"``,
            ``"occlusion"``, ``"shapley"``, ``"kernel_shap"``, ``"lime"`` or ``"attention"``.
        kind: for token targets, ``"logprob"`` (default), ``"logit"`` or ``"prob"``.
        unit: what perturbation methods remove together: ``"token"``, ``"word"`` or a span
            length; a feature's score is shared by its tokens.
        removal: ``"delete"`` (default) or ``"replace"`` (by ``replacement``, default the pad
            token) for perturbation methods.
        baseline, n_steps, quadrature, tolerance, max_steps: integrated gradients
            (:mod:`.gradients`); defaults ``"pad"``, 64, ``"adaptive"`` (which bisects its
            intervals until the completeness gap is within ``tolerance`` = 1% of
            ``|F(x) - F(baseline)|``, at most ``max_steps`` = 1024 gradient points; measured
            on the docs page).
        norm: saliency's ``"l2"`` (default) or ``"l1"``.
        n_samples, kernel_width, alpha, seed: LIME and KernelSHAP (500 samples, width 0.25,
            ridge 1.0, seed 0).
        layer, head: the attention baseline (last layer, mean over heads).
        max_features: exact Shapley's limit (12 features: 4096 runs per prompt).
        skip_bos: never attribute a leading BOS token (it is kept in every run).
        batch_size: rows (perturbed prompts or IG points) per forward pass; None: as many as
            ``memory_budget`` holds (2 GiB on CPU by default). A pass that runs out of memory
            is split in two and retried.
        progress: a progress bar over the prompts.

    Returns:
        An :class:`~mechkit.InputAttribution`.

    Raises:
        InvalidArgumentError: an unknown method (with close matches) or option value, or an
            option the chosen method does not read.
        MultiTokenAnswerError: a target token that is several tokens.
        PromptLengthError: a baseline prompt of another length than its prompt.
        EmptyDatasetError: no prompts, or an empty one.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3, 4]], 5, method="occlusion")
        >>> tuple(r.scores.shape), r.method  # (batch, pos)
        ((1, 4), 'occlusion')
    """
    check_choice("method", method, list(METHODS))
    check_choice("removal", removal, ["delete", "replace"])
    check_batch_size(batch_size)
    check_budget(memory_budget)
    given = {
        "baseline": baseline, "n_steps": n_steps, "quadrature": quadrature,
        "tolerance": tolerance, "max_steps": max_steps, "norm": norm,
        "n_samples": n_samples, "kernel_width": kernel_width, "alpha": alpha, "seed": seed,
        "layer": layer, "head": head, "max_features": max_features,
    }  # fmt: skip
    unread = [k for k, v in given.items() if v is not None and k not in READS[method]]
    if unread:
        raise InvalidArgumentError(
            f"Expected only options that method={method!r} reads ({list(READS[method]) or 'none'}"
            f"); got {unread}. Hint: leave them out, or choose the method that reads them."
        )
    options = Options(**{k: v for k, v in given.items() if v is not None})
    _check_options(options)
    target_obj, pairs = _resolve(model, prompts, target, kind)
    if method == "integrated_gradients":
        options = _with_baseline_tokens(model, options, pairs, len(target_obj.prompts))
    runs = prompt_runs(
        model, target_obj, unit=unit, skip_bos=skip_bos, removal=removal,
        replacement=replacement, batch_size=batch_size, memory_budget=memory_budget,
    )  # fmt: skip
    found: list[Scores] = []
    with progress_bar(len(runs), method, enabled=progress, unit="prompt") as bar:
        for run in runs:
            found.append(METHODS[method](run, options))
            bar.update(1)
    settings = {k: _jsonable(getattr(options, k)) for k in READS[method]}
    settings.update(kind=target_obj.kind, unit=unit, removal=removal)
    return assemble(model, target_obj, runs, found, method, settings)


def _check_options(options: Options) -> None:
    if isinstance(options.baseline, str):
        check_choice("baseline", options.baseline, BASELINES, also="a token id or prompts")
    for name in ("n_steps", "n_samples", "max_features", "max_steps"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"Expected {name} to be an integer >= 1; got {value!r}.")
    if isinstance(options.tolerance, bool) or not options.tolerance >= 0:
        raise InvalidArgumentError(
            f"Expected tolerance >= 0 (a share of |F(x) - F(baseline)|); got "
            f"{options.tolerance!r}. Hint: 0.01 asks for a completeness gap within 1%."
        )
    if not options.kernel_width > 0 or not options.alpha >= 0:
        raise InvalidArgumentError(
            f"Expected kernel_width > 0 and alpha >= 0; got {options.kernel_width}, "
            f"{options.alpha}."
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return "given"


def _resolve(model: Model, prompts: Any, target: Any, kind: str) -> tuple[Target, Any]:
    if isinstance(prompts, list | tuple) and prompts and isinstance(prompts[0], list | tuple):
        rows = [[int(t) for t in row] for row in prompts]  # token ids of several lengths
        if any(len(r) == 0 for r in rows):
            raise EmptyDatasetError("Expected every prompt to have at least one token.")
        padded, mask = pad_right(rows, 0)
        check_tokens(model, padded, mask)
        pairs = None
    else:
        contrast = resolve_contrast(
            model, prompts, ablation="zero", ablations=("zero",), needs_metric=False
        )
        tokens, mask = contrast.clean_tokens.cpu(), contrast.clean_mask.cpu()
        rows = [t[m].tolist() for t, m in zip(tokens, mask, strict=True)]
        pairs = contrast.pairs
    if isinstance(target, Target):  # an earlier attribution's: the same prompts only
        if target.prompts != rows:
            raise InvalidArgumentError(
                f"Expected the prompts the resolved target was made for ({len(target.prompts)} "
                f"prompt(s)); got {len(rows)} prompt(s) that differ. Hint: pass the same "
                "prompts as the attribution whose .resolved you pass, or a plain target."
            )
        return target, pairs
    return resolve_target(model, rows, target, kind=kind, pairs=pairs), pairs


def _with_baseline_tokens(model: Model, options: Options, pairs: Any, n: int) -> Options:
    """Baseline prompts as token rows: a PromptPairs' corrupt prompts for ``"corrupt"``, or
    the prompts given as the baseline."""
    value = options.baseline
    if isinstance(value, str) and value != "corrupt":
        return options
    if isinstance(value, int) and not isinstance(value, bool):
        return options
    if value == "corrupt":
        if pairs is None:
            raise InvalidArgumentError(
                "Expected PromptPairs as the prompts for baseline='corrupt' (its corrupt "
                "prompts are the baselines); got plain prompts. Hint: pass baseline prompts "
                "(baseline=[...]), or baseline='pad'."
            )
        tokens, mask = pairs.corrupt_tokens, pairs.corrupt_mask
    else:
        tokens, mask = token_batch(model, value)
    rows = [t[m].tolist() for t, m in zip(tokens.cpu(), mask.cpu(), strict=True)]
    if len(rows) != n:
        raise InvalidArgumentError(
            f"Expected one baseline prompt per prompt ({n}); got {len(rows)}."
        )
    return dataclasses.replace(options, baseline="given", baseline_tokens=rows)


def prompt_runs(
    model: Model,
    target: Target,
    *,
    unit: str | int = "token",
    skip_bos: bool = True,
    removal: str = "delete",
    replacement: int | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> list[PromptRun]:
    """One :class:`PromptRun` per prompt of ``target`` (the settings of
    :func:`attribute_inputs`).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> from mechkit.input_attribution.targets import resolve_target
        >>> [r.n_features for r in prompt_runs(model, resolve_target(model, [[1, 2], [3]], 4))]
        [2, 1]
    """
    bos = bos_token_id(model) if skip_bos else None
    fill = pad_token(model) if replacement is None else replacement
    return [
        PromptRun.build(
            model,
            target,
            i,
            unit=unit,
            skip_bos=bos,
            removal=removal,  # type: ignore[arg-type]
            replacement=fill,
            batch_size=batch_size,
            memory_budget=memory_budget,
        )  # fmt: skip
        for i in range(len(target.prompts))
    ]


def token_labels(model: Model, tokens: list[int]) -> list[str]:
    """The text of each token (its id without a tokenizer).

    Example:
        >>> token_labels(mk.load_model("attn-only-2l"), [4, 5])
        ['4', '5']
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(t) for t in tokens]
    return [tokenizer.decode([t]) for t in tokens]


def assemble(
    model: Model,
    target: Target,
    runs: list[PromptRun],
    found: list[Scores],
    method: str,
    options: dict[str, Any],
) -> InputAttribution:
    """The :class:`InputAttribution` of per-prompt scores (padded with NaN)."""
    n = len(runs)
    width = max(len(p) for p in target.prompts)
    steps = max(target.n_steps(i) for i in range(n))
    scores = torch.full((n, width), float("nan"))
    step_scores = torch.full((n, steps, width), float("nan"))
    tokens = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    attributed = torch.zeros(n, width, dtype=torch.bool)
    values = torch.zeros(n)
    labels, step_labels, word_ids = [], [], []
    extras: dict[str, list[float]] = {}
    for i, (run, got) in enumerate(zip(runs, found, strict=True)):
        prompt = target.prompts[i]
        k = len(prompt)
        scores[i, :k] = got.scores
        step_scores[i, : got.step_scores.shape[0], :k] = got.step_scores
        tokens[i, :k] = torch.tensor(prompt)
        mask[i, :k] = True
        attributed[i, run.positions] = True
        full = torch.ones(1, k, dtype=torch.bool)
        values[i] = run.values_of_positions(full).sum()
        labels.append(token_labels(model, prompt))
        answers = target.answers[i]
        step_labels.append(
            ["(metric)"] if target.metric is not None else token_labels(model, answers)
        )
        starts = word_starts(model, prompt)
        ids, w = [], -1
        for p in range(k):
            if p in run.positions:
                w += 1 if (starts[p] or w < 0) else 0
                ids.append(w)
            else:
                ids.append(-1)
        word_ids.append(ids)
        for name, v in got.extras.items():
            extras.setdefault(name, []).append(v)
    return InputAttribution(
        scores=scores,
        step_scores=step_scores,
        tokens=tokens,
        mask=mask,
        attributed=attributed,
        labels=labels,
        step_labels=step_labels,
        target_values=values,
        method=method,
        target=target.description,
        model=model_name(model),
        options=options,
        extras={k: torch.tensor(v) for k, v in extras.items()},
        unit="token",
        word_ids=word_ids,
        resolved=target,
    )
