"""Scoring a batch with the user's metric, the same way in every gradient-based method.

A method that splits the prompts into batches restricts the metric to each batch
(:func:`batch_metric`) and takes its mean over the batch's prompts as one differentiable scalar
(:func:`mean_value`); a mechkit :class:`~mechkit.metrics.Metric` and a plain function of the
logits are read alike.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor

from mechkit.errors import ShapeError
from mechkit.metrics import Metric, check_metric_value

__all__ = ["batch_metric", "mean_value"]


def batch_metric(metric: Any, rows: slice, n_prompts: int) -> Any:
    """The metric for prompts ``rows`` of ``n_prompts``: itself for all of them, else
    ``metric.select(rows)`` (a mechkit Metric; :func:`~mechkit.core.prompts_per_pass` refuses
    other metrics before a batch is split).

    Example:
        >>> m = mk.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
        >>> batch_metric(m, slice(1, 2), 2).answer.tolist()
        [2]
    """
    if rows.start in (0, None) and rows.stop == n_prompts:
        return metric
    return metric.select(rows)


def mean_value(metric: Any, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
    """The metric on ``logits`` as a differentiable scalar: the mean over the prompts of a
    per-prompt value, or the scalar a function returns.

    Example:
        >>> logits = torch.zeros(2, 3, 5)
        >>> logits[:, -1, 1] = torch.tensor([1.0, 3.0])
        >>> mean_value(lambda lg: lg[:, -1, 1], logits)
        tensor(2.)
    """
    value = metric.per_prompt(logits).mean() if isinstance(metric, Metric) else metric(logits)
    value = check_metric_value(value, logits.shape[0])  # ShapeError on a vector of another length
    if value.ndim == 1:
        value = value.mean()
    if value.ndim != 0:
        raise ShapeError(
            f"Expected the metric to return a scalar or one value per prompt; got shape "
            f"{tuple(value.shape)}."
        )
    return value
