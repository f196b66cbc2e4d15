"""Text to token ids: single-token answers, prompts with or without BOS, right padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import MultiTokenAnswerError, ShapeError

__all__ = ["tokenizer_of", "encode", "tokenize_answer", "pad_right", "token_batch"]


def tokenizer_of(model: Any) -> Any:
    """The model's tokenizer, or a clear error for models that have none."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ShapeError(
            "Expected a model with a tokenizer to turn text into tokens; this model has none "
            "(a toy model?). Hint: pass token ids instead (PromptPairs.from_tokens)."
        )
    return tokenizer


def encode(model: Any, text: str, prepend_bos: bool | None = None) -> list[int]:
    """The token ids of ``text``; BOS in front when ``prepend_bos`` (None: the model's default)."""
    tokenizer = tokenizer_of(model)
    if prepend_bos is None:
        prepend_bos = bool(model.cfg.default_prepend_bos)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.bos_token_id, *ids] if prepend_bos else ids


def tokenize_answer(model: Any, answer: str) -> int:
    """The single token id of ``answer`` (no BOS), or :class:`MultiTokenAnswerError`.

    Example:
        >>> tokenize_answer(model, " Mary")
        5099
    """
    tokenizer = tokenizer_of(model)
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        if not answer.startswith(" ") and len(ids) > 1:
            hint = f"most tokenizers fold the leading space into the word: try {' ' + answer!r}"
        else:
            hint = "choose a word that is one token, or score its first token"
        raise MultiTokenAnswerError(
            f"Expected an answer that is a single token; {answer!r} tokenizes to {len(ids)} "
            f"tokens {pieces}. Hint: {hint}."
        )
    return int(ids[0])


def pad_right(rows: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token rows into ``(batch, pos)`` ids and a ``(batch, pos)`` mask of real tokens.

    With right padding a causal model's outputs at the real tokens equal the unpadded run's.
    """
    if any(len(r) == 0 for r in rows):
        raise ShapeError("Expected every prompt to have at least one token; got an empty one.")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return tokens, mask


def token_batch(model: Any, tokens: Any, prepend_bos: bool | None = None) -> tuple[Tensor, Tensor]:
    """``(batch, pos)`` ids and mask from a string, a list of strings (right-padded), token ids
    (no padding assumed), or a :class:`~mechkit.prompts.PromptPairs` (its clean prompts)."""
    if hasattr(tokens, "clean_tokens") and hasattr(tokens, "clean_mask"):
        return tokens.clean_tokens, tokens.clean_mask
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str):
        tokenizer = tokenizer_of(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return pad_right([encode(model, t, prepend_bos) for t in tokens], pad)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ShapeError(f"Expected tokens of shape (batch, pos); got {tuple(tokens.shape)}.")
    return tokens.long(), torch.ones_like(tokens, dtype=torch.bool)
