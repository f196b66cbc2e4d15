"""How methods cut their work to fit memory: prompts per pass, memory budgets, and splitting a
pass that still runs out of memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mechkit.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    OutOfMemoryError,
    check_batch_size,
)
from mechkit.metrics import Metric

__all__ = ["each_batch", "prompts_per_pass", "parse_budget", "check_budget", "is_out_of_memory"]

DEFAULT_CPU_BUDGET = 2 * 1024**3
"""The memory budget on the CPU when none is given: 2 GiB."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of memory (CUDA's error, or the CPU allocator's).

    Example:
        >>> is_out_of_memory(RuntimeError("CUDA out of memory")), is_out_of_memory(KeyError())
        (True, False)
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def prompts_per_pass(n_prompts: int, batch_size: int | None, metric: Any) -> int:
    """How many prompts one pass takes: ``batch_size``, or all of them when None. Splitting the
    prompts needs a mechkit :class:`~mechkit.metrics.Metric` (it can be restricted to a batch);
    a plain function of the logits is refused then, with a hint.

    Example:
        >>> prompts_per_pass(10, None, lambda logits: logits.sum())
        10
    """
    size = check_batch_size(batch_size) or max(1, n_prompts)
    if size < n_prompts and not isinstance(metric, Metric):
        raise InvalidTypeError(
            "Expected a mechkit Metric (it can be restricted to a batch) when batch_size splits "
            f"the prompts; got {type(metric).__name__}. Hint: batch_size=None, or "
            "mk.LogitDiff.from_pairs(pairs)."
        )
    return size


def each_batch(
    n_prompts: int, size: int | None, work: Callable[[slice], None], *, can_split: bool = True
) -> None:
    """``work(rows)`` for consecutive slices of at most ``size`` prompts (all when None). A
    slice that runs out of memory is retried in halves, so ``work`` must keep nothing from a call
    that failed; a single prompt that does not fit raises :class:`OutOfMemoryError`.

    Example:
        >>> seen = []
        >>> each_batch(5, 2, seen.append)
        >>> seen
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    step = check_batch_size(size) or max(1, n_prompts)
    start = 0
    while start < n_prompts:
        stop = min(start + step, n_prompts)
        try:
            work(slice(start, stop))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            if stop - start == 1 or not can_split:
                raise OutOfMemoryError(
                    f"Out of memory on {stop - start} prompt(s) in one pass. Hint: fewer or "
                    "shorter prompts, a smaller batch_size, or a mechkit Metric so batches can "
                    "be split."
                ) from exc
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            step = (stop - start) // 2
            continue
        start = stop


def parse_budget(budget: int | str | None, device: torch.device | str = "cpu") -> int:
    """Bytes from a ``memory_budget`` argument: an int, or ``"2GB"``, ``"512MB"``, ...; None
    means 2 GiB on the CPU and 60% of the free memory on a CUDA device.

    Example:
        >>> parse_budget("512MB"), parse_budget(None)
        (536870912, 2147483648)
    """
    device = torch.device(device)
    if budget is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free * 0.6)
        return DEFAULT_CPU_BUDGET
    if isinstance(budget, bool):
        value = -1
    elif isinstance(budget, int | float):
        value = int(budget)
    else:
        text = str(budget).strip().upper().replace(" ", "").removesuffix("B").removesuffix("I")
        units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
        try:
            value = int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
        except (ValueError, IndexError):
            raise InvalidArgumentError(
                f"Expected a memory budget such as '2GB', '512MB' or a number of bytes; got "
                f"{budget!r}. Hint: None picks 2 GiB on CPU, 60% of free memory on CUDA."
            ) from None
    if value <= 0:
        raise InvalidArgumentError(
            f"Expected a positive memory budget; got {budget!r}. Hint: '2GB', or None for the "
            "default."
        )
    return value


def check_budget(budget: int | str | None) -> None:
    """Check a ``memory_budget`` argument before any work starts (as :func:`parse_budget`).

    Example:
        >>> check_budget("512MB")  # fine: returns None
        >>> check_budget("2 parsecs")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidArgumentError: Expected a memory budget such as '2GB', ...
    """
    if budget is not None:
        parse_budget(budget, "cpu")
