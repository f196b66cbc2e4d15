"""Text to token ids: single-token answers, prompts with or without BOS, right padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mechkit.errors import (
    ContextLengthError,
    EmptyDatasetError,
    InvalidTokenError,
    MultiTokenAnswerError,
    ShapeError,
)
from mechkit.models.toy import toy_record

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "bos_token_id",
    "tokenizer_of",
    "encode",
    "tokenize_answer",
    "pad_right",
    "token_batch",
    "check_tokens",
    "check_token_ids",
]


def tokenizer_of(model: HookedTransformer) -> Any:
    """The model's tokenizer, or a clear error for models that have none.

    Example:
        >>> tokenizer = tokenizer_of(mk.load_model("smollm2-135m"))
        >>> tokenizer.encode("Hello"), tokenizer.encode("Hello", add_special_tokens=False)
        ([1, 19556], [19556])
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ShapeError(
            "Expected a model with a tokenizer to turn text into tokens; this model has none "
            "(a toy model?). Hint: pass token ids instead (PromptPairs.from_tokens)."
        )
    return tokenizer


def bos_token_id(model: HookedTransformer) -> int:
    """The id of the model's beginning-of-sequence token: the tokenizer's BOS (else its EOS,
    which models without a BOS put first), a toy model's recorded one, else 0 (hand-built toy
    models put BOS at id 0 by convention).

    Example:
        >>> bos_token_id(mk.load_model("attn-only-2l"))
        0
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        for bos in (tokenizer.bos_token_id, tokenizer.eos_token_id):
            if bos is not None:
                return int(bos)
    info = getattr(model, "mechkit_info", None)
    if info is not None and info.source == "toy":
        return int(toy_record(info.name).get("bos_token_id", 0))
    return 0


def encode(model: HookedTransformer, text: str, prepend_bos: bool | None = None) -> list[int]:
    """The token ids of ``text``; BOS in front when ``prepend_bos`` (None: the model's default).

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> encode(model, "Hello"), encode(model, "Hello", prepend_bos=True)
        ([19556], [1, 19556])
    """
    tokenizer = tokenizer_of(model)
    if prepend_bos is None:
        prepend_bos = bool(model.cfg.default_prepend_bos)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [tokenizer.bos_token_id, *ids] if prepend_bos else ids


def tokenize_answer(model: HookedTransformer, answer: str) -> int:
    """The single token id of ``answer`` (no BOS), or :class:`MultiTokenAnswerError`.

    Example:
        >>> model = mk.load_model("smollm2-135m")
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

    Example:
        >>> tokens, mask = pad_right([[5, 6, 7], [8]], pad_token_id=0)   # (batch, pos) each
        >>> tokens.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 0, 0]], [[True, True, True], [True, False, False]])
    """
    if not rows:
        raise EmptyDatasetError(
            "Expected at least one prompt; got an empty list. Hint: pass one or more prompts."
        )
    if any(len(r) == 0 for r in rows):
        raise ShapeError("Expected every prompt to have at least one token; got an empty one.")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return tokens, mask


@runtime_checkable
class PromptSet(Protocol):
    """What :func:`token_batch` reads from a :class:`~mechkit.prompts.PromptPairs` (a protocol:
    prompts.py imports this module, so it cannot be imported here).

    Example:
        >>> isinstance(torch.zeros(1), PromptSet)
        False
    """

    clean_tokens: Tensor
    clean_mask: Tensor


def token_batch(
    model: HookedTransformer, tokens: Any, prepend_bos: bool | None = None
) -> tuple[Tensor, Tensor]:
    """``(batch, pos)`` ids and mask from a string, a list of strings (right-padded), token ids
    (no padding assumed), or a :class:`~mechkit.prompts.PromptPairs` (its clean prompts).

    The one place prompts given to a method are resolved, so every method refuses the same
    things: no prompts (:class:`EmptyDatasetError`), ids outside the vocabulary
    (:class:`InvalidTokenError`), prompts longer than the model's context
    (:class:`ContextLengthError`).

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> tokens, mask = token_batch(model, ["Hello world", "Hi"])   # (batch, pos), right-padded
        >>> tokens.shape, mask.sum(-1).tolist()
        (torch.Size([2, 2]), [2, 1])
    """
    if isinstance(tokens, PromptSet):
        check_tokens(model, tokens.clean_tokens, tokens.clean_mask)
        return tokens.clean_tokens, tokens.clean_mask
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str):
        tokenizer = tokenizer_of(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids, mask = pad_right([encode(model, t, prepend_bos) for t in tokens], pad)
        check_tokens(model, ids, mask)
        return ids, mask
    tokens = torch.as_tensor(tokens)
    if tokens.numel() == 0:
        raise EmptyDatasetError(
            f"Expected at least one prompt of at least one token; got no tokens (shape "
            f"{tuple(tokens.shape)}). Hint: check the list of prompts is not empty."
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ShapeError(f"Expected tokens of shape (batch, pos); got {tuple(tokens.shape)}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InvalidTokenError(
            f"Expected integer token ids; got a tensor of {tokens.dtype}. Hint: "
            "model.to_tokens(text) gives ids."
        )
    tokens = tokens.long()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    check_tokens(model, tokens, mask)
    return tokens, mask


def check_token_ids(
    model: HookedTransformer, ids: Tensor, what: str = "token ids", mask: Tensor | None = None
) -> None:
    """Raise :class:`InvalidTokenError` unless every id (where ``mask`` is True, if given) is
    in ``[0, d_vocab)``.

    Example:
        >>> check_token_ids(mk.load_model("attn-only-2l"), torch.tensor([[1, 999]]))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidTokenError: Expected token ids in [0, 500) ...; got 999 ...
    """
    d_vocab = int(model.cfg.d_vocab)
    ids = torch.as_tensor(ids)
    if ids.numel() == 0:
        return
    outside = (ids < 0) | (ids >= d_vocab)
    if mask is not None:
        outside &= mask.to(outside.device)
    bad = outside.nonzero()
    if bad.numel():
        where = tuple(int(i) for i in bad[0])
        raise InvalidTokenError(
            f"Expected {what} in [0, {d_vocab}) (the model's vocabulary); got {int(ids[where])} "
            f"at index {where if len(where) > 1 else where[0]} ({bad.shape[0]} id(s) outside). "
            "Hint: tokenize with the model's own tokenizer (model.to_tokens)."
        )


def check_tokens(model: HookedTransformer, tokens: Tensor, mask: Tensor | None = None) -> None:
    """Refuse a ``(batch, pos)`` token batch the model cannot run: ids outside the vocabulary
    (:class:`InvalidTokenError`; padding, where ``mask`` is False, is not checked) or prompts
    longer than the model's context ``n_ctx`` (:class:`ContextLengthError`, also for rotary
    models, whose ``n_ctx`` is the length they were trained on).

    Example:
        >>> check_tokens(mk.load_model("attn-only-2l"), torch.zeros(1, 200, dtype=torch.long))
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.ContextLengthError: ...
    """
    check_token_ids(model, tokens, "token ids", mask)
    n_ctx = int(model.cfg.n_ctx)
    lengths = (
        torch.full((tokens.shape[0],), tokens.shape[1]) if mask is None else mask.sum(-1).cpu()
    )
    if tokens.shape[0] and int(lengths.max()) > n_ctx:
        i = int(lengths.argmax())
        raise ContextLengthError(
            f"Expected prompts of at most n_ctx={n_ctx} tokens (the model's context window); "
            f"prompt {i} has {int(lengths[i])} tokens. Hint: shorten or split the prompt."
        )
