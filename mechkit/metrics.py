"""Metrics of a model's output: logit and probability differences, cross-entropy, KL, and the
normalized form used to report patching results.

Each metric reads the logits at one position per prompt (the position that predicts the answer)
and returns one value per prompt, ``(batch,)``; calling the metric object averages them. The
functions take plain tensors; the metric classes bind the answer ids and positions of a
:class:`~mechkit.prompts.PromptPairs` once, so patching code calls ``metric(logits)``.

Example:
    >>> logits = torch.zeros(2, 3, 10)                 # (batch, pos, d_vocab)
    >>> logits[0, -1, 4], logits[1, 1, 4] = 2.0, 1.0
    >>> metric = mk.LogitDiff(torch.tensor([4, 4]), torch.tensor([7, 7]), torch.tensor([2, 1]))
    >>> metric.per_prompt(logits)                      # (batch,), at each answer position
    tensor([2., 1.])
    >>> metric(logits)                                 # scalar, the mean
    tensor(1.5000)

Normalized score (Wang et al. 2022; Heimersheim & Nanda 2024):
``(m - m_corrupt) / (m_clean - m_corrupt)``: 1 means the clean behaviour, 0 the corrupt one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.errors import InvalidArgumentError, InvalidTokenError, ShapeError

__all__ = [
    "answer_logits",
    "logit_diff",
    "prob_diff",
    "cross_entropy",
    "kl_divergence",
    "normalize",
    "Metric",
    "LogitDiff",
    "ProbDiff",
    "CrossEntropy",
    "KLDivergence",
    "Normalized",
    "check_metric_value",
]


def check_metric_value(value: Any, n_prompts: int) -> Tensor:
    """``value`` as a tensor if it is what a metric may return for ``n_prompts`` prompts: a
    scalar or one value per prompt ``(n_prompts,)``; else :class:`ShapeError` (a vector of
    another length must not be averaged as if it were per prompt).

    Example:
        >>> check_metric_value(torch.zeros(3), 3).shape
        torch.Size([3])
    """
    value = torch.as_tensor(value)
    if value.ndim == 0 or tuple(value.shape) == (n_prompts,):
        return value
    raise ShapeError(
        f"Expected the metric to return a scalar or one value per prompt, shape ({n_prompts},); "
        f"got shape {tuple(value.shape)}. Hint: a metric bound to a dataset must be sliced with "
        "the batch (metric.select(rows)); otherwise return a scalar."
    )


def answer_logits(
    logits: Float[Tensor, "batch pos d_vocab"], positions: Int[Tensor, " batch"] | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """The logits at each prompt's answer position; the last position when ``positions`` is None.

    Example:
        >>> answer_logits(torch.zeros(2, 5, 10), torch.tensor([4, 2])).shape
        torch.Size([2, 10])
    """
    if logits.ndim == 2:  # (batch, d_vocab): already at the answer position
        return logits
    if logits.ndim != 3:
        raise ShapeError(
            f"Expected logits of shape (batch, pos, d_vocab) or (batch, d_vocab); got "
            f"{tuple(logits.shape)}."
        )
    if positions is None:
        return logits[:, -1]
    positions = positions.to(logits.device)
    if positions.shape != (logits.shape[0],):
        raise ShapeError(
            f"Expected one answer position per prompt, shape ({logits.shape[0]},); got "
            f"{tuple(positions.shape)}. Hint: metrics bound to a dataset must be sliced with the "
            "batch (metric.select(rows))."
        )
    return logits[torch.arange(logits.shape[0], device=logits.device), positions]


def _gather(values: Float[Tensor, "batch d_vocab"], ids: Int[Tensor, " batch"]) -> Tensor:
    ids = ids.to(values.device)
    if ids.shape != (values.shape[0],):
        raise ShapeError(
            f"Expected one token id per prompt, shape ({values.shape[0]},); got {tuple(ids.shape)}."
        )
    d_vocab = values.shape[-1]
    bad = ((ids < 0) | (ids >= d_vocab)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise InvalidTokenError(
            f"Expected answer token ids in [0, {d_vocab}) (the model's vocabulary); got "
            f"{int(ids[i])} for prompt {i}. Hint: mk.tokenize_answer(model, ' Mary') gives the id."
        )
    return values.gather(-1, ids[:, None]).squeeze(-1)


def logit_diff(logits, answer, wrong, positions=None) -> Float[Tensor, " batch"]:
    """logit(answer) - logit(wrong) at the answer position, per prompt.

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0, 3.0]]])     # (batch, pos, d_vocab)
        >>> logit_diff(logits, torch.tensor([2]), torch.tensor([1]))   # (batch,)
        tensor([2.])
    """
    at = answer_logits(logits, positions)
    return _gather(at, answer) - _gather(at, wrong)


def prob_diff(logits, answer, wrong, positions=None) -> Float[Tensor, " batch"]:
    """p(answer) - p(wrong) at the answer position, per prompt.

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0, 3.0]]])     # (batch, pos, d_vocab)
        >>> prob_diff(logits, torch.tensor([2]), torch.tensor([1])).round(decimals=3)
        tensor([0.7300])
    """
    probs = answer_logits(logits, positions).float().softmax(-1)
    return _gather(probs, answer) - _gather(probs, wrong)


def cross_entropy(logits, answer, positions=None) -> Float[Tensor, " batch"]:
    """-log p(answer) at the answer position, per prompt (nats).

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0, 3.0]]])     # (batch, pos, d_vocab)
        >>> cross_entropy(logits, torch.tensor([2])).round(decimals=3)
        tensor([0.1700])
    """
    logprobs = answer_logits(logits, positions).float().log_softmax(-1)
    return -_gather(logprobs, answer)


def kl_divergence(logits, reference_logits, positions=None) -> Float[Tensor, " batch"]:
    """KL(p_reference || p_model) at the answer position, per prompt (nats).

    ``reference_logits`` is ``(batch, d_vocab)`` (already at the answer positions) or the full
    ``(batch, pos, d_vocab)`` of the reference run, read at the same positions.

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0, 3.0]]])     # (batch, pos, d_vocab)
        >>> kl_divergence(logits, logits)                # the same distribution: 0
        tensor([0.])
    """
    logp = answer_logits(logits, positions).float().log_softmax(-1)
    ref = answer_logits(reference_logits, positions).float().log_softmax(-1)
    if ref.shape != logp.shape:
        raise ShapeError(
            f"Expected reference logits matching the model's {tuple(logp.shape)} at the answer "
            f"positions; got {tuple(ref.shape)}."
        )
    return (ref.exp() * (ref - logp)).sum(-1)


def normalize(value: Tensor, clean: Tensor | float, corrupt: Tensor | float) -> Tensor:
    """(value - corrupt) / (clean - corrupt): 1 at the clean value, 0 at the corrupt one.

    Example:
        >>> normalize(torch.tensor([1.0, 2.0, 3.0]), clean=3.0, corrupt=1.0)
        tensor([0.0000, 0.5000, 1.0000])
    """
    clean_t = torch.as_tensor(clean, dtype=value.dtype, device=value.device)
    corrupt_t = torch.as_tensor(corrupt, dtype=value.dtype, device=value.device)
    span = clean_t - corrupt_t
    if bool((span == 0).any()):
        raise InvalidArgumentError(
            "Expected clean and corrupt metric values that differ; they are equal, so the "
            "normalized score is undefined. Hint: the corruption does not change the metric."
        )
    return (value - corrupt_t) / span


class Metric:
    """A metric bound to its dataset: ``per_prompt(logits)`` gives ``(batch,)``, ``(logits)`` the
    mean. ``select(rows)`` gives the metric for a subset of the prompts (for chunked runs).

    Example:
        >>> metric = mk.LogitDiff(torch.tensor([2, 2]), torch.tensor([1, 1]))
        >>> metric.select(slice(0, 1)).answer                # the first prompt's metric
        tensor([2])
    """

    def per_prompt(self, logits: Tensor) -> Float[Tensor, " batch"]:
        raise NotImplementedError

    def __call__(self, logits: Tensor) -> Float[Tensor, ""]:
        return self.per_prompt(logits).mean()

    def select(self, rows: Any) -> Metric:
        """This metric restricted to ``rows`` of the batch (a slice or index tensor)."""
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, Tensor) and value.ndim >= 1:
                changes[field.name] = value[rows]
            elif isinstance(value, Metric):
                changes[field.name] = value.select(rows)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True, eq=False)
class LogitDiff(Metric):
    """logit(answer) - logit(wrong) at each prompt's answer position.

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0, 3.0]], [[2.0, 0.0, 0.0]]])   # (batch, pos, d_vocab)
        >>> mk.LogitDiff(torch.tensor([2, 2]), torch.tensor([1, 1])).per_prompt(logits)
        tensor([2., 0.])
    """

    answer: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    positions: Int[Tensor, " batch"] | None = None

    def per_prompt(self, logits: Tensor) -> Tensor:
        return logit_diff(logits, self.answer, self.wrong, self.positions)

    @classmethod
    def from_pairs(cls, pairs: Any, run: str = "clean") -> LogitDiff:
        """Bound to ``pairs``, read at the answer positions of its clean (or corrupt) prompts."""
        return cls(pairs.answer, pairs.wrong, pairs.answer_positions(run))


@dataclasses.dataclass(frozen=True, eq=False)
class ProbDiff(Metric):
    """p(answer) - p(wrong) at each prompt's answer position.

    Example:
        >>> logits = torch.tensor([[[0.0, 0.0]]])           # (batch, pos, d_vocab)
        >>> mk.ProbDiff(torch.tensor([0]), torch.tensor([1]))(logits)
        tensor(0.)
    """

    answer: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    positions: Int[Tensor, " batch"] | None = None

    def per_prompt(self, logits: Tensor) -> Tensor:
        return prob_diff(logits, self.answer, self.wrong, self.positions)

    @classmethod
    def from_pairs(cls, pairs: Any, run: str = "clean") -> ProbDiff:
        return cls(pairs.answer, pairs.wrong, pairs.answer_positions(run))


@dataclasses.dataclass(frozen=True, eq=False)
class CrossEntropy(Metric):
    """-log p(answer) at each prompt's answer position.

    Example:
        >>> logits = torch.tensor([[[0.0, 0.0]]])           # (batch, pos, d_vocab)
        >>> mk.CrossEntropy(torch.tensor([0]))(logits).round(decimals=4)   # log 2
        tensor(0.6931)
    """

    answer: Int[Tensor, " batch"]
    positions: Int[Tensor, " batch"] | None = None

    def per_prompt(self, logits: Tensor) -> Tensor:
        return cross_entropy(logits, self.answer, self.positions)

    @classmethod
    def from_pairs(cls, pairs: Any, run: str = "clean") -> CrossEntropy:
        return cls(pairs.answer, pairs.answer_positions(run))


@dataclasses.dataclass(frozen=True, eq=False)
class KLDivergence(Metric):
    """KL(p_reference || p_model) at each prompt's answer position.

    ``reference_logits`` is ``(batch, d_vocab)``: the reference run's logits at those positions.

    Example:
        >>> logits = torch.tensor([[[0.0, 1.0]]])           # (batch, pos, d_vocab)
        >>> mk.KLDivergence(logits[:, -1])(logits)          # reference (batch, d_vocab): itself
        tensor(0.)
    """

    reference_logits: Float[Tensor, "batch d_vocab"]
    positions: Int[Tensor, " batch"] | None = None

    def per_prompt(self, logits: Tensor) -> Tensor:
        return kl_divergence(logits, self.reference_logits, self.positions)

    @classmethod
    def from_pairs(cls, pairs: Any, reference_logits: Tensor, run: str = "clean") -> KLDivergence:
        """Bound to ``pairs``; ``reference_logits`` may be the full ``(batch, pos, d_vocab)``."""
        positions = pairs.answer_positions(run)
        return cls(answer_logits(reference_logits, positions).detach(), positions)


@dataclasses.dataclass(frozen=True, eq=False)
class Normalized(Metric):
    """``(m - m_corrupt) / (m_clean - m_corrupt)`` for a base metric ``m``.

    ``clean`` and ``corrupt`` are the base metric's per-prompt values on the clean and corrupt
    runs. ``per_prompt`` normalizes each prompt by its own values; calling the metric normalizes
    the mean by the means, the usual way to report (per-prompt spans can be near zero).

    Example:
        >>> base = mk.LogitDiff(torch.tensor([0]), torch.tensor([1]))
        >>> clean, corrupt = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.0, 0.0]]])
        >>> metric = mk.Normalized.from_runs(base, clean, corrupt)
        >>> metric(clean), metric(corrupt), metric(torch.tensor([[[1.0, 0.0]]]))
        (tensor(1.), tensor(0.), tensor(0.5000))
    """

    metric: Metric
    clean: Float[Tensor, " batch"]
    corrupt: Float[Tensor, " batch"]

    def per_prompt(self, logits: Tensor) -> Tensor:
        return normalize(self.metric.per_prompt(logits), self.clean, self.corrupt)

    def __call__(self, logits: Tensor) -> Tensor:
        return normalize(self.metric(logits), self.clean.mean(), self.corrupt.mean())

    @classmethod
    def from_runs(cls, metric: Metric, clean_logits: Tensor, corrupt_logits: Tensor) -> Normalized:
        """Normalized by the base metric's values on the given clean and corrupt logits."""
        with torch.no_grad():
            clean = metric.per_prompt(clean_logits).detach()
            corrupt = metric.per_prompt(corrupt_logits).detach()
        return cls(metric, clean, corrupt)
