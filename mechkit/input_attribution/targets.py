"""What an input attribution explains: the target, a number computed from the model's logits.

A target is read, for each prompt, at one or more *steps*: step ``s`` reads the logits at the
prompt's last token plus ``s`` (the position that predicts the ``s``-th answer token). The
explained value is the sum over the steps, and every method also reports each step on its own
(the step-by-step matrix of a generated continuation, as inseq shows it).

- ``target=None``: the model's own next-token prediction on each prompt;
- a token (a one-token string, an id, or one per prompt): that next token;
- a :class:`~mechkit.metrics.Metric` (``mk.LogitDiff``, ...) or a function of the logits: its
  value at the prompt's last position (a :class:`~mechkit.prompts.PromptPairs` given as the
  prompts brings its logit difference as the default);
- a :class:`Continuation`: the given (or greedily generated) tokens after the prompt, one step
  each.

``kind`` says what is read for token targets: ``"logprob"`` (the default: additive over the
steps of a continuation and on the scale of the model's loss), ``"logit"`` or ``"prob"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.core.types import Model
from mechkit.errors import (
    ContextLengthError,
    EmptyDatasetError,
    InvalidArgumentError,
    InvalidTypeError,
    check_choice,
    check_positive_int,
)
from mechkit.metrics import LogitDiff, Metric, check_metric_value
from mechkit.tokens import check_token_ids, tokenize_answer, tokenizer_of

__all__ = ["Continuation", "Target", "resolve_target", "KINDS"]

Kind = Literal["logprob", "logit", "prob"]
KINDS: tuple[str, ...] = ("logprob", "logit", "prob")


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A continuation of every prompt, attributed token by token: ``tokens`` (a string, or ids,
    the same for every prompt, or one per prompt), or ``n_tokens`` generated greedily.

    Example:
        >>> Continuation(n_tokens=3)
        Continuation(tokens=None, n_tokens=3)
    """

    tokens: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]] | None = None
    n_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.n_tokens is None):
            raise InvalidArgumentError(
                "Expected exactly one of tokens (the continuation to explain) and n_tokens (how "
                f"many to generate); got tokens={self.tokens!r}, n_tokens={self.n_tokens!r}."
            )
        if self.n_tokens is not None:
            check_positive_int("n_tokens", self.n_tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """A resolved target: for each prompt its token ids, the answer token of each step, and how
    to read a value from the logits (``kind``, or a metric).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> t = resolve_target(model, [[1, 2, 3]], 7)
        >>> t.answers, t.appended(0), t.description
        ([[7]], [], 'logprob of the next token')
    """

    prompts: list[list[int]]
    answers: list[list[int]]
    kind: str
    metric: Any
    description: str

    def appended(self, i: int) -> list[int]:
        """The tokens that follow prompt ``i`` in every run (all answers but the last)."""
        return self.answers[i][:-1]

    def n_steps(self, i: int) -> int:
        return len(self.answers[i])

    def values(
        self, i: int, logits: Float[Tensor, "row pos d_vocab"], ends: Int[Tensor, " row"]
    ) -> Float[Tensor, "row step"]:
        """The target of prompt ``i`` at each step, for rows whose (perturbed) prompt part has
        ``ends`` tokens (the appended tokens follow it)."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        ends = ends.to(logits.device)
        out = []
        for s, answer in enumerate(self.answers[i]):
            at = logits[rows, ends - 1 + s]  # (row, d_vocab)
            if self.metric is not None:
                out.append(_metric_values(self.metric, i, at))
            elif self.kind == "logit":
                out.append(at[:, answer])
            elif self.kind == "prob":
                out.append(at.float().softmax(-1)[:, answer])
            else:
                out.append(at.float().log_softmax(-1)[:, answer])
        return torch.stack(out, -1).float()


def _metric_values(metric: Any, i: int, at: Tensor) -> Tensor:
    """A metric of prompt ``i`` on logits already at its answer position, one value per row."""
    n = at.shape[0]
    if isinstance(metric, Metric):
        index = torch.full((n,), i, dtype=torch.long)
        return metric.select(index).per_prompt(at)
    value = check_metric_value(metric(at[:, None, :]), n)  # a function of (row, 1, d_vocab)
    if value.ndim == 0:
        raise InvalidTypeError(
            "Expected a target function that returns one value per row of logits, shape (row,); "
            "it returned a scalar. Hint: return logits[:, -1, token], not its mean."
        )
    return value


def resolve_target(
    model: Model,
    prompts: list[list[int]],
    target: Any = None,
    *,
    kind: str = "logprob",
    pairs: Any = None,
) -> Target:
    """Resolve ``target`` (module docstring) for ``prompts`` (token ids, unpadded).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> resolve_target(model, [[1, 2, 3]], Continuation([4, 5])).answers
        [[4, 5]]
    """
    check_choice("kind", kind, KINDS)
    n = len(prompts)
    if n == 0 or any(len(p) == 0 for p in prompts):
        raise EmptyDatasetError(
            "Expected at least one prompt of at least one token; got an empty one. Hint: check "
            "the list of prompts."
        )
    if target is None and pairs is not None:
        target = LogitDiff.from_pairs(pairs)
    if isinstance(target, Metric) or (
        callable(target) and not isinstance(target, str | Continuation)
    ):
        answers = [[-1] for _ in prompts]  # one step, read by the metric
        if isinstance(target, Metric):
            _check_metric_rows(target, n)
        name = getattr(target, "__name__", type(target).__name__)
        return Target(prompts, answers, kind, target, f"{name} at the next token")
    if target is None:
        answers = [[t] for t in _predictions(model, prompts)]
        return Target(prompts, answers, kind, None, f"{kind} of the predicted next token")
    if isinstance(target, Continuation):
        conts = _continuations(model, prompts, target)
        longest = max(len(p) + len(c) - 1 for p, c in zip(prompts, conts, strict=True))
        if longest > model.cfg.n_ctx:
            raise ContextLengthError(
                f"Expected a prompt and its continuation to fit n_ctx={model.cfg.n_ctx}; the "
                f"longest needs {longest} positions. Hint: a shorter continuation."
            )
        return Target(prompts, conts, kind, None, f"{kind} of the continuation (sum over steps)")
    ids = _answer_ids(model, target, n)
    return Target(prompts, [[t] for t in ids], kind, None, f"{kind} of the next token")


def _check_metric_rows(metric: Metric, n: int) -> None:
    for field in dataclasses.fields(metric):  # type: ignore[arg-type]
        value = getattr(metric, field.name)
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] != n:
            raise InvalidArgumentError(
                f"Expected a metric bound to the {n} prompts; its {field.name} has "
                f"{value.shape[0]} rows. Hint: build it for these prompts (mk.LogitDiff(answers, "
                "wrongs))."
            )


def _answer_ids(model: Model, target: Any, n: int) -> list[int]:
    """One next-token id per prompt from a string, an id, or a sequence of them."""
    if isinstance(target, str):
        return [tokenize_answer(model, target)] * n
    if isinstance(target, int) and not isinstance(target, bool):
        ids = [target] * n
    else:
        items = list(target.tolist() if isinstance(target, Tensor) else target)
        if len(items) != n:
            raise InvalidArgumentError(
                f"Expected one target token per prompt ({n}); got {len(items)}. Hint: one token "
                "for all prompts, or a list of n."
            )
        ids = [tokenize_answer(model, t) if isinstance(t, str) else t for t in items]
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidTypeError(
                f"Expected target tokens as strings or integer ids; got {items!r}. Hint: a "
                "Continuation for several tokens per prompt."
            )
    check_token_ids(model, torch.tensor(ids), "target token ids")
    return [int(t) for t in ids]


@torch.no_grad()
def _predictions(model: Model, prompts: list[list[int]]) -> list[int]:
    out = []
    for p in prompts:
        logits = model(torch.tensor([p], device=model.cfg.device))
        out.append(int(logits[0, -1].argmax()))
    return out


def _continuations(model: Model, prompts: list[list[int]], cont: Continuation) -> list[list[int]]:
    if cont.n_tokens is not None:
        return [_greedy(model, p, cont.n_tokens) for p in prompts]
    tokens = cont.tokens
    if isinstance(tokens, str):
        tokenizer = tokenizer_of(model)
        rows = [list(tokenizer.encode(tokens, add_special_tokens=False))] * len(prompts)
    else:
        items: list[Any] = list(tokens or [])
        if items and isinstance(items[0], str):
            tokenizer = tokenizer_of(model)
            rows = [list(tokenizer.encode(t, add_special_tokens=False)) for t in items]
        elif items and isinstance(items[0], Sequence | Tensor):
            rows = [[int(t) for t in r] for r in items]
        else:
            rows = [[int(t) for t in items]] * len(prompts)
        if len(rows) != len(prompts):
            raise InvalidArgumentError(
                f"Expected one continuation per prompt ({len(prompts)}) or one for all; got "
                f"{len(rows)}."
            )
    if any(len(r) == 0 for r in rows):
        raise EmptyDatasetError("Expected a continuation of at least one token; got an empty one.")
    for r in rows:
        check_token_ids(model, torch.tensor(r), "continuation token ids")
    return rows


@torch.no_grad()
def _greedy(model: Model, prompt: list[int], n: int) -> list[int]:
    if len(prompt) + n - 1 > model.cfg.n_ctx:
        raise ContextLengthError(
            f"Expected the prompt ({len(prompt)} tokens) and {n} generated tokens to fit "
            f"n_ctx={model.cfg.n_ctx}. Hint: fewer tokens (n_tokens)."
        )
    tokens = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([tokens], device=model.cfg.device))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]
